"""Caption accuracy of generated shapes: measure colour, shape, size and position (direction for videos) from the
pixels and compare them with the caption each sample was generated from.

    python -m scripts.eval_shapes --make_captions prompts.txt [--video 1] [--n N] [--seed S]
    python sample.py --checkpoint_path logs/run/model.safetensors --caption prompts.txt --save_folder 1
    python -m scripts.eval_shapes --captions prompts.txt --samples logs/run/model/prompts [--json acc.json]
    python -m scripts.eval_shapes --captions prompts.txt --samples DIR --long 1   # long videos: coherence over time
    python -m scripts.eval_shapes --captions mine.txt --attributes mine.jsonl --samples DIR  # any wording

With --attributes, line i of a JSON Lines file gives caption i's attributes ({"color": "red", "shape": "circle",
"size": "small", "position": "left"}, or {"color", "shape", "direction"} for a video) instead of reading them from
the caption: captions in words the reader does not know (people's own phrasings) are scored too.

Line i of the caption file goes with <samples>/<i:05d>.png (.mp4 for a video caption), as sample.py names them.
The measurements read the shapes that dataset.render_shape draws on white; they tolerate the mild noise and blur of
generated samples by keeping only the largest connected blob of clearly non-white pixels.
"""
import argparse
import itertools
import json
import sys
from collections import Counter, deque
from pathlib import Path

import numpy as np

from dataset import _SIZE_PX, COLORS, DIRECTIONS, POSITIONS, SHAPES, SIZES
from utils import phrasing

IMAGE_ATTRS = ("color", "shape", "size", "position")
VIDEO_ATTRS = ("color", "shape", "direction")
INK = 60  # a pixel is foreground when some channel is this far below white
SQUARE_FILL = 0.84  # share of the bounding box covered (coverage_shape): square 0.87-0.99, circle 0.66-0.80
TRIANGLE_LOW = 0.07  # centroid below the middle, in heights (coverage_shape): triangle 0.11-0.16, others under 0.03
CENTER_RADIUS = 2.5  # in 32-px units: centred shapes sit within 2 px of the middle, the others at least 3 px off
MIN_SPEED = 1.0  # pixels per frame at 32 px: slower is not a motion (the shapes move 3 or ~4.5 px per frame)
WALL = 6.0  # pixels at 32 px: a shape this close to a border may bounce off it (it turns 1 to 4 px from it)
JITTER = 1.0  # pixels at 32 px: sideways wobble allowed in a bounce's short step (centres are read to 0.5 px)
AXES = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}  # direction: (axis of (x, y), sign)


ALLOWED = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "position": POSITIONS, "direction": DIRECTIONS}


def parse_caption(text: str) -> dict:
    """The attributes a caption asks for, in any wording (utils.phrasing.parse_caption): {color, shape, size,
    position} for an image, {color, shape, direction} for a video.  Raises ValueError naming what is missing."""
    return phrasing.parse_caption(text)


