"""scripts/eval_shapes.py: the measurements read back every attribute that render_shape drew (also under noise),
captions round-trip through the grammar, the CLI pairs line i with file i and counts each attribute, and bad input
ends in one error line."""
import contextlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

from dataset import COLORS, DIRECTIONS, POSITIONS, SHAPES, SIZES, ShapesDataset, render_shape, shape_caption
from scripts.eval_shapes import (
    evaluate,
    evaluate_long,
    main,
    make_captions,
    measure_image,
    measure_long_video,
    measure_video,
    parse_caption,
    read_sample,
)
from utils.media import save_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts.eval_shapes"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def failed_cli(*args) -> subprocess.CompletedProcess:
    """A run of the CLI that must stop with an error, in-process (its __main__ calls main() bare): status and stderr."""
    code, stderr = cli_error(main, args, run_cli=False)
    return subprocess.CompletedProcess([SCRIPT, *map(str, args)], code, "", stderr)


def noisy(pixels: np.ndarray, rng: np.random.Generator, std: float = 10) -> np.ndarray:
    return np.clip(pixels + rng.normal(0, std, pixels.shape), 0, 255).astype(np.uint8)


def image_cases(repeats: int, seed: int = 0):
    """Every colour x shape x size x position, each at `repeats` random offsets inside its region."""
    rng = np.random.default_rng(seed)
    for color, shape, size, position in itertools.product(COLORS, SHAPES, SIZES, POSITIONS):
        for _ in range(repeats):
            yield dict(color=color, shape=shape, size=size, position=position, offset=tuple(rng.random(2)))


def accuracy(cases, measure, render, keys) -> dict:
    hits, cases = dict.fromkeys(keys, 0), list(cases)
    for attrs in cases:
        measured = measure(render(attrs))
        for k in keys:
            hits[k] += measured[k] == attrs[k]
    return {k: v / len(cases) for k, v in hits.items()}


IMAGE_KEYS = ("color", "shape", "size", "position")
VIDEO_KEYS = ("color", "shape", "direction")


def test_parse_caption_inverts_shape_caption_and_rejects_the_rest():
    for color, shape, size, position in itertools.product(COLORS, SHAPES, SIZES, POSITIONS):
        attrs = dict(color=color, shape=shape, size=size, position=position)
        assert parse_caption(shape_caption(**attrs)) == attrs
    for color, shape, direction in itertools.product(COLORS, SHAPES, DIRECTIONS):
        attrs = dict(color=color, shape=shape, direction=direction)
        assert parse_caption(shape_caption(size="small", **attrs)) == attrs
    for bad in ["a small red circle", "a small pink circle left", "a small red star left", "a small circle left",
                "a red circle moving sideways", "a small red blue circle left", ""]:
        with pytest.raises(ValueError):
            parse_caption(bad)


@pytest.mark.parametrize("video", [False, True])
def test_every_phrasing_reads_back_and_held_out_phrasings_never_train(video):
    """1,500 training and held-out wordings each: the evaluator reads back the attributes they were drawn from;
    no training caption holds a word or a template of the held-out phrasings."""
    from utils.phrasing import held_out_words, phrase

    data, rng, keys = ShapesDataset(1500, frames=4 if video else 1, seed=7), np.random.default_rng(0), \
        VIDEO_KEYS if video else IMAGE_KEYS
    captions = {}
    for split in ("train", "heldout"):
        captions[split] = []
        for i in range(len(data)):
            attrs = data.attributes(i)
            text = phrase(attrs, rng, split)
            assert parse_caption(text) == {k: attrs[k] for k in keys}, text
            captions[split].append(text)
    templates = {"draw", "I see", "there's", "placed", "showing", "watch", "video of", "keeps"}  # held-out words
    assert not [t for t in captions["train"]
                if held_out_words(t) or any(re.search(rf"\b{re.escape(w)}\b", t) for w in templates)]
    assert len(set(captions["train"])) > 600 and len(set(captions["heldout"])) > 300  # varied, not a few
    assert set(captions["train"]).isdisjoint(captions["heldout"])


