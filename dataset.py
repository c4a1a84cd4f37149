"""Training data: captioned images or videos as batches `(x, captions, meta)` with a resumable position.

    x         float32 in [-1, 1]: images (B, 3, H, W), videos (B, T, 3, H, W)
    captions  list of B strings
    meta      {"fps": LongTensor (B,) (0 for images), "aspect_ratio": one ratio for the whole batch, e.g. "16:9",
               "index": LongTensor (B,) of dataset indices (-1 for tar shards, which have none),
               "context": LongTensor (B,) of leading video frames given, not scored (0: the whole clip is scored)}

Three sources (`--dataset`): `shapes`, coloured shapes drawn from a seed (tests and the demo models); `folder`,
images or .mp4 videos under `--data` with captions beside them; `webdataset`, tar shards. With `--mix_aspect` each
sample goes to the bucket of the nearest official aspect ratio and every batch holds one bucket.
"""
import dataclasses
import io
import itertools
import json
import math
import random
import tarfile
import tempfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import imageio
import numpy as np
import torch
from PIL import Image, ImageDraw

from utils.config import ASPECT_RATIOS, one_line
from utils.files import IMAGE_EXTS, decode_text, image_size, read_caption_table, read_image, read_text
from utils.phrasing import phrase, says_start

VIDEO_EXTS = (".mp4",)