def read_attributes(path: Path, n: int) -> list[dict]:
    """The attributes of n captions from a JSON Lines file (one object per caption: color, shape, size, position for
    an image; color, shape, direction for a video, where a size is allowed and ignored).  Raises ValueError naming
    the file, line and key of the first problem, FileNotFoundError if there is no such file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--attributes {path}: no such file")
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != n:
        raise ValueError(f"--attributes {path}: {len(lines)} lines of attributes for {n} captions")
    targets = []
    for i, line in enumerate(lines, 1):
        try:
            attrs = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--attributes {path} line {i}: not JSON ({err.msg})") from None
        keys = VIDEO_ATTRS if isinstance(attrs, dict) and "direction" in attrs else IMAGE_ATTRS
        if not isinstance(attrs, dict) or set(attrs) - set(keys) - {"size"} or set(keys) - set(attrs):
            raise ValueError(f"--attributes {path} line {i}: expected an object with the keys {', '.join(keys)}")
        for key in keys:
            if attrs[key] not in ALLOWED[key]:
                raise ValueError(f"--attributes {path} line {i}: {key} {attrs[key]!r} is not one of "
                                 f"{', '.join(ALLOWED[key])}")
        targets.append({k: attrs[k] for k in keys})
    return targets


def targets_of(captions: list[str], targets: list[dict] | None = None) -> list[dict]:
    """What each caption asks for: `targets` when given (read_attributes), else read from the caption; ValueError
    naming the caption line that cannot be read."""
    if targets is not None:
        if len(targets) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(targets)} sets of attributes")
        return targets
    found = []
    for i, text in enumerate(captions):
        try:
            found.append(parse_caption(text))
        except ValueError as err:
            raise ValueError(f"caption line {i + 1}: {err}") from None
    return found


def ink(pixels: np.ndarray) -> np.ndarray:
    """(H, W): how far each pixel is from white, as its largest channel distance from 255."""
    return (255 - pixels.astype(np.int16)).max(-1)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (H, W); all False when the mask is."""
    seen = np.zeros_like(mask)
    best = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def shape_mask(pixels: np.ndarray, blob: np.ndarray | None = None) -> np.ndarray:
    """Mask (H, W) of the shape in an image (H, W, 3) uint8: the largest blob of clearly non-white pixels (`blob`,
    when the caller has it), cut at half its typical ink so that edges smeared by blur or video compression count as
    half in, half out."""
    amount = ink(pixels)
    blob = largest_blob(amount > INK) if blob is None else blob
    if not blob.any():
        return blob
    return largest_blob(blob & (amount > 0.5 * np.percentile(amount[blob], 90)))