@pytest.mark.parametrize("img_size, repeats", [(32, 4), (64, 1)])
def test_clean_renders_are_measured_exactly(img_size, repeats):
    acc = accuracy(image_cases(repeats), measure_image,
                   lambda a: render_shape(**a, img_size=img_size), IMAGE_KEYS)
    assert acc == dict.fromkeys(IMAGE_KEYS, 1.0)


def test_noisy_renders_are_measured_right():
    rng = np.random.default_rng(1)
    acc = accuracy(image_cases(2, seed=1), measure_image, lambda a: noisy(render_shape(**a), rng), IMAGE_KEYS)
    assert min(acc.values()) >= 0.99, acc  # 100% measured on 360 renders at std 10


def test_videos_are_measured_right_clean_and_noisy():
    rng = np.random.default_rng(2)
    cases = [dict(color=c, shape=s, size=z, direction=d, offset=tuple(rng.random(2)))
             for c, s, z, d in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS)]
    clean = accuracy(cases, measure_video, lambda a: render_shape(**a, frames=6), VIDEO_KEYS)
    assert clean == dict.fromkeys(VIDEO_KEYS, 1.0)
    noise = accuracy(cases, measure_video, lambda a: noisy(render_shape(**a, frames=6), rng), VIDEO_KEYS)
    assert min(noise.values()) >= 0.99, noise


