"""The data pipeline on tiny files made here: the batch format, the three sources, aspect-ratio buckets, video frame
sampling, exact resume, per-rank sharding and the errors for bad folders.

Test images carry their identity in the red channel (10 + 10k for caption "image k") and a green left half, so a
caption that went to the wrong pixels, a flip, or a crop that lost the left half shows in the tensors.
"""
import argparse
import csv
import itertools
import json
import re
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import dataset
from dataset import (
    COLORS,
    FolderDataset,
    ShapesDataset,
    aspect_ratio_to_image_size,
    build_loader,
    nearest_aspect_ratio,
    render_shape,
    shape_caption,
)

RATIO_SIZES = [(64, 32), (32, 64), (32, 32)]  # (w, h): buckets 16:9, 9:16 and 1:1


def config(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(data=Path("unused"), dataset="shapes", img_size=32, vid_size=None,
                                        mix_aspect=0, no_flip=1, batch_size=4, epoch_length=32, train_seed=0,
                                        shapes_phrasing="grammar", shapes_motion="cross", shapes_continuation=0.0,
                                        shapes_from_to=None),
                                 **overrides})


def image_pixels(w: int, h: int, k: int) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 10 + 10 * k
    a[:, : w // 2, 1] = 255
    return a


def identity(x: torch.Tensor) -> int:
    """k from a (3, H, W) image made by image_pixels."""
    return round(((x[0].mean().item() + 1) * 127.5 - 10) / 10)


def make_folder(root: Path, sizes: list[tuple[int, int]], style: str = "sidecar") -> Path:
    """Images 'image k' of the given (w, h), every other one in a subfolder, captioned in the given style."""
    rows = []
    for k, (w, h) in enumerate(sizes):
        rel = Path("sub" if k % 2 else ".") / f"img{k}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_pixels(w, h, k)).save(root / rel)
        rows.append({"file": rel.as_posix(), "caption": f"image {k}"})
        if style == "sidecar":
            (root / rel).with_suffix(".txt").write_text(f"image {k}\n")
    if style == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif style == "csv":
        with open(root / "captions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["file", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def write_mp4(path: Path, frames: int = 12, fps: int = 8):
    """A bright 8x8 square on black whose left edge is at x = 2t in frame t."""
    video = np.zeros((frames, 32, 32, 3), np.uint8)
    for t in range(frames):
        video[t, 12:20, 2 * t:2 * t + 8] = 255
    imageio.mimwrite(path, video, fps=fps, format="FFMPEG", macro_block_size=16)


def source_frame(frame: np.ndarray) -> int:
    """Which frame of write_mp4's clip this is, from the square's position."""
    cols = np.nonzero(frame.mean(-1).max(0) > 128)[0]
    return round((cols.mean() - 3.5) / 2)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and ca == cb and torch.equal(ma["index"], mb["index"]) and
        torch.equal(ma["fps"], mb["fps"]) and ma["aspect_ratio"] == mb["aspect_ratio"]
        for (xa, ca, ma), (xb, cb, mb) in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------------
# Sizes and buckets

def test_aspect_ratio_sizes_match_the_official_values():
    official_256 = {"1:1": (256, 256), "2:3": (312, 208), "3:2": (208, 312), "16:9": (192, 344), "9:16": (344, 192),
                    "4:5": (288, 232), "5:4": (232, 288), "21:9": (168, 392), "9:21": (392, 168)}
    for ratio, hw in official_256.items():
        assert aspect_ratio_to_image_size(256, ratio, 8) == hw, ratio
    for ratio, hw in {"16:9": (480, 848), "1:1": (640, 640), "21:9": (416, 976)}.items():
        assert aspect_ratio_to_image_size(640, ratio, 16) == hw, ratio
    assert aspect_ratio_to_image_size(256, None) == (256, 256)


def test_nearest_ratio_compares_in_log_space():
    assert nearest_aspect_ratio(64, 32) == "16:9" and nearest_aspect_ratio(32, 64) == "9:16"
    assert nearest_aspect_ratio(210, 90) == "21:9" and nearest_aspect_ratio(500, 500) == "1:1"
    # 1.12 is nearer 1:1 than 5:4 on a linear scale, but nearer 5:4 in log space (and its mirror nearer 4:5).
    assert nearest_aspect_ratio(112, 100) == "5:4" and nearest_aspect_ratio(100, 112) == "4:5"


def test_buckets_hold_one_ratio_at_the_bucket_size(tmp_path):
    sizes = RATIO_SIZES * 4
    make_folder(tmp_path, sizes)
    loader = build_loader(config(dataset="folder", data=tmp_path, batch_size=2, mix_aspect=1), multiple=16)
    assert len(loader) == 6
    seen, ratios = [], set()
    for x, captions, meta in loader:
        ratio = meta["aspect_ratio"]
        ratios.add(ratio)
        assert x.shape == (2, 3, *aspect_ratio_to_image_size(32, ratio, 16))
        for xi, caption in zip(x, captions):
            k = int(caption.split()[1])
            assert identity(xi) == k and nearest_aspect_ratio(*sizes[k]) == ratio
            assert (xi[1, :, : xi.shape[-1] // 2 - 1] > 0.9).all()  # the green left half survived the crop
            seen.append(k)
    assert ratios == {"16:9", "9:16", "1:1"} and sorted(seen) == list(range(12))


# ---------------------------------------------------------------------------------------------------------------------
# Shapes

def test_shapes_batches_have_the_trainer_format():
    loader = build_loader(config(batch_size=4, epoch_length=18))
    batches = list(loader)
    assert len(loader) == len(batches) == 4  # the incomplete tail is dropped
    pattern = re.compile(r"a (small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle) "
                         r"(left|right|top|bottom|center)")
    for x, captions, meta in batches:
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
        assert x.min() >= -1 and x.max() == 1  # a white background at exactly 1
        assert len(captions) == 4 and all(pattern.fullmatch(c) for c in captions)
        assert meta["fps"].dtype == torch.long and meta["fps"].tolist() == [0] * 4
        assert meta["aspect_ratio"] == "1:1" and meta["index"].dtype == torch.long
    indices = torch.cat([m["index"] for _, _, m in batches]).tolist()
    assert len(set(indices)) == 16 and set(indices) <= set(range(18))


def test_shapes_are_a_pure_function_of_seed_and_index():
    a, b, other = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3), ShapesDataset(50, seed=4)
    rng = np.random.default_rng(0)
    samples = [a.load(i, rng) for i in range(20)]
    for i in (0, 7, 19):
        again = b.load(i, np.random.default_rng(99))
        assert np.array_equal(samples[i][0], again[0]) and samples[i][1] == again[1]
    assert len({s[0].tobytes() for s in samples}) == 20
    assert any(not np.array_equal(samples[i][0], other.load(i, rng)[0]) for i in range(20))


@pytest.mark.parametrize("img_size", [32, 64])
def test_shapes_show_their_caption(img_size):
    data, unit = ShapesDataset(200, img_size=img_size, seed=1), img_size / 32
    for i in range(len(data)):
        pixels, caption, _ = data.load(i, None)
        _, size, color, shape, position = caption.split()
        ink = (pixels < 250).any(-1)
        assert not ink[[0, -1]].any() and not ink[:, [0, -1]].any()  # the whole shape is inside the image
        assert np.abs(pixels[ink].mean(0) - COLORS[color]).max() < 3, caption
        ys, xs = np.nonzero(ink)
        cx, cy, d = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, xs.max() - xs.min() + 1
        assert abs(d - {"small": 10, "large": 18}[size] * unit) <= unit, caption
        fill = ink.sum() / d ** 2
        assert {"square": fill > 0.95, "circle": 0.7 < fill < 0.9, "triangle": 0.4 < fill < 0.65}[shape], caption
        off_x, off_y = (cx - img_size / 2) / unit, (cy - img_size / 2) / unit  # in pixels at 32 px
        expected = {"left": off_x < -2.5, "right": off_x > 2.5, "top": off_y < -2.5, "bottom": off_y > 2.5,
                    "center": abs(off_x) <= 2.5 and abs(off_y) <= 2.5}
        assert expected[position], (caption, off_x, off_y)
        assert position in ("left", "right") or abs(off_x) <= 2.5
        assert position in ("top", "bottom") or abs(off_y) <= 2.5


@pytest.mark.parametrize("img_size", [32, 64])
def test_wrapping_shape_videos_move_three_pixels_a_frame_around_the_torus(img_size):
    """motion "wrap" (the video demo model's data): frame t is frame 0 rolled by 3 px per frame (at 32 px) in the
    named direction, so the whole shape is always there (cut by an edge, it comes back at the opposite one) and a
    clip is a window of an endless motion; the start along the way is the sample's own."""
    data, unit, cut, starts = ShapesDataset(40, img_size, frames=24, fps=4, seed=5, motion="wrap"), img_size // 32, 0, set()
    for i in range(len(data)):
        attrs = data.attributes(i)
        video, caption, _ = data.load(i, np.random.default_rng(0))
        assert video.shape == (24, img_size, img_size, 3) and caption == shape_caption(**attrs)
        axis, sign = {"right": (1, 1), "left": (1, -1), "down": (0, 1), "up": (0, -1)}[attrs["direction"]]
        for t in range(24):
            assert (np.roll(video[0], sign * 3 * unit * t, axis=axis) == video[t]).all(), (caption, t)
        inked = (video < 250).any(-1)
        cut += int((inked[:, :, 0].any(1) & inked[:, :, -1].any(1)).any() | (inked[:, 0].any(1) & inked[:, -1].any(1)).any())
        starts.add(int(np.argwhere(inked[0]).mean(0)[axis]))
    assert cut > 20 and len(starts) > 10  # most clips cross an edge; they start all over the frame


@pytest.mark.parametrize("img_size", [32, 64])
def test_bouncing_shape_videos_stay_whole_and_turn_only_at_the_borders(img_size):
    """motion "bounce" (the video demo model's data): the shape, always whole and a pixel off the borders, moves 3 px
    per frame (at 32 px) along the named direction's axis and turns only where it meets a border; the first step is
    a whole step in the named direction, and clips start all along the way."""
    data, unit, turns, starts = ShapesDataset(40, img_size, frames=24, fps=4, seed=5, motion="bounce"), img_size // 32, 0, set()
    for i in range(len(data)):
        attrs = data.attributes(i)
        video, caption, _ = data.load(i, np.random.default_rng(0))
        assert video.shape == (24, img_size, img_size, 3) and caption == shape_caption(**attrs)
        axis, sign = {"right": (1, 1), "left": (1, -1), "down": (0, 1), "up": (0, -1)}[attrs["direction"]]
        inked = (video < 250).any(-1)  # (T, H, W)
        lines = inked.any(1 if axis == 1 else 2)  # (T, n): the lines across the axis that hold ink
        first = lines.argmax(1)
        last = lines.shape[1] - 1 - lines[:, ::-1].argmax(1)
        assert (first >= unit).all() and (last <= img_size - 1 - unit).all(), caption  # whole, off the borders
        assert (inked.any((1, 2))).all() and len({int(n) for n in inked.sum((1, 2))}) == 1  # the same shape
        moves = np.diff(first)
        assert moves[0] == sign * 3 * unit, caption
        for t, move in enumerate(moves):
            if move != moves[t - 1] and t > 0:  # a turn: the shape is at a border
                turns += 1
                assert min(first[t], img_size - 1 - last[t]) <= 4 * unit, (caption, t)
            assert abs(move) <= 3 * unit
        starts.add(int(first[0]))
    assert turns > 40 and len(starts) > 10


def test_continuation_clips_are_later_windows_of_their_captions_motion_scored_on_their_last_frame():
    """--shapes_continuation p: a share p of the bouncing clips are cut 1 to 24 frames into the motion their caption
    names the start of (frames start.. of the clip that starts there), with every other attribute as without
    continuation; their context is all frames but the last, and it reaches the batches' meta."""
    plain = ShapesDataset(200, frames=4, fps=4, seed=3, motion="bounce")
    later = ShapesDataset(200, frames=4, fps=4, seed=3, motion="bounce", continuation=0.5)
    starts = []
    for i in range(len(later)):
        attrs, first = later.attributes(i), plain.attributes(i)
        start = attrs.pop("start")
        assert attrs == first and later.context(i) == (3 if start else 0)
        video, caption, _ = later.load(i, np.random.default_rng(0))
        assert caption == shape_caption(**first)
        assert (video == render_shape(**first, frames=start + 4, motion="bounce")[start:]).all()
        starts.append(start)
    moved = [s for s in starts if s]
    assert 70 < len(moved) < 130 and min(moved) == 1 and max(moved) == 24 and plain.context(0) == 0
    loader = build_loader(config(vid_size="4:4", shapes_motion="bounce", shapes_continuation=0.5, batch_size=8),
                          num_workers=0, multiple=8)
    _, _, meta = next(iter(loader))
    assert sorted(set(meta["context"].tolist())) == [0, 3]
    for bad in (dict(motion="wrap", continuation=0.5), dict(motion="bounce", continuation=1.5)):
        with pytest.raises(ValueError, match="continuation"):
            ShapesDataset(8, frames=4, **bad)


def test_from_to_share_draws_wordings_that_name_both_ends():
    """--shapes_from_to p: a share p of the video captions say the direction by where the motion starts and ends
    ("from the bottom to the top"), and they read back as the direction drawn; None is the plain draw."""
    from utils.phrasing import parse_caption

    share = {}
    for p in (0.0, 0.5, 1.0, None):
        data = ShapesDataset(400, frames=4, fps=4, seed=3, motion="bounce", phrasing="train", from_to=p)
        captions = [data.load(i, np.random.default_rng([9, i]))[1] for i in range(len(data))]
        for i, caption in enumerate(captions):
            assert parse_caption(caption)["direction"] == data.attributes(i)["direction"], caption
        share[p] = np.mean([" from " in c for c in captions])
    assert share[0.0] == 0 and share[1.0] == 1 and 0.4 < share[0.5] < 0.6 and 0.12 < share[None] < 0.28, share
    for bad in (dict(frames=1, phrasing="train"), dict(frames=4, phrasing="grammar"), dict(frames=4, phrasing="train",
                                                                                         from_to_value=1.5)):
        value = bad.pop("from_to_value", 0.5)
        with pytest.raises(ValueError, match="from_to"):
            ShapesDataset(8, **bad, from_to=value)


def test_from_to_clips_start_where_their_caption_says():
    """A clip captioned "from the bottom to the top" starts near the bottom and goes up (a person's from-to names
    the start); the other clips of the same data start anywhere along their way."""
    def gap(frame, direction):  # pixels between the shape and the border it starts from (moving away from it)
        ys, xs = np.nonzero((255 - frame.astype(int)).sum(-1) > 50)
        return {"right": xs.min(), "down": ys.min(), "left": 31 - xs.max(), "up": 31 - ys.max()}[direction]

    data = ShapesDataset(300, frames=4, fps=4, seed=6, motion="bounce", phrasing="train", from_to=0.5)
    starts = {True: [], False: []}
    for i in range(len(data)):
        pixels, caption, _ = data.load(i, np.random.default_rng([2, i]))
        direction = data.attributes(i)["direction"]
        first, second = gap(pixels[0], direction), gap(pixels[1], direction)
        starts[" from " in caption].append(first)
        if " from " in caption:
            assert second > first, (caption, first, second)
    assert max(starts[True]) <= 6 and max(starts[False]) >= 15, (max(starts[True]), max(starts[False]))
    assert len(starts[True]) > 100 and len(starts[False]) > 100


def test_shape_videos_move_in_the_named_direction():
    data = ShapesDataset(40, frames=8, fps=4, seed=2)
    directions = set()
    for i in range(len(data)):
        video, caption, fps = data.load(i, None)
        assert video.shape == (8, 32, 32, 3) and fps == 4
        _, color, shape, _, direction = caption.split()
        directions.add(direction)
        centres = np.array([np.argwhere((f < 250).any(-1)).mean(0) for f in video])  # (T, 2): row, column
        along, across = (centres[:, 1], centres[:, 0]) if direction in ("left", "right") else centres.T
        steps = np.diff(along) * (1 if direction in ("right", "down") else -1)
        assert (steps > 0).all() and along.max() - along.min() > 11.5, caption  # a large shape has 12 px to travel
        assert np.ptp(across) < 0.5, caption
    assert directions == {"left", "right", "up", "down"}
    x, captions, meta = next(iter(build_loader(config(vid_size="8:4", batch_size=2, epoch_length=4))))
    assert x.shape == (2, 8, 3, 32, 32) and meta["fps"].tolist() == [4, 4] and "moving" in captions[0]


def test_render_shape_reference_matches_the_dataset():
    data = ShapesDataset(10, seed=5)
    for i in range(10):
        assert np.array_equal(render_shape(**data.attributes(i)), data.load(i, None)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Folders and shards

@pytest.mark.parametrize("style", ["sidecar", "jsonl", "csv"])
def test_folder_images_come_with_their_captions(tmp_path, style):
    make_folder(tmp_path, [(32, 32), (48, 40), (40, 64), (32, 32)] * 2, style)
    loader = build_loader(config(dataset="folder", data=tmp_path, batch_size=2))
    files = FolderDataset(tmp_path).files
    seen = []
    for x, captions, meta in loader:
        assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
        for xi, caption, index in zip(x, captions, meta["index"].tolist()):
            k = int(caption.split()[1])
            assert identity(xi) == k and files[index].name == f"img{k}.png"
            seen.append(k)
    assert sorted(seen) == list(range(8))


def test_flips_mirror_folder_images_but_never_shapes(tmp_path):
    make_folder(tmp_path, [(32, 32)] * 16)
    plain = {c: xi for x, caps, _ in build_loader(config(dataset="folder", data=tmp_path, batch_size=16))
             for c, xi in zip(caps, x)}
    loader = build_loader(config(dataset="folder", data=tmp_path, batch_size=16, no_flip=0))
    flips = []  # per epoch: the captions of the flipped images
    for _ in range(2):
        x, captions, _ = next(iter(loader))
        loader.set_epoch(loader.epoch + 1)
        for xi, caption in zip(x, captions):
            assert torch.equal(xi, plain[caption]) or torch.equal(xi, plain[caption].flip(-1))
        flips.append({c for xi, c in zip(x, captions) if not torch.equal(xi, plain[c])})
    assert all(0 < len(f) < 16 for f in flips) and flips[0] != flips[1]  # fresh flips each epoch
    shapes = [build_loader(config(no_flip=flip)) for flip in (0, 1)]
    assert same_batches(list(shapes[0]), list(shapes[1]))


def test_mp4_frames_are_sampled_at_the_target_fps(tmp_path):
    write_mp4(tmp_path / "clip.mp4")
    (tmp_path / "clip.txt").write_text("a square moving right")
    for frames, fps, step in [(4, 4, 2), (4, 8, 1), (3, 2, 4)]:
        data, starts = FolderDataset(tmp_path, frames=frames, fps=fps), set()
        for seed in range(8):
            video, caption, meta_fps = data.load(0, np.random.default_rng(seed))
            assert video.shape == (frames, 32, 32, 3) and caption == "a square moving right" and meta_fps == fps
            index = [source_frame(f) for f in video]
            assert index == [index[0] + step * k for k in range(frames)] and index[-1] <= 11, (fps, index)
            starts.add(index[0])
        assert len(starts) > 1  # a random start
    video, _, _ = FolderDataset(tmp_path, frames=8, fps=4).load(0, np.random.default_rng(0))
    assert [source_frame(f) for f in video] == [0, 2, 4, 6, 8, 10, 10, 10]  # too short: the last frame repeats
    x, captions, meta = next(iter(build_loader(config(dataset="folder", data=tmp_path, vid_size="4:4",
                                                      batch_size=1, no_flip=0))))
    assert x.shape == (1, 4, 3, 32, 32) and meta["fps"].tolist() == [4] and captions == ["a square moving right"]
    with wds.TarWriter(str(tmp_path / "clips.tar")) as sink:
        sink.write({"__key__": "clip", "mp4": (tmp_path / "clip.mp4").read_bytes(), "txt": "a square"})
    x, captions, meta = next(iter(build_loader(config(dataset="webdataset", data=tmp_path / "clips.tar",
                                                      vid_size="4:4", batch_size=1, epoch_length=1))))
    index = [source_frame(((f.permute(1, 2, 0) + 1) * 127.5).numpy()) for f in x[0]]
    assert index == [index[0] + 2 * k for k in range(4)] and meta["fps"].tolist() == [4] and captions == ["a square"]


def write_shards(root: Path, shards: int = 4, per_shard: int = 6):
    """Images 'image k' (k = shard * per_shard + j) of the three ratios, captioned by .txt or .json alternately."""
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for j in range(per_shard):
                k = s * per_shard + j
                w, h = RATIO_SIZES[k % 3]
                sample = {"__key__": f"{k:04d}", "png": Image.fromarray(image_pixels(w, h, k))}
                sample.update({"txt": f"image {k}"} if k % 2 else {"json": {"caption": f"image {k}"}})
                sink.write(sample)


def test_webdataset_shards_stream_bucketed_batches(tmp_path):
    write_shards(tmp_path)
    pattern = Path(tmp_path / "shard-{000000..000003}.tar")
    loader = build_loader(config(dataset="webdataset", data=pattern, batch_size=2, epoch_length=48, mix_aspect=1))
    batches = list(loader)
    assert len(loader) == len(batches) == 24  # more than the 24 samples: the stream goes round again
    seen = set()
    for x, captions, meta in batches:
        assert x.shape == (2, 3, *aspect_ratio_to_image_size(32, meta["aspect_ratio"], 8))
        for xi, caption in zip(x, captions):
            k = int(caption.split()[1])
            assert identity(xi) == k and nearest_aspect_ratio(*RATIO_SIZES[k % 3]) == meta["aspect_ratio"]
            seen.add(k)
        assert meta["index"].tolist() == [-1, -1] and meta["fps"].tolist() == [0, 0]
    assert seen == set(range(24))

    ranks = [build_loader(config(dataset="webdataset", data=tmp_path, batch_size=4, epoch_length=40),
                          rank=r, world_size=2) for r in range(2)]
    shards_seen = [{int(c.split()[1]) // 6 for _, captions, _ in rank for c in captions} for rank in ranks]
    assert shards_seen == [{0, 2}, {1, 3}]
    workers = build_loader(config(dataset="webdataset", data=tmp_path, batch_size=4, epoch_length=24), num_workers=2)
    captions = [c for _, batch, _ in workers for c in batch]
    assert sorted(captions) == sorted(f"image {k}" for k in range(24))  # each worker reads its own shards

    resumed = build_loader(config(dataset="webdataset", data=pattern, batch_size=2, epoch_length=48, mix_aspect=1))
    resumed.load_state_dict({"epoch": 0, "batches": 5})
    assert same_batches(list(resumed), batches[5:])


# ---------------------------------------------------------------------------------------------------------------------
# Resume and ranks

RESUME_CASES = {"shapes": (dict(epoch_length=40, batch_size=4), 0),
                "folder, flips": (dict(dataset="folder", batch_size=2, no_flip=0), 0),
                "folder, flips, buckets, 2 workers": (dict(dataset="folder", batch_size=2, no_flip=0, mix_aspect=1), 2)}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_yields_exactly_the_remaining_batches(tmp_path, monkeypatch, case):
    overrides, workers = RESUME_CASES[case]
    make_folder(tmp_path, RATIO_SIZES * 6)
    cfg = config(data=tmp_path, **overrides)
    whole = build_loader(cfg, num_workers=workers)
    first_epoch = list(whole)
    assert whole.state_dict() == {"epoch": 1, "batches": 0}
    full = list(whole)  # epoch 1
    assert [m["index"].tolist() for *_, m in full] != [m["index"].tolist() for *_, m in first_epoch]

    k = len(full) // 2
    stopped = build_loader(cfg)
    stopped.set_epoch(1)
    assert same_batches(list(itertools.islice(stopped, k)), full[:k])
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": k}

    source = dataset.ShapesDataset if overrides.get("dataset", "shapes") == "shapes" else dataset.FolderDataset
    loads = []
    load = source.load
    monkeypatch.setattr(source, "load", lambda self, i, rng: loads.append(i) or load(self, i, rng))
    restarted = build_loader(cfg, num_workers=workers)
    restarted.load_state_dict(state)
    restarted.set_epoch(1)  # the trainer's usual call must keep the loaded position
    assert same_batches(list(restarted), full[k:])
    if workers == 0:  # the skipped batches were never decoded
        assert sorted(loads) == sorted(torch.cat([m["index"] for *_, m in full[k:]]).tolist())


def test_ranks_split_every_global_batch(tmp_path):
    make_folder(tmp_path, RATIO_SIZES * 8)
    cfg = config(dataset="folder", data=tmp_path, batch_size=4, mix_aspect=1, no_flip=0)
    whole = list(build_loader(cfg))
    parts = [list(build_loader(cfg, rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 6
    for w, a, b in zip(whole, *parts):
        assert w[2]["aspect_ratio"] == a[2]["aspect_ratio"] == b[2]["aspect_ratio"]
        assert not set(a[2]["index"].tolist()) & set(b[2]["index"].tolist())
        assert torch.equal(torch.cat([a[0], b[0]]), w[0]) and a[1] + b[1] == w[1]
    shapes = [build_loader(config(epoch_length=10, batch_size=4), rank=r, world_size=2) for r in range(2)]
    assert len(shapes[0]) == len(shapes[1]) == 2 and len(list(shapes[1])) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad input

def test_bad_folders_fail_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        FolderDataset(empty)

    uncaptioned = make_folder(tmp_path / "uncaptioned", [(32, 32)] * 2)
    (uncaptioned / "img0.txt").unlink()
    with pytest.raises(ValueError, match=re.escape(str(uncaptioned / "img0.png"))):
        FolderDataset(uncaptioned)

    listed = make_folder(tmp_path / "listed", [(32, 32)] * 2, "jsonl")
    with open(listed / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "gone.png", "caption": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(listed / "gone.png"))):
        FolderDataset(listed)

    corrupt = make_folder(tmp_path / "corrupt", [(32, 32)] * 2)
    (corrupt / "img0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(str(corrupt / "img0.png"))):
        FolderDataset(corrupt)

    truncated = make_folder(tmp_path / "truncated", [(32, 32)] * 2)  # a header that reads, pixels that do not
    (truncated / "img0.png").write_bytes((truncated / "img0.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=re.escape(str(truncated / "img0.png"))):
        FolderDataset(truncated).load(0, np.random.default_rng(0))

    write_shards(tmp_path, shards=1)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "shard-000001.tar"))):
        build_loader(config(dataset="webdataset", data=tmp_path / "shard-{000000..000001}.tar"))