def coverage_shape(amount: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(fill, low) of a shape from each pixel's coverage: its ink (H, W) over the shape's full ink (the 90th
    percentile over `mask`), within a pixel of the mask.  fill: the share of its bounding box it covers, the box's
    width and height being the sums of the columns' and rows' largest coverage; low: how far its centroid sits below
    the middle of its rows, in heights.  A shape whose edges fall between pixels (where a generated one may sit)
    counts its edge pixels as the part it covers: a square fills 1.0 of its box wherever it sits (a thresholded mask
    gives a 10-px square half a pixel off 100 of 110 pixels), a circle about 0.79; a triangle (apex up, as
    dataset.render_shape draws it) has its centroid a sixth of its height low, circles and squares none."""
    near = np.pad(mask, 1)
    near = np.logical_or.reduce([near[1 + dy:near.shape[0] - 1 + dy, 1 + dx:near.shape[1] - 1 + dx]
                                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    cover = np.where(near, np.clip(amount / np.percentile(amount[mask], 90), 0, 1), 0.0)
    rows, ys = cover.max(1), np.arange(cover.shape[0])
    fill = cover.sum() / (cover.max(0).sum() * rows.sum())
    low = ((ys * cover.sum(1)).sum() / cover.sum() - (ys * rows).sum() / rows.sum()) / rows.sum()
    return float(fill), float(low)


def nearest_color(rgb: np.ndarray) -> str:
    """The named colour closest to `rgb`, or to any mix of it with white (a faded or blurred shape)."""
    def distance(name):
        c = np.array(COLORS[name], np.float64)
        a = np.clip(np.dot(255 - rgb, 255 - c) / np.dot(255 - c, 255 - c), 0, 1)  # how much of c, against white
        return np.sum((rgb - (255 + a * (c - 255))) ** 2)
    return min(COLORS, key=distance)


def wrap_shift(inked: np.ndarray, blob: np.ndarray) -> tuple[int, int]:
    """(dy, dx): the roll that makes a shape cut by the frame's edges whole again.  A video whose shape wraps around
    the frame (dataset.render_shape's motion "wrap") shows it in two parts at opposite edges; the roll moves the
    widest run of empty rows / columns to the edges.  `inked` (H, W): the clearly non-white pixels; `blob`: their
    largest blob.  (0, 0) when the blob touches no edge, or the opposite edge holds no ink."""
    if not blob.any():
        return 0, 0

    def roll(cut: bool, used: np.ndarray) -> int:  # used: (n,) lines holding ink
        if not cut or used.all():
            return 0
        n, best, start = len(used), (0, 0), None
        for i in range(2 * n):  # the longest circular run of empty lines
            if not used[i % n]:
                start = i if start is None else start
                if i - start + 1 > best[0] and i - start + 1 <= n:
                    best = (i - start + 1, start)
            else:
                start = None
        length, first = best
        return (-(first + length // 2)) % n  # that run's middle goes to line 0

    dy = roll((blob[0].any() and inked[-1].any()) or (blob[-1].any() and inked[0].any()), inked.any(1))
    dx = roll((blob[:, 0].any() and inked[:, -1].any()) or (blob[:, -1].any() and inked[:, 0].any()), inked.any(0))
    return dy, dx


def measure_image(pixels: np.ndarray, wrap: bool = True) -> dict:
    """Attributes of the shape in one image (H, W, 3) uint8: color, shape, size, position, its centre (x, y) and
    extent (width, height) in pixels. Every value is None when the image holds no shape.  A shape cut by the edges (a wrapping video) is
    measured whole (wrap_shift); its centre is given back in the frame's coordinates."""
    amount = ink(pixels)
    inked = amount > INK
    blob = largest_blob(inked)  # shared by the wrap test and the mask: the blob search is the slow part
    dy, dx = wrap_shift(inked, blob) if wrap else (0, 0)
    if dy or dx:
        found = measure_image(np.roll(pixels, (dy, dx), axis=(0, 1)), wrap=False)
        if found["center"] is not None:
            h, w = pixels.shape[:2]
            found["center"] = ((found["center"][0] - dx) % w, (found["center"][1] - dy) % h)
        return found
    mask = shape_mask(pixels, blob)
    if not mask.any():
        return dict(color=None, shape=None, size=None, position=None, center=None, extent=None)
    side, unit = pixels.shape[1], pixels.shape[1] / 32
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    inner = amount[mask]
    core = pixels[mask][inner >= np.median(inner)]  # the inner half: edges are mixed with the background
    color = nearest_color(np.median(core.astype(np.float64), axis=0))
    fill, low = coverage_shape(amount, mask)
    shape = "triangle" if low > TRIANGLE_LOW else "square" if fill > SQUARE_FILL else "circle"
    size = "large" if max(w, h) > unit * (_SIZE_PX["small"] + _SIZE_PX["large"]) / 2 else "small"
    # The bounding box's centre, not the centroid: a triangle's mass sits low in its box.
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    dx, dy = cx - side / 2, cy - pixels.shape[0] / 2
    if max(abs(dx), abs(dy)) < CENTER_RADIUS * unit:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return dict(color=color, shape=shape, size=size, position=position, center=(float(cx), float(cy)),
                extent=(int(w), int(h)))


def steps(per_frame: list[dict], size: tuple[int, int]) -> list[tuple[float, float] | None]:
    """(dx, dy) in pixels from each frame's shape to the next's (None where either frame shows none), the shorter
    way around the frame (H, W) = `size`, so a shape that wraps around moves a few pixels, not the frame's width."""
    h, w = size
    out = []
    for a, b in zip(per_frame, per_frame[1:]):
        if a["center"] is None or b["center"] is None:
            out.append(None)
            continue
        dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
        out.append(((dx + w / 2) % w - w / 2, (dy + h / 2) % h - h / 2))
    return out


def direction_of(dx: float, dy: float, frames: int, unit: float) -> str | None:
    """The direction of a displacement (dx, dy) over `frames` frame steps; None when it is under MIN_SPEED pixels
    per step (at 32 px, `unit` pixels per 32-px unit) along its main axis: a shape that stays, or jitters, is not
    moving."""
    if max(abs(dx), abs(dy)) < MIN_SPEED * unit * max(frames, 1):
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def walk(per_frame: list[dict], moves: list, direction: str, size: tuple[int, int]) -> tuple[list[bool], list[int]]:
    """Follow a shape heading in `direction` step by step, bouncing off the borders (dataset.render_shape's motion
    "bounce"): (whether each step keeps the heading, the indices of the steps that bounce).

    A step keeps the heading when it moves at least MIN_SPEED pixels (at 32 px) along it, and more along it than
    across. A bounce is excepted where the last step went towards a border and the shape, whole, is within WALL
    pixels of it: a step that moves back (the heading turns), or one that stalls there, once, before moving back.
    There a step may also move up to JITTER pixels sideways, however little it moves along: a bounce's step is
    short along the heading (the data's shape turns anywhere from a step before the border to a step back from it),
    and a generated shape's centre, read to the half pixel, wobbles a pixel sideways in 6% of all the steps of the
    shipped video model's clips (the data's never does), which keep the heading where they move 3 px along it.
    `per_frame[i]` is the frame before `moves[i]` (measure_image), `size` the frame's (H, W)."""
    axis, sign = AXES[direction]
    unit, side = size[1] / 32, size[1 - axis]
    good, bounces, stalled, toward = [], [], False, False  # toward: the last step went towards the heading's border
    for before, m in zip(per_frame, moves):
        if m is None:
            good.append(False)
            stalled = toward = False
            continue
        along, across = m[axis], abs(m[1 - axis])
        wall = False
        if before["center"] is not None and (toward or stalled):
            lead = before["center"][axis] + sign * before["extent"][axis] / 2  # its edge on the heading side
            wall = 0 <= (side - lead if sign > 0 else lead) <= WALL * unit  # near it, and whole (not wrapping)
        step_toward = sign * along > 0
        straight = abs(along) > across or (wall and across <= JITTER * unit)
        if sign * along >= MIN_SPEED * unit and straight:
            good.append(True)
            stalled = False
        elif wall and -sign * along >= MIN_SPEED * unit and straight:  # back off the border
            good.append(True)
            bounces.append(len(good) - 1)
            sign, stalled, step_toward = -sign, False, True
        elif wall and not stalled and abs(along) < MIN_SPEED * unit and across <= JITTER * unit:  # turning there
            good.append(True)
            stalled = True
        else:
            good.append(False)
            stalled = False
        toward = step_toward
    return good, bounces


def measure_video(frames: np.ndarray) -> dict:
    """Attributes of the moving shape in a video (T, H, W, 3) uint8: color and shape by majority over the frames,
    direction from the shape's displacement summed over the steps between frames that show it (steps), or None
    when it moves less than MIN_SPEED pixels per frame. A shape that bounces off a border (walk) is heading where it
    went before the first bounce, as the caption of a bouncing clip says (dataset.render_shape)."""
    per_frame = [measure_image(f) for f in frames]
    shown = [m for m in per_frame if m["center"] is not None]
    if not shown:
        return dict(color=None, shape=None, direction=None)

    def majority(key):
        return Counter(m[key] for m in shown).most_common(1)[0][0]

    moves, unit = steps(shown, frames.shape[1:3]), frames.shape[2] / 32
    direction = direction_of(sum(m[0] for m in moves), sum(m[1] for m in moves), len(moves), unit)
    first = next(filter(None, (direction_of(*m, 1, unit) for m in moves)), None)  # the first step that moves
    bounces = walk(shown, moves, first, frames.shape[1:3])[1] if first else []
    if bounces and bounces[0] > 0:  # the steps before the first bounce
        before = moves[:bounces[0]]
        direction = direction_of(sum(m[0] for m in before), sum(m[1] for m in before), len(before),
                                 unit) or direction
    return dict(color=majority("color"), shape=majority("shape"), direction=direction)


def measure_long_video(frames: np.ndarray, direction: str | None = None) -> dict:
    """Coherence of a long video (T, H, W, 3) uint8, frame by frame (issue "long videos"):
    presence: share of frames that show a shape; color_stable / shape_stable: share of frames whose colour / shape
    equal the first frame's (a frame without a shape counts as a change); motion_consistent: whether every step
    between frames moves at least MIN_SPEED pixels (at 32 px) in the clip's direction (`direction`, default the
    first step's) and more along it than across it, bounces off a border excepted (walk); consistent_steps: the
    share of such steps; bounces: how many steps bounced; background_drift:
    the largest distance (RGB, 0-255) of a frame's mean background colour from the first frame's."""
    per_frame = [measure_image(f) for f in frames]
    first, n, unit = per_frame[0], len(frames), frames.shape[2] / 32
    moves = steps(per_frame, frames.shape[1:3])
    if direction is None and moves and moves[0] is not None:
        direction = direction_of(*moves[0], 1, unit)
    good, bounces = walk(per_frame, moves, direction, frames.shape[1:3]) if direction else ([False] * len(moves), [])
    background = []
    for f in frames:
        clear = ink(f) < INK // 2  # clearly background, away from the shape's blurred edge
        background.append(f[clear].reshape(-1, 3).mean(0) if clear.any() else np.zeros(3))
    drift = max(float(np.linalg.norm(b - background[0])) for b in background)
    return dict(presence=sum(m["center"] is not None for m in per_frame) / n,
                color_stable=sum(first["color"] is not None and m["color"] == first["color"] for m in per_frame) / n,
                shape_stable=sum(first["shape"] is not None and m["shape"] == first["shape"] for m in per_frame) / n,
                motion_consistent=bool(good) and all(good), consistent_steps=sum(good) / max(len(good), 1),
                bounces=len(bounces), background_drift=drift)


def evaluate_long(captions: list[str], files: list, targets: list[dict] | None = None) -> dict:
    """measure_long_video over videos `files` (paths or (T, H, W, 3) arrays) generated from video `captions` (the
    caption's direction, or that of its `targets`, is the one the motion must keep).  Returns {"n", "frames": T of the first, "presence",
    "color_stable", "shape_stable", "consistent_steps", "bounces" (means over the videos), "motion_consistent" (share
    of videos), "background_drift" (mean and max), "samples": [per-video dicts with the caption]}."""
    if len(captions) != len(files) or not captions:
        raise ValueError(f"{len(captions)} captions but {len(files)} videos")
    samples = []
    for text, source, given in zip(captions, files, targets or [None] * len(captions)):
        target = given or phrasing.parse_caption(text, video=True)
        pixels = read_sample(Path(source)) if isinstance(source, (str, Path)) else np.asarray(source)
        samples.append(dict(caption=text, frames=len(pixels), **measure_long_video(pixels, target["direction"])))
    mean = lambda key: float(np.mean([s[key] for s in samples]))
    return dict(n=len(samples), frames=samples[0]["frames"],
                **{k: mean(k) for k in ("presence", "color_stable", "shape_stable", "consistent_steps",
                                        "motion_consistent", "bounces")},
                background_drift=dict(mean=mean("background_drift"),
                                      max=max(s["background_drift"] for s in samples)), samples=samples)


def read_sample(path: Path) -> np.ndarray:
    """Pixels of a PNG (H, W, 3) or the frames of an MP4 (T, H, W, 3), uint8."""
    if path.suffix == ".mp4":
        import imageio.v3 as iio
        return np.stack([np.asarray(f)[..., :3] for f in iio.imiter(path, plugin="FFMPEG")])
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def sample_files(captions: list[str], folder: Path, targets: list[dict] | None = None) -> list[Path]:
    """<folder>/<i:05d>.png, or .mp4 for a video caption; FileNotFoundError naming the first one missing."""
    files = [folder / f"{i:05d}{'.mp4' if 'direction' in t else '.png'}"
             for i, t in enumerate(targets_of(captions, targets))]
    written = folder.with_name(folder.name + ".captions.txt")  # sample.py --save_folder 1: the captions it sampled
    if written.is_file() and written.read_text(encoding="utf-8").splitlines() != list(captions):
        raise ValueError(f"{folder} holds samples of other captions than these ({written} differs)")
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing}: no such sample ({len(captions)} captions need {len(captions)} files)")
    return files


def evaluate(captions: list[str], files: list, targets: list[dict] | None = None) -> dict:
    """Accuracy of samples `files` (paths, or pixel arrays) against their `captions` (or, when given, the
    attributes `targets`, one dict per caption), which must be all image or all video captions.

    Returns {"kind": "image"|"video", "n", "correct": {attr: count, "all": count},
    "accuracy": {attr: fraction, "all": fraction}, "samples": [{"caption", "measured", "wrong": [attrs]}],
    "held_out_words": {"n": captions holding a word of utils.phrasing.HELD_OUT_WORDS, "all": those all right}}.
    """
    if len(captions) != len(files):
        raise ValueError(f"{len(captions)} captions but {len(files)} samples")
    if not captions:
        raise ValueError("no captions to evaluate")
    targets = targets_of(captions, targets)
    video = "direction" in targets[0]
    if any(("direction" in t) != video for t in targets):
        raise ValueError("the captions mix images and videos; evaluate them separately")
    attrs = VIDEO_ATTRS if video else IMAGE_ATTRS
    correct = Counter({k: 0 for k in (*attrs, "all")})
    samples = []
    for text, target, source in zip(captions, targets, files):
        pixels = read_sample(Path(source)) if isinstance(source, (str, Path)) else np.asarray(source)
        measured = measure_video(pixels) if video else measure_image(pixels)
        wrong = [k for k in attrs if measured[k] != target[k]]
        correct.update(k for k in attrs if k not in wrong)
        correct["all"] += not wrong
        samples.append(dict(caption=text, measured={k: measured[k] for k in attrs}, wrong=wrong))
    n = len(captions)
    unseen = [s for s in samples if phrasing.held_out_words(s["caption"])]
    return dict(kind="video" if video else "image", n=n, correct=dict(correct),
                accuracy={k: v / n for k, v in correct.items()}, samples=samples,
                held_out_words=dict(n=len(unseen), all=sum(not s["wrong"] for s in unseen)))


def make_captions(n: int, video: bool, seed: int, split: str = "grammar") -> list[str]:
    """n captions cycling through every colour x shape pair, each with a random size and position (image) or a
    random direction (video), worded by the strict grammar, a training phrasing or a held-out one
    (utils.phrasing)."""
    return [caption for caption, _ in make_cases(n, video, seed, split)]


def make_cases(n: int, video: bool, seed: int, split: str = "grammar") -> list[tuple[str, dict]]:
    """make_captions' captions with the attributes each was worded from: [(caption, attributes)]."""
    rng = np.random.default_rng(seed)
    pairs = itertools.cycle(itertools.product(COLORS, SHAPES))
    captions = []
    for color, shape in itertools.islice(pairs, n):  # (the grammar's draws are those of earlier versions)
        if video:
            attrs = dict(color=color, shape=shape, direction=rng.choice(DIRECTIONS).item())
            attrs["size"] = rng.choice(SIZES).item() if split != "grammar" else "small"  # phrasings may name it
        else:
            attrs = dict(color=color, shape=shape, size=rng.choice(SIZES).item(), position=rng.choice(POSITIONS).item())
        captions.append((phrasing.phrase(attrs, rng, split), {k: attrs[k] for k in VIDEO_ATTRS if video} or
                         {k: attrs[k] for k in IMAGE_ATTRS}))
    return captions


def report(result: dict) -> str:
    n, attrs = result["n"], VIDEO_ATTRS if result["kind"] == "video" else IMAGE_ATTRS
    lines = [f"{result['kind']} samples: {n}"]
    for k in (*attrs, "all"):
        lines.append(f"  {k:<9} {result['accuracy'][k]:6.1%}  ({result['correct'][k]}/{n})")
    unseen = result.get("held_out_words", {})
    if unseen.get("n"):
        lines.append(f"  captions with a held-out word (utils.phrasing.HELD_OUT_WORDS): all right in "
                     f"{unseen['all'] / unseen['n']:.1%} ({unseen['all']}/{unseen['n']})")
    return "\n".join(lines)


def report_long(result: dict) -> str:
    drift = result["background_drift"]
    return "\n".join([f"videos: {result['n']} of {result['frames']} frames",
                      f"  presence           {result['presence']:6.1%}  (frames showing a shape)",
                      f"  colour stable      {result['color_stable']:6.1%}  (frames with the first frame's colour)",
                      f"  shape stable       {result['shape_stable']:6.1%}  (frames with the first frame's shape)",
                      f"  motion consistent  {result['motion_consistent']:6.1%}  (videos; "
                      f"{result['consistent_steps']:.1%} of the steps; {result['bounces']:.1f} bounces a video)",
                      f"  background drift   {drift['mean']:.1f} mean, {drift['max']:.1f} max  (RGB, 0-255)"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=Path, help="caption file, one caption per line, as given to sample.py")
    p.add_argument("--samples", type=Path, help="folder of <line index:05d>.png|.mp4 from sample.py --save_folder 1")
    p.add_argument("--attributes", type=Path, help="JSON Lines: line i the attributes of caption i (color, shape, "
                   "size, position; or color, shape, direction), for captions in any words; with --make_captions, "
                   "written beside them")
    p.add_argument("--json", type=Path, help="also write the result here as JSON")
    p.add_argument("--long", type=int, default=0, help="videos: the long-video figures (presence, colour and shape "
                   "stability, motion consistency, background drift; evaluate_long) instead of caption accuracy")
    p.add_argument("--make_captions", type=Path, help="write a caption file covering every colour x shape pair")
    p.add_argument("--video", type=int, default=0, help="with --make_captions: video captions")
    p.add_argument("--n", type=int, default=None, help="with --make_captions: lines (default 90 images, 18 videos)")
    p.add_argument("--seed", type=int, default=0, help="with --make_captions: seed of the sizes/positions/directions")
    p.add_argument("--phrasing", choices=phrasing.SPLITS, default="grammar",
                   help="with --make_captions: the strict grammar, training phrasings, or held-out phrasings that "
                        "training never uses")
    args = p.parse_args(argv)

    if args.make_captions is not None:
        n = args.n if args.n is not None else 18 if args.video else 90
        if n < 1:
            sys.exit(f"error: --n {n}: need at least one caption")
        cases = make_cases(n, bool(args.video), args.seed, args.phrasing)
        args.make_captions.write_text("".join(f"{c}\n" for c, _ in cases), encoding="utf-8")
        if args.attributes is not None:
            args.attributes.write_text("".join(f"{json.dumps(a)}\n" for _, a in cases), encoding="utf-8")
        print(f"wrote {n} {'video' if args.video else 'image'} captions ({args.phrasing}) to {args.make_captions}"
              + (f", their attributes to {args.attributes}" if args.attributes is not None else ""))
        return
    if args.captions is None or args.samples is None:
        sys.exit("error: give --captions FILE.txt and --samples DIR (or --make_captions FILE.txt)")
    from utils.config import ConfigError
    from utils.files import read_lines

    try:  # as sample.py reads them, so line i is sample i
        captions = read_lines(args.captions, "--captions")
    except (FileNotFoundError, ConfigError) as err:
        sys.exit(f"error: {err}")
    try:
        targets = read_attributes(args.attributes, len(captions)) if args.attributes is not None else None
        targets = targets_of(captions, targets)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {args.captions}: {err}" if args.attributes is None else f"error: {err}")
    try:
        files = sample_files(captions, args.samples, targets)
        result = evaluate_long(captions, files, targets) if args.long else evaluate(captions, files, targets)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(report_long(result) if args.long else report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