def test_wrapping_videos_are_measured_whole_and_slow_ones_have_no_direction():
    """A shape cut by the frame's edges (motion "wrap") is measured as one shape, its centre in frame coordinates;
    the direction is the displacement summed the short way around; a shape that stays or moves under 1 px per frame
    has none (it used to be credited with any displacement)."""
    rng = np.random.default_rng(4)
    cases = [dict(color=c, shape=s, size=z, direction=d, offset=tuple(rng.random(2)))
             for c, s, z, d in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS)]
    clean = accuracy(cases, measure_video, lambda a: render_shape(**a, frames=4, motion="wrap"), VIDEO_KEYS)
    assert clean == dict.fromkeys(VIDEO_KEYS, 1.0)
    still = render_shape("red", "circle", "small", direction="right", frames=1, offset=(0.5, 0.5))
    assert measure_video(np.stack([still] * 4))["direction"] is None
    creeping = np.stack([np.roll(still, t // 2, axis=1) for t in range(4)])  # 1 px in 3 frames
    assert measure_video(creeping)["direction"] is None
    edge = np.roll(render_shape("blue", "square", "large", "center"), 16, axis=1)  # split in two halves
    assert measure_image(edge)["shape"] == "square" and measure_image(edge)["size"] == "large"
    assert abs(measure_image(edge)["center"][0] - 0) < 1 or abs(measure_image(edge)["center"][0] - 32) < 1


def test_long_video_figures_count_what_breaks():
    attrs = dict(color="red", shape="square", size="small", direction="right", offset=(0.3, 0.9))
    video = render_shape(**attrs, frames=32, motion="wrap")
    assert measure_long_video(video, "right") == dict(presence=1.0, color_stable=1.0, shape_stable=1.0,
                                                      motion_consistent=True, consistent_steps=1.0,
                                                      bounces=0, background_drift=0.0)
    broken = video.copy()
    broken[8:12] = render_shape(**{**attrs, "color": "blue"}, frames=32, motion="wrap")[8:12]
    broken[20] = 255  # no shape
    broken[28:][(broken[28:] == 255).all(-1)] = 235  # a greyer background
    got = measure_long_video(broken, "right")
    assert got["presence"] == 31 / 32 and got["color_stable"] == 27 / 32 and got["shape_stable"] == 31 / 32
    assert not got["motion_consistent"] and got["consistent_steps"] == 29 / 31
    assert got["background_drift"] == pytest.approx(20 * 3 ** 0.5)
    backwards = measure_long_video(video[::-1], "right")
    assert not backwards["motion_consistent"] and backwards["consistent_steps"] == 0
    result = evaluate_long(["a red square moving right", "a red box going right"], [video, broken])
    assert result["n"] == 2 and result["frames"] == 32 and result["motion_consistent"] == 0.5
    assert result["presence"] == (1 + 31 / 32) / 2 and result["background_drift"]["max"] == got["background_drift"]


def test_bouncing_videos_keep_their_heading_and_turns_away_from_the_borders_break_it():
    """Motion "bounce": a clip heads where the caption says until it bounces (every clip is measured right, clean
    and noisy); over 32 frames every step keeps the heading or bounces off a border, also where the turning step
    wobbles a pixel sideways. A shape that turns back in the middle of the frame, or stays at a border, or moves
    2 px sideways there, breaks the motion."""
    rng = np.random.default_rng(6)
    cases = [dict(color=c, shape=s, size=z, direction=d, offset=tuple(rng.random(2)))
             for c, s, z, d in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS)]
    render = lambda a: render_shape(**a, frames=4, motion="bounce")  # noqa: E731
    assert accuracy(cases, measure_video, render, VIDEO_KEYS) == dict.fromkeys(VIDEO_KEYS, 1.0)
    noise = accuracy(cases, measure_video, lambda a: noisy(render(a), rng), VIDEO_KEYS)
    assert min(noise.values()) >= 0.99, noise
    for attrs in cases[::7]:
        got = measure_long_video(render_shape(**attrs, frames=32, motion="bounce"), attrs["direction"])
        assert got["motion_consistent"] and got["bounces"] >= 3, (attrs, got)
    attrs = dict(color="red", shape="circle", size="small", direction="right", offset=(0.5, 0.0))
    video = render_shape(**attrs, frames=32, motion="bounce")  # x = 6, 9, ... 24, then 25, 22, 19 ...
    turned = np.concatenate([video[:4], video[3::-1]])  # back at x = 15: 11 px from the right border
    got = measure_long_video(turned, "right")
    assert not got["motion_consistent"] and got["bounces"] == 0 and got["consistent_steps"] == 3 / 7
    bounces = measure_long_video(video, "right")["bounces"]
    for frame, shift in [(video[7], 1), (video[6], 1), (video[6], -1)]:  # turning at x = 25, or pausing at 24
        wobble = np.concatenate([video[:7], np.roll(frame, shift, axis=0)[None], video[8:]])  # a pixel sideways
        got = measure_long_video(wobble, "right")
        assert got["motion_consistent"] and got["bounces"] == bounces, got
    sideways = np.concatenate([video[:7], np.roll(video[7], 2, axis=0)[None], video[8:]])  # 2 px: a sideways move
    assert not measure_long_video(sideways, "right")["motion_consistent"]
    turned[4] = np.roll(turned[4], 1, axis=0)  # the wobble does not excuse a turn in mid-frame
    assert not measure_long_video(turned, "right")["motion_consistent"]
    stuck = np.concatenate([video[:7], video[6:7].repeat(3, 0)])  # stays at the border
    got = measure_long_video(stuck, "right")
    assert not got["motion_consistent"] and got["consistent_steps"] == 7 / 9
    wrong_way = measure_long_video(video, "left")  # it heads right: the 7 steps up to its first bounce are wrong
    assert not wrong_way["motion_consistent"] and wrong_way["consistent_steps"] == 24 / 31
    assert measure_video(video[5:9])["direction"] == "right"  # x = 21, 24, 25, 22: it went 1 px, summed (no motion)


def test_blank_image_measures_nothing_and_counts_as_wrong():
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert measure_image(blank)["shape"] is None
    result = evaluate(["a small red circle left"], [blank])
    assert result["accuracy"] == dict.fromkeys([*IMAGE_KEYS, "all"], 0.0)


def test_captions_with_held_out_words_are_scored_apart():
    """The held-out row mixes captions in training words with those holding a word training never uses ("disc",
    "scarlet"); the latter are counted apart, as that share falls as the training vocabulary grows."""
    from scripts.eval_shapes import report
    from utils.phrasing import held_out_words

    assert held_out_words("Draw a tiny SCARLET disc up top") == ["disc", "scarlet", "tiny", "up top"]
    assert held_out_words("a small red discus, a tinyish box") == []  # whole words only
    captions = ["a small red disc on the left", "a small red circle on the left", "a small scarlet circle on the left",
                "a small red disc on the right"]
    drawn = [render_shape("red", "circle", "small", "left")] * 3 + [render_shape("red", "square", "small", "right")]
    result = evaluate(captions, drawn)
    assert result["correct"]["all"] == 3 and result["held_out_words"] == {"n": 3, "all": 2}
    assert "held-out word" in report(result) and "(2/3)" in report(result)
    assert "held-out word" not in report(evaluate(captions[1:2], drawn[1:2]))


def test_evaluate_rejects_mixed_image_and_video_captions():
    pixels = render_shape("red", "circle", "small", "left")
    with pytest.raises(ValueError, match="mix"):
        evaluate(["a small red circle left", "a red circle moving up"], [pixels, pixels])


def write_images(folder: Path, attrs_list: list[dict]):
    folder.mkdir(exist_ok=True)
    for i, attrs in enumerate(attrs_list):
        Image.fromarray(render_shape(**attrs)).save(folder / f"{i:05d}.png")


def test_cli_scores_matching_samples_1_and_swapped_ones_by_attribute(tmp_path):
    data = ShapesDataset(40, seed=3)
    attrs = [data.attributes(i) for i in range(len(data))]
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(shape_caption(**a) for a in attrs) + "\n")
    write_images(tmp_path / "good", attrs)
    out = run_cli("--captions", captions, "--samples", tmp_path / "good", "--json", tmp_path / "good.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "good.json").read_text())
    assert result["n"] == 40 and result["accuracy"] == dict.fromkeys([*IMAGE_KEYS, "all"], 1.0)
    assert "all" in out.stdout and "100.0%" in out.stdout

    # Every other sample drawn in another colour: colour and "all" fall to one half, the rest stay right.
    others = list(COLORS)
    swapped = [dict(a, color=others[(others.index(a["color"]) + 1) % len(others)]) if i % 2 else a
               for i, a in enumerate(attrs)]
    write_images(tmp_path / "swapped", swapped)
    out = run_cli("--captions", captions, "--samples", tmp_path / "swapped", "--json", tmp_path / "swapped.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "swapped.json").read_text())
    assert result["accuracy"] == dict(color=0.5, shape=1.0, size=1.0, position=1.0, all=0.5)
    assert result["correct"]["all"] == 20
    assert [s["wrong"] for s in result["samples"][:2]] == [[], ["color"]]


def test_cli_reads_mp4_videos(tmp_path):
    cases = [dict(color=c, shape=s, size="large", direction=d, offset=(0.5, 0.5))
             for (c, s), d in zip(itertools.product(("red", "blue", "green"), SHAPES), itertools.cycle(DIRECTIONS))]
    for i, attrs in enumerate(cases):
        frames = torch.from_numpy(render_shape(**attrs, frames=6)).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_video(frames, tmp_path / f"{i:05d}.mp4", fps=8)
    captions = tmp_path / "video.txt"
    captions.write_text("\n".join(shape_caption(**a) for a in cases))
    out = run_cli("--captions", captions, "--samples", tmp_path, "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["kind"] == "video" and result["accuracy"] == dict.fromkeys([*VIDEO_KEYS, "all"], 1.0)


@pytest.mark.parametrize("video, n", [(0, None), (1, 24)])
def test_make_captions_covers_every_colour_and_shape(tmp_path, video, n):
    path = tmp_path / "c.txt"
    out = run_cli("--make_captions", path, "--video", video, *(["--n", n] if n else []))
    assert out.returncode == 0, out.stderr
    lines = path.read_text().splitlines()
    assert len(lines) == (n or (18 if video else 90))
    parsed = [parse_caption(line) for line in lines]
    assert all(("direction" in p) == bool(video) for p in parsed)
    assert {(p["color"], p["shape"]) for p in parsed} == set(itertools.product(COLORS, SHAPES))
    varied = "direction" if video else "position"
    assert len({p[varied] for p in parsed}) > 2  # drawn at random, not one fixed value
    assert make_captions(20, bool(video), seed=5) == make_captions(20, bool(video), seed=5)


def assert_one_error_line(out: subprocess.CompletedProcess, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_errors_name_the_missing_file_and_the_bad_line(tmp_path):
    attrs = [ShapesDataset(5, seed=4).attributes(i) for i in range(5)]
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(shape_caption(**a) for a in attrs))
    write_images(tmp_path / "s", attrs)
    (tmp_path / "s" / "00003.png").unlink()
    (tmp_path / "s" / "00004.png").unlink()
    assert_one_error_line(failed_cli("--captions", captions, "--samples", tmp_path / "s"), "00003.png")

    lines = [shape_caption(**a) for a in attrs]
    lines[2] = "a big pink circle left"
    captions.write_text("\n".join(lines))
    assert_one_error_line(failed_cli("--captions", captions, "--samples", tmp_path / "s"), "line 3", "no color")
    assert_one_error_line(failed_cli("--captions", tmp_path / "none.txt", "--samples", tmp_path / "s"), "none.txt")


def test_attributes_side_file_scores_captions_in_any_words(tmp_path):
    """Captions in words the reader does not know are scored against a JSON Lines side file (and the file
    --make_captions writes beside its captions holds what they were worded from); a bad side file is one line naming
    the file, line and key."""
    attrs = [ShapesDataset(6, seed=5).attributes(i) for i in range(6)]
    write_images(tmp_path / "s", attrs)
    captions, side = tmp_path / "mine.txt", tmp_path / "mine.jsonl"
    captions.write_text("".join(f"sample number {i}, in words the reader does not know\n" for i in range(6)))
    side.write_text("".join(json.dumps({k: a[k] for k in IMAGE_KEYS}) + "\n" for a in attrs))
    out = run_cli("--captions", captions, "--attributes", side, "--samples", tmp_path / "s", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["all"] == 1.0
    wrong = [dict({k: a[k] for k in IMAGE_KEYS}, shape="square" if a["shape"] != "square" else "circle") for a in attrs]
    side.write_text("".join(json.dumps(a) + "\n" for a in wrong))
    out = run_cli("--captions", captions, "--attributes", side, "--samples", tmp_path / "s", "--json", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["shape"] == 0.0

    made, made_side = tmp_path / "c.txt", tmp_path / "c.jsonl"
    assert run_cli("--make_captions", made, "--attributes", made_side, "--video", 1, "--n", 24, "--phrasing",
                   "heldout").returncode == 0
    pairs = zip(made.read_text().splitlines(), made_side.read_text().splitlines(), strict=True)
    assert all(parse_caption(c) == json.loads(a) for c, a in pairs)

    for text, needles in [('{"color": "red"}\n' * 6, ["line 1", "keys"]),
                          ("".join(json.dumps(dict({k: a[k] for k in IMAGE_KEYS}, size="medium")) + "\n"
                                   for a in attrs), ["line 1", "size 'medium'"]),
                          ("not json\n" * 6, ["line 1", "not JSON"]), ("{}\n", ["1 lines", "6 captions"])]:
        side.write_text(text)
        assert_one_error_line(failed_cli("--captions", captions, "--attributes", side, "--samples", tmp_path / "s"),
                              "mine.jsonl", *needles)
    assert_one_error_line(failed_cli("--captions", captions, "--attributes", tmp_path / "no.jsonl", "--samples",
                                     tmp_path / "s"), "no.jsonl")


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_captions_people_wrote_read_as_they_meant(kind):
    """tests/data/people-phrasings: 120 image and 72 video captions written by someone who never saw our phrasings,
    with the attributes they meant (JSON Lines) — "from left to right", "rises", "right in the middle", "it goes in
    the middle" (a place, not a motion) included; the reader takes each as its writer meant."""
    folder = Path(__file__).parent / "data" / "people-phrasings"
    captions = (folder / f"{kind}.txt").read_text().splitlines()
    meant = [json.loads(line) for line in (folder / f"{kind}.jsonl").read_text().splitlines()]
    assert len(captions) == len(meant) == (120 if kind == "images" else 72)
    assert [parse_caption(c) for c in captions] == meant


@pytest.mark.slow
def test_shapes_between_pixels_through_the_autoencoder_are_measured_right():
    """Generated shapes sit anywhere, not on whole pixels, and come out of the shapes autoencoder's decoder blurred:
    renders drawn at 4x and box-downsampled (shapes at quarter-pixel places), encoded and decoded by the bundled
    ckpts/shapes_ae (its own decoder and the one fine-tuned on noisy latents), are measured right frame by frame.
    A thresholded mask's fill read 11% of the frames of small bouncing squares as circles (a 10-px square half a
    pixel off covers 100 of 110 pixels of its box); coverage_shape reads them all."""
    from utils.vae import setup_vae

    vae = setup_vae(str(ROOT / "ckpts/shapes_ae/vae"), ROOT / "ckpts/shapes_ae/decoder_noise0.3.safetensors")
    rng, frames = np.random.default_rng(5), 12  # 12 frames: every clip bounces (18 px at 3 px a frame at most)
    cases = [dict(color=c, shape=s, size=z, direction=d, offset=tuple(rng.random(2)))
             for c, s, z, d in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS)]
    videos = np.stack([render_shape(**a, frames=frames, motion="bounce", img_size=128) for a in cases])
    videos = videos.reshape(len(cases), frames, 32, 4, 32, 4, 3).mean((3, 5)).round().astype(np.uint8)
    images = np.stack([render_shape(**a, img_size=128) for a in image_cases(1, seed=6)])
    images = images.reshape(len(images), 32, 4, 32, 4, 3).mean((2, 4)).round().astype(np.uint8)
    latents = vae.encode(torch.from_numpy(np.concatenate([videos.reshape(-1, 32, 32, 3), images])).permute(0, 3, 1, 2)
                         .float() / 127.5 - 1, sample=False)
    for base in (True, False):
        with vae.base_decoder() if base else contextlib.nullcontext():
            pixels = ((vae.decode(latents).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        clips, stills = pixels[:videos.shape[0] * frames].reshape(videos.shape), pixels[videos.shape[0] * frames:]
        shapes = [measure_image(f)["shape"] for clip in clips for f in clip]
        assert shapes == [a["shape"] for a in cases for _ in range(frames)], f"base decoder {base}"
        for attrs, clip in zip(cases, clips):
            assert measure_long_video(clip, attrs["direction"])["motion_consistent"], (attrs, base)
        drawn = [dict(a, i=i) for i, a in enumerate(image_cases(1, seed=6))]
        acc = accuracy(drawn, measure_image, lambda a, pixels=stills: pixels[a["i"]], IMAGE_KEYS)
        assert acc["shape"] == acc["color"] == acc["size"] == 1 and acc["position"] >= 0.99, (acc, base)


def test_generated_shapes_are_read_as_a_person_reads_them():
    """Samples of the shipped video model (tests/data/generated-shapes) whose shape a person reads at a glance:
    small squares whose edges fall between pixels, which a thresholded mask's fill read as circles, and a blurred
    yellow triangle ("watch a yellow triangle rise"), two of whose frames a coverage fill alone read as circles."""
    folder = ROOT / "tests" / "data" / "generated-shapes"
    for name in ("red-square", "blue-square", "purple-square"):
        assert measure_image(read_sample(folder / f"{name}.png"))["shape"] == "square", name
    frames = read_sample(folder / "yellow-triangle-rise.mp4")
    assert [measure_image(f)["shape"] for f in frames] == ["triangle"] * 4
    assert measure_video(frames) == dict(color="yellow", shape="triangle", direction="up")