def aspect_ratio_to_image_size(target: int, ratio: str | None, multiple: int = 8) -> tuple[int, int]:
    """(h, w) for aspect ratio "w:h" with an area of about target^2, each side a multiple of `multiple`."""
    if ratio is None:
        return target, target
    r = _ratio_value(ratio)
    return (round(math.sqrt(target ** 2 / r) / multiple) * multiple,
            round(math.sqrt(target ** 2 * r) / multiple) * multiple)


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The official ratio closest to width/height; compared in log space, so 2:1 and 1:2 are equally far from 1:1."""
    return min(ASPECT_RATIOS, key=lambda r: abs(math.log(width / height / _ratio_value(r))))


def _ratio_value(ratio: str) -> float:
    w, h = ratio.split(":")
    return int(w) / int(h)


def parse_vid_size(vid_size: str | None) -> tuple[int, int | None]:
    """'81:16' -> (81 frames, 16 fps); '81' -> (81, None: keep the source rate); None -> (1, None): images."""
    if vid_size is None:
        return 1, None
    frames, _, fps = str(vid_size).partition(":")
    return int(frames), int(fps) if fps else None


# ---------------------------------------------------------------------------------------------------------------------
# Shapes

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
          "purple": (140, 50, 170), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
DIRECTIONS = ("left", "right", "up", "down")
_SIZE_PX = {"small": 10, "large": 18}  # across, at 32 px; everything scales with the image side
MOTIONS = ("cross", "wrap", "bounce")  # of videos: see render_shape
WRAP_SPEED = 3  # pixels per frame at 32 px, with motion "wrap"
BOUNCE_SPEED = 3  # pixels per frame at 32 px, with motion "bounce"
LATER = 24  # a continuation clip (ShapesDataset) starts 1 to LATER frames into its motion: more than a period
FROM_START = 0.25  # a clip captioned "from the bottom to the top" (ShapesDataset from_to) starts this near its start


def render_shape(color: str, shape: str, size: str, position: str | None = None, direction: str | None = None,
                 img_size: int = 32, frames: int = 1, offset: tuple[float, float] = (0.5, 0.5),
                 motion: str = "cross", start: int = 0) -> np.ndarray:
    """One shapes sample as uint8 pixels on white: an image (H, W, 3) with the shape at `position`, or a video
    (T, H, W, 3) of the shape moving in `direction`.

    `offset` in [0, 1]^2 places the shape inside its region: for an image, a few pixels of jitter in x and y; for a
    video, offset[0] is where it sits across the direction of motion. Video `motion` "cross": the shape crosses the
    frame from edge to edge in the clip, staying whole; "wrap": it moves WRAP_SPEED pixels per frame (at 32 px) and
    leaves one edge to come back at the opposite one (the frame is a torus), starting at offset[1] along the way, so
    a clip is a window cut at a random time from an endless motion and any window of a long video looks like one;
    "bounce": it moves BOUNCE_SPEED pixels per frame and bounces off the borders (its centre reflected at the ends of
    the range that keeps it a pixel off them), so it stays whole. A bounce clip starts at offset[1] of the way it
    can go in `direction` while its first step is whole (a full step before the border): `direction` is where it
    heads when the clip begins, and a window of a long video is a clip cut at a random time. `start` > 0 (bounce
    only) cuts the clip that many frames later in the same motion, where it may head the other way.
    """
    unit = img_size / 32
    d = round(_SIZE_PX[size] * unit)
    lo, hi = d / 2 + unit, img_size - d / 2 - unit  # range of centres that keeps the shape a pixel off the border
    if frames == 1:
        def place(low_name, high_name, u):
            if position == low_name:
                return lo + 3 * unit * u
            if position == high_name:
                return hi - 3 * unit * u
            return img_size / 2 + 4 * unit * (u - 0.5)
        centres = [(place("left", "right", offset[0]), place("top", "bottom", offset[1]))]
    else:
        if motion not in MOTIONS:
            raise ValueError(f"motion {motion!r}: one of {', '.join(MOTIONS)}")
        if start and motion != "bounce":
            raise ValueError(f"start {start}: only a bouncing motion is cut later")
        across = lo + (hi - lo) * offset[0]
        forward, horizontal = direction in ("right", "down"), direction in ("left", "right")
        if motion == "wrap":  # the shape drawn whole in the middle, then rolled around the frame
            middle = img_size // 2
            still = _draw(color, shape, d, *((middle, across) if horizontal else (across, middle)), img_size)
            step, start = WRAP_SPEED * unit * (1 if forward else -1), int(img_size * offset[1])
            return np.stack([np.roll(still, round(start + step * t - middle), axis=1 if horizontal else 0)
                             for t in range(frames)])
        if motion == "bounce":
            span, step = hi - lo, BOUNCE_SPEED * unit
            walk = np.mod(offset[1] * (span - step) + step * (start + np.arange(frames)), 2 * span)  # unfolded, then
            along = lo + np.where(walk <= span, walk, 2 * span - walk)  # folded: from lo towards hi and back
            along = along if forward else lo + hi - along
        else:
            along = np.linspace(lo, hi, frames) if forward else np.linspace(hi, lo, frames)
        centres = [(a, across) if horizontal else (across, a) for a in along]
    out = [_draw(color, shape, d, cx, cy, img_size) for cx, cy in centres]
    return out[0] if frames == 1 else np.stack(out)


def _draw(color: str, shape: str, d: int, cx: float, cy: float, img_size: int) -> np.ndarray:
    """A white (img_size, img_size, 3) uint8 image with the shape `d` pixels across, centred at (cx, cy)."""
    img = Image.new("RGB", (img_size, img_size), "white")
    x0, y0 = round(cx - d / 2), round(cy - d / 2)
    x1, y1 = x0 + d - 1, y0 + d - 1  # PIL boxes are inclusive: d pixels across
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=COLORS[color])
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=COLORS[color])
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=COLORS[color])
    return np.asarray(img)


def shape_caption(color: str, shape: str, size: str, position: str | None = None, direction: str | None = None,
                  **_layout) -> str:
    """'a small red circle left' for an image, 'a red circle moving up' for a video (the size is not named)."""
    if direction is not None:
        return f"a {color} {shape} moving {direction}"
    return f"a {size} {color} {shape} {position}"


class ShapesDataset:
    """`size` captioned shapes images (or videos when frames > 1); sample i's picture is a pure function of
    (seed, i).  Its caption is the strict grammar, or with phrasing "train" a wording of the same attributes drawn
    from the training phrasings (utils.phrasing) with the sample's random stream, (seed, epoch, i): each epoch words
    it anew, and a resumed run draws the same wordings.

    With `continuation` p > 0 (bouncing videos), a share p of the clips are continuation windows: cut 1 to LATER
    frames into the motion their caption names the start of (render_shape's `start`), so the shape may head the
    other way after a bounce, and only their last frame is to be scored, given the others (`context`): what a
    sliding window samples after its first window, without teaching a first window that heads against its caption.

    `from_to` (videos, phrasing "train"): the share of captions whose direction says where the motion starts and
    ends (utils.phrasing.phrase); such a clip starts where its caption says, in the first FROM_START of its way
    (a person's "from left to right" starts at the left), so its first frame, scored in full, shows the order of
    the words. None draws every wording alike and places every clip alike.

    A horizontal flip would swap "left" and "right" in the captions, so these samples are never flipped.
    """
    flippable = False

    def __init__(self, size: int, img_size: int = 32, frames: int = 1, fps: int = 8, seed: int = 0,
                 phrasing: str = "grammar", motion: str = "cross", continuation: float = 0.0,
                 from_to: float | None = None):
        if continuation and (frames < 2 or motion != "bounce"):
            raise ValueError(f"continuation {continuation}: only for bouncing videos (motion 'bounce', frames > 1)")
        if not 0 <= continuation <= 1:
            raise ValueError(f"continuation {continuation}: a probability in [0, 1]")
        if from_to is not None and (frames < 2 or phrasing != "train" or not 0 <= from_to <= 1):
            raise ValueError(f"from_to {from_to}: a probability in [0, 1], for videos with phrasing 'train'")
        self.continuation, self.from_to = continuation, from_to
        self.size, self.img_size, self.frames, self.fps, self.seed = size, img_size, frames, fps, seed
        self.phrasing = phrasing  # utils.phrasing.phrase: "grammar", or "train" for a wording drawn per epoch
        self.motion = motion  # of videos (render_shape): "cross" the frame once, "wrap" around it, or "bounce"

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> dict:
        """The keyword arguments of `render_shape` (less img_size and frames) for sample `index`."""
        rng = np.random.default_rng([self.seed, index])
        attrs = dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), size=rng.choice(SIZES))
        if self.frames > 1:
            attrs["direction"] = rng.choice(DIRECTIONS)
        else:
            attrs["position"] = rng.choice(POSITIONS)
        attrs["offset"] = tuple(rng.random(2))
        if self.continuation:  # drawn after the rest: the other attributes do not depend on it
            attrs["start"] = int(rng.integers(1, LATER + 1)) if rng.random() < self.continuation else 0
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}

    def context(self, index: int) -> int:
        """Leading frames of sample `index` given rather than scored: all but the last of a continuation clip."""
        return self.frames - 1 if self.attributes(index).get("start") else 0

    def frame_size(self, index: int) -> tuple[int, int]:
        return self.img_size, self.img_size

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
        attrs = self.attributes(index)
        caption = shape_caption(**attrs) if self.phrasing == "grammar" else \
            phrase(attrs, rng, self.phrasing, self.from_to)
        if self.from_to is not None and says_start(caption):
            attrs["offset"] = (attrs["offset"][0], attrs["offset"][1] * FROM_START)
        pixels = render_shape(**attrs, img_size=self.img_size, frames=self.frames, motion=self.motion)
        return pixels, caption, self.fps if self.frames > 1 else 0


# ---------------------------------------------------------------------------------------------------------------------
# Files

def read_video(source: str | Path, frames: int, fps: int | None, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """`frames` frames (T, H, W, 3) of a video at `fps` in time (None: the source's average rate), and that rate.

    The clip starts at a random source frame among those that leave room for the span, and ffmpeg's fps filter
    picks the frames showing at start + k / fps by their timestamps, so a variable-frame-rate clip keeps its timing
    (frames are dropped, or repeated when fps exceeds the source's).  A clip too short for the span is padded by
    repeating its last frame.  Audio tracks are ignored; any size is read as it is.
    """
    with imageio.get_reader(source, "ffmpeg") as reader:
        meta = reader.get_meta_data()
    source_fps, duration = meta["fps"], meta.get("duration") or 0.0
    rate = fps or source_fps
    room = duration - (frames - 1) / rate - 1 / source_fps  # latest start that fits the span
    start = math.floor(rng.uniform(0, room) * source_fps) / source_fps if room > 0 else 0.0
    resample = f"trim=start={max(start - 1e-3, 0):.6f},setpts=PTS-STARTPTS,fps={rate}"
    out, frame = [], None
    with imageio.get_reader(source, "ffmpeg", output_params=["-vf", resample]) as reader:
        for frame in reader:
            out.append(np.asarray(frame))
            if len(out) == frames:
                break
    if frame is None:
        raise ValueError("no frames")
    out += [out[-1]] * (frames - len(out))
    return np.stack(out), rate


def decode(source, video: bool, frames: int, fps: int | None, rng: np.random.Generator, where) -> tuple:
    """(uint8 pixels, fps) of an image (fps 0; as a viewer shows it, see utils.files.read_image) or of `frames`
    video frames at `fps` (see read_video); an unreadable file is a ValueError naming `where`."""
    if not video:
        return read_image(source, where), 0
    try:
        return read_video(source, frames, fps, rng)
    except Exception as err:  # whatever ffmpeg or its metadata make of a broken file: one line naming it
        raise ValueError(f"{where}: not a readable video ({one_line(err)})") from None


def _header_size(path: Path, video: bool) -> tuple[int, int]:
    """(width, height) as displayed, from the file's header (ffmpeg's metadata for a video)."""
    if not video:
        return image_size(path)
    try:
        with imageio.get_reader(path, "ffmpeg") as reader:
            return tuple(reader.get_meta_data()["size"])
    except Exception as err:  # as in decode: one line naming the file
        raise ValueError(f"{path}: not a readable video ({one_line(err)})") from None


class FolderDataset:
    """Captioned pictures (utils.files.IMAGE_EXTS) or, when frames > 1, .mp4 videos anywhere under `root`.

    A caption comes from the sidecar `<stem>.txt` next to the file, else from `captions.jsonl` (lines
    {"file": "relative/path.png", "caption": "..."}) or `captions.csv` (a header row, e.g. file,caption) at the root;
    the names accepted for the two columns and the text encodings read are those of utils.files.  Every file's
    header (ffmpeg metadata for videos) is read once here, so unreadable files fail at the start, not mid-training.
    """
    flippable = True

    def __init__(self, root: str | Path, frames: int = 1, fps: int | None = None):
        self.root, self.frames, self.fps = Path(root), frames, fps
        exts = VIDEO_EXTS if frames > 1 else IMAGE_EXTS
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no {'/'.join(exts)} files in this folder")
        listed = self._caption_index()
        self.captions = []
        for path in self.files:
            sidecar = path.with_suffix(".txt")
            caption = read_text(sidecar).strip() if sidecar.is_file() else listed.get(path)
            if caption is None:
                raise ValueError(f"{path}: no caption (no {sidecar.name} beside it, and not in captions.jsonl/.csv "
                                 f"under {self.root})")
            self.captions.append(caption)
        self.sizes = [_header_size(p, frames > 1) for p in self.files]

    def _caption_index(self) -> dict[Path, str]:
        captions = {}
        for index in (self.root / "captions.csv", self.root / "captions.jsonl"):
            for n, name, caption in read_caption_table(index) if index.is_file() else []:
                path = self.root / name.strip()
                if not path.is_file():  # a table written on Windows names sub\img.png
                    path = self.root / name.strip().replace("\\", "/")
                if not path.is_file():
                    raise FileNotFoundError(f"{index}:{n}: names {path}, which does not exist")
                captions[path] = caption.strip()
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def frame_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
        path = self.files[index]
        pixels, fps = decode(path, self.frames > 1, self.frames, self.fps, rng, where=path)
        return pixels, self.captions[index], round(fps)


# ---------------------------------------------------------------------------------------------------------------------
# Pixels to tensors

class Transform:
    """uint8 pixels -> float [-1, 1]: center-crop to the bucket's aspect ratio, resize (antialiased), maybe flip.

    With mix_aspect the size is `aspect_ratio_to_image_size(img_size, ratio, multiple)`; without it every sample is
    a center square resized to img_size x img_size and the ratio is "1:1".
    """

    def __init__(self, img_size: int, multiple: int = 8, mix_aspect: bool = False, flip: bool = False):
        self.img_size, self.multiple, self.mix_aspect, self.flip = img_size, multiple, mix_aspect, flip

    def bucket(self, width: int, height: int) -> str:
        return nearest_aspect_ratio(width, height) if self.mix_aspect else "1:1"

    def __call__(self, pixels: np.ndarray, ratio: str, rng: np.random.Generator) -> torch.Tensor:
        h, w = (aspect_ratio_to_image_size(self.img_size, ratio, self.multiple) if self.mix_aspect
                else (self.img_size, self.img_size))
        video = pixels.ndim == 4
        frames = pixels if video else pixels[None]  # (T, H0, W0, 3)
        out = np.stack([_crop_resize(f, h, w) for f in frames])  # (T, h, w, 3)
        if self.flip and rng.random() < 0.5:
            out = out[:, :, ::-1]  # the same flip for every frame of a video
        x = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h, w)
        return x if video else x[0]


def _crop_resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """The largest centered crop of aspect w/h, resized to (h, w); PIL filters with a wider support when shrinking."""
    H, W = frame.shape[:2]
    if (h, w) == (H, W):
        return frame
    cw, ch = min(W, H * w / h), min(H, W * h / w)
    box = ((W - cw) / 2, (H - ch) / 2, (W + cw) / 2, (H + ch) / 2)
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC, box=box))


@dataclasses.dataclass
class Unreadable:
    """A sample that could not be loaded, with the one-line reason naming its file.  Loading errors travel from
    DataLoader workers as this value, and Loader raises them as ValueError in the training process, so that the user
    reads the same line with any --num_workers (a worker's own exception would arrive wrapped in its traceback)."""
    reason: str


def _collate(items: list) -> "tuple[torch.Tensor, list[str], dict] | Unreadable":
    """[(x, caption, fps, index, ratio[, context])] -> (x (B, ...), captions, meta); a batch holds one ratio."""
    failed = next((item for item in items if isinstance(item, Unreadable)), None)
    if failed is not None:
        return failed
    x, captions, fps, index, ratios = zip(*(item[:5] for item in items))
    context = [item[5] if len(item) > 5 else 0 for item in items]
    return torch.stack(x), list(captions), {"fps": torch.tensor(fps, dtype=torch.long), "aspect_ratio": ratios[0],
                                            "index": torch.tensor(index, dtype=torch.long),
                                            "context": torch.tensor(context, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------------------------
# Map-style sources: exact resume

class BucketBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of each global batch; every global batch holds one aspect-ratio bucket.

    Each epoch shuffles all indices from (seed, epoch) and deals them into their buckets in that order; a bucket
    that fills becomes the next global batch and the leftovers are dropped, so every rank walks the same sequence of
    buckets and the epoch length does not depend on the shuffle. Rank r takes items [r*b, (r+1)*b) of each global
    batch. The batches are lists of keys (index, epoch, ratio): everything a worker needs to make the sample.
    Setting `start` skips that many batches of the epoch without touching the data.
    """

    def __init__(self, buckets: list[str], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start = 0

    def __len__(self) -> int:
        return sum(n // (self.batch_size * self.world_size) for n in Counter(self.buckets).values())

    def global_batches(self, epoch: int):
        pending, size = defaultdict(list), self.batch_size * self.world_size
        for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.buckets)).tolist():
            batch = pending[self.buckets[i]]
            batch.append(i)
            if len(batch) == size:
                yield pending.pop(self.buckets[i])

    def __iter__(self):
        b = self.batch_size
        for batch in itertools.islice(self.global_batches(self.epoch), self.start, None):
            ratio = self.buckets[batch[0]]
            yield [(i, self.epoch, ratio) for i in batch[self.rank * b:(self.rank + 1) * b]]


class _Samples(torch.utils.data.Dataset):
    """A map-style source behind the batch sampler: key (index, epoch, ratio) -> (x, caption, fps, index, ratio).

    The random augmentations (flip, video start) draw from (seed, epoch, index) alone, so a sample comes out the
    same in any worker and after a resume.
    """

    def __init__(self, source, transform: Transform, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __getitem__(self, key):
        index, epoch, ratio = key
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            pixels, caption, fps = self.source.load(index, rng)
        except ValueError as err:  # names the file (see Unreadable)
            return Unreadable(str(err))
        context = self.source.context(index) if hasattr(self.source, "context") else 0
        return self.transform(pixels, ratio, rng), caption, fps, index, ratio, context


class Loader:
    """Epochs of batches (x, captions, meta) for one rank, with a position that survives a restart.

    Iterating yields the rest of the current epoch, then moves on to the next one; a loop left early continues from
    where it stopped. `set_epoch(e)` starts epoch e from its first batch (a no-op when e is the current epoch, so a
    loaded position survives the trainer's usual set_epoch call). `state_dict()` is {"epoch", "batches": batches
    already yielded in that epoch}; a new loader given it by `load_state_dict` yields exactly the remaining batches.
    Map-style sources (shapes, folder) skip at the sampler and decode nothing that is skipped; tar shards are
    re-read from the epoch's start and the skipped batches decoded and dropped, which reproduces the same batches
    only when the shards and worker count are unchanged.
    """

    def __init__(self, batches_per_epoch: int, epoch_batches):
        self.batches_per_epoch, self.epoch_batches = batches_per_epoch, epoch_batches
        self.epoch = self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.position}

    def load_state_dict(self, state: dict):
        """A position at the end of an epoch (what a finished run saves) is the start of the next one."""
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        epoch = self.epoch
        for batch in self.epoch_batches(epoch, self.position):
            if isinstance(batch, Unreadable):
                raise ValueError(batch.reason)
            self.position += 1
            yield batch
        self.epoch, self.position = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------------
# Tar shards: a stream

def shard_sample(sample: dict, video: bool) -> tuple[bytes, str, str]:
    """(media bytes, caption, where) of one WebDataset sample: its image member (utils.files.IMAGE_EXTS; .mp4 for
    video) and its caption from a .txt member or a .json {"caption": ...}; `where` names the shard and the key.
    Raises ValueError naming them when a member is missing or unreadable."""
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    exts = VIDEO_EXTS if video else IMAGE_EXTS
    members = {k.rsplit(".", 1)[-1].lower(): k for k in sample if not k.startswith("__")}
    media = next((members[e[1:]] for e in exts if e[1:] in members), None)
    if media is None:
        raise ValueError(f"{where}: no {'/'.join(exts)} member (it has: {', '.join(members.values())})")
    caption = None
    if "json" in members:
        try:
            caption = json.loads(decode_text(sample[members["json"]], f"{where}.{members['json']}"))["caption"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where}: {members['json']} is not a JSON object with a \"caption\"") from None
    if "txt" in members:
        caption = decode_text(sample[members["txt"]], f"{where}.{members['txt']}")
    if caption is None:
        raise ValueError(f"{where}: no caption (a .txt member, or .json with a \"caption\" field)")
    return sample[media], caption, where


def decode_bytes(media: bytes, frames: int, fps: int | None, rng: np.random.Generator, where) -> tuple:
    """`decode` of a file's bytes (an image, or `frames` > 1 video frames)."""
    if frames > 1:
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:  # ffmpeg reads files, not bytes
            f.write(media)
            f.flush()
            return decode(f.name, True, frames, fps, rng, where)
    return decode(io.BytesIO(media), False, 1, None, rng, where)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless one-bucket batches from tar shards: members <key>.png|jpg|... (utils.files.IMAGE_EXTS; <key>.mp4 for
    video) with <key>.txt or <key>.json ({"caption": ...}).  As in webdataset, a member's key is its path up to the
    first dot of its base name and the rest is its extension, so `a.b.png` is member `b.png` of sample `a`: members
    are matched by their last suffix.

    The caller gives each rank its own shards; each DataLoader worker takes every num_workers-th of them and buckets
    its own samples, emitting a batch when a bucket fills. Shard order and a small sample buffer are shuffled from
    (seed, epoch, worker, pass). Ranks may be at different ratios at the same step; the model does not mind.
    """
    buffer = 200  # samples held for shuffling, as raw bytes

    def __init__(self, shards: list[str], batch_size: int, transform: Transform, frames: int, fps: int | None,
                 seed: int, epoch: int):
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.frames, self.fps, self.seed, self.epoch = frames, fps, seed, epoch

    def _decode(self, sample: dict) -> tuple:
        media, caption, where = shard_sample(sample, self.frames > 1)
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(where.encode())])
        pixels, fps = decode_bytes(media, self.frames, self.fps, rng, where)
        ratio = self.transform.bucket(pixels.shape[-2], pixels.shape[-3])
        return self.transform(pixels, ratio, rng), caption.strip(), round(fps), -1, ratio

    def __iter__(self):
        """Batches, or one Unreadable naming the shard (and sample) that could not be read, then the end."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.shards[worker::workers]
        if not shards:  # more workers than this rank's shards
            return
        try:
            yield from self._batches(shards, worker)
        except ValueError as err:  # a sample: names its shard and key
            yield Unreadable(str(err))
        except (OSError, tarfile.TarError) as err:  # a shard that is not a readable tar file
            yield Unreadable(f"shards {', '.join(shards)}: not readable as tar files ({one_line(err)})")

    def _batches(self, shards: list[str], worker: int):
        import webdataset as wds  # imported here: it takes a second, and only this source needs it

        pending = defaultdict(list)
        for rnd in itertools.count():
            order = np.random.default_rng([self.seed, self.epoch, worker, rnd]).permutation(len(shards))
            samples = wds.tarfile_to_samples()([{"url": shards[j]} for j in order])
            rng = random.Random(f"{self.seed}/{self.epoch}/{worker}/{rnd}")
            samples = wds.shuffle(self.buffer, self.buffer // 2, rng=rng)(samples)
            seen = False
            for sample in samples:
                seen = True
                item = self._decode(sample)
                pending[item[-1]].append(item)
                if len(pending[item[-1]]) == self.batch_size:
                    yield _collate(pending.pop(item[-1]))
            if not seen:
                raise ValueError(f"no samples in shards {', '.join(shards)}")


def shard_list(data: str | Path) -> list[str]:
    """The .tar files in a folder, or those a brace pattern such as shard-{000000..000003}.tar names."""
    import braceexpand  # a webdataset dependency

    path = Path(data)
    shards = sorted(map(str, path.rglob("*.tar"))) if path.is_dir() else list(braceexpand.braceexpand(str(data)))
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"--data {data}: " + (f"shard {missing[0]} does not exist" if missing
                                                      else "no .tar shards in this folder"))
    return shards


# ---------------------------------------------------------------------------------------------------------------------

def build_loader(args, rank: int = 0, world_size: int = 1, multiple: int = 8, num_workers: int = 0) -> Loader:
    """The training batches of rank `rank` for `args.dataset` (shapes, folder or webdataset).

    `args.batch_size` is the global batch; each rank gets batch_size / world_size. An epoch is one pass over a
    folder, `args.epoch_length` shapes, or `args.epoch_length` samples' worth of batches from the shard stream.
    `multiple` is what both sides of a bucket's size must divide by (the VAE's downsampling times the patch size).
    """
    if args.batch_size % world_size:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by the {world_size} ranks")
    batch_size, seed = args.batch_size // world_size, args.train_seed or 0
    frames, fps = parse_vid_size(args.vid_size)
    transform = Transform(args.img_size, multiple, bool(args.mix_aspect), flip=not args.no_flip)

    if args.dataset == "webdataset":
        shards, steps = shard_list(args.data)[rank::world_size], args.epoch_length // args.batch_size
        if not shards:
            raise ValueError(f"--data {args.data}: fewer shards than the {world_size} ranks")
        if not steps:
            raise ValueError(f"--epoch_length {args.epoch_length} is less than one global batch ({args.batch_size})")

        def stream_batches(epoch, start):
            stream = ShardStream(shards, batch_size, transform, frames, fps, seed, epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                 collate_fn=_identity)
            return itertools.islice(loader, start, steps)

        return Loader(steps, stream_batches)

    if args.dataset == "shapes":
        source = ShapesDataset(args.epoch_length, args.img_size, frames, fps or 8, phrasing=args.shapes_phrasing,
                               motion=args.shapes_motion, continuation=args.shapes_continuation,
                               from_to=args.shapes_from_to)
    elif args.dataset == "folder":
        source = FolderDataset(args.data, frames, fps)
    else:
        raise ValueError(f"--dataset {args.dataset!r}: expected shapes, folder or webdataset")
    transform.flip = transform.flip and source.flippable
    buckets = [transform.bucket(*source.frame_size(i)) for i in range(len(source))]
    sampler = BucketBatchSampler(buckets, batch_size, rank, world_size, seed)
    if not len(sampler):
        raise ValueError(f"{len(source)} samples do not fill one global batch of {args.batch_size}"
                         + (" in any aspect-ratio bucket" if args.mix_aspect else ""))
    loader = torch.utils.data.DataLoader(_Samples(source, transform, seed), batch_sampler=sampler,
                                         num_workers=num_workers, collate_fn=_collate,
                                         persistent_workers=num_workers > 0)

    def epoch_batches(epoch, start):
        sampler.epoch, sampler.start = epoch, start  # read when the DataLoader starts iterating its batch sampler
        return iter(loader)

    return Loader(len(sampler), epoch_batches)


def _identity(batch):
    """The stream batches itself; a module-level function so that DataLoader workers can pickle it."""
    return batch
