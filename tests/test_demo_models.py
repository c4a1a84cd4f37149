"""The bundled demo models (ckpts/starflow_shapes_t2i_32x32, ckpts/starflow-v_shapes_t2v_32x32): each loads into the
model its shipped YAML builds, samples its captions right (read back by scripts/eval_shapes.py), and
scripts/demo.sh writes the image grid and the video the README promises."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import THREADS, concurrently, in_process

from dataset import COLORS, DIRECTIONS, POSITIONS, SHAPES, SIZES, parse_vid_size, shape_caption
from scripts.eval_shapes import evaluate, make_captions, measure_image, parse_caption, read_sample
from scripts.extract_images import cut
from utils.config import GROUPS, build_parser, parse_config
from utils.model_setup import load_weights, setup_transformer, stored_metadata

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (captions sampled by the test: training phrasings, plain English; samples that must be right)
    "starflow_shapes_t2i_32x32": (make_captions(8, video=False, seed=0, split="train"), 6),
    "starflow-v_shapes_t2v_32x32": (make_captions(4, video=True, seed=0, split="train"), 3),
}
# What must be right: every attribute (for videos: colour, shape and the direction of motion).
CHECKED = {"image": ("color", "shape", "size", "position"), "video": ("color", "shape", "direction")}


def right(result) -> int:
    """How many samples have every checked attribute right."""
    return sum(not set(s["wrong"]) & set(CHECKED[result["kind"]]) for s in result["samples"])


def run(*argv, cwd=ROOT, threads=THREADS):
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})


@pytest.mark.parametrize("name", MODELS)
def test_shipped_yaml_builds_the_shipped_model(name):
    """The YAML in configs/ and the checkpoint's stored configuration describe the same network: building from the
    YAML and loading the weights strictly works, and the stored input flags are the YAML's."""
    yaml = ROOT / "configs" / f"{name}.yaml"
    ckpt = ROOT / "ckpts" / f"{name}.safetensors"
    args = parse_config(build_parser(*GROUPS), ["--model_config_path", str(yaml)])
    model = setup_transformer(args)
    load_weights(model, ckpt)  # strict: a missing, unexpected or mis-shaped tensor raises
    stored = stored_metadata(ckpt)
    assert stored["config"] == json.loads(json.dumps(dataclasses.asdict(model.config)))
    for key, value in stored["run"].items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_reads_whole_captions(name):
    """Every caption of the grammar and of the phrasings, in the prompt wording the model was trained with (the fps
    sentence for a video model), fits in the model's txt_size: a cut caption loses its last words (the direction of
    motion)."""
    from utils.text import TextEncoder, preprocess_text

    stored = stored_metadata(ROOT / "ckpts" / f"{name}.safetensors")
    run_flags = stored["run"]
    frames, fps = parse_vid_size(run_flags.get("vid_size"))
    fps = fps if run_flags.get("fps_cond") else None
    video = frames > 1
    if video:
        captions = [shape_caption(c, s, "small", direction=d)  # a video caption does not name the size
                    for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]
    else:
        captions = [shape_caption(c, s, z, p) for c, s, z, p in itertools.product(COLORS, SHAPES, SIZES, POSITIONS)]
    # the phrasings it was trained on and evaluated with
    captions += make_captions(1500, video, seed=0, split="train") + make_captions(1500, video, 0, "heldout")
    tokenizer = TextEncoder.from_pretrained(run_flags["text"], run_flags["txt_size"]).tokenizer
    longest = max(len(ids) for ids in tokenizer(preprocess_text(captions, fps=fps))["input_ids"])
    assert longest <= stored["config"]["txt_size"], (longest, stored["config"]["txt_size"])


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_samples_its_captions(name, tmp_path, monkeypatch):
    """Sampling from another directory (the stored ckpts/ paths resolve against the repository) gives samples whose
    attributes match their captions (a broken or random checkpoint gets none right)."""
    import sample

    captions, need = MODELS[name]
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n")
    monkeypatch.chdir(tmp_path)
    out = in_process(sample.main, ["--checkpoint_path", ROOT / "ckpts" / f"{name}.safetensors", "--caption",
                                   "caps.txt", "--save_folder", "1", "--logdir", "samples"])
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "samples" / name / "caps"
    files = sorted(folder.iterdir())
    video = "direction" in parse_caption(captions[0])
    assert [f.name for f in files] == [f"{i:05d}{'.mp4' if video else '.png'}" for i in range(len(captions))]
    pixels = read_sample(files[0])
    assert pixels.shape == ((4, 32, 32, 3) if video else (32, 32, 3))
    result = evaluate(captions, files)
    assert right(result) >= need, result["samples"]


@pytest.mark.slow
def test_demo_script(tmp_path):
    """bash scripts/demo.sh OUTDIR writes the 12-image grid and the 4-video grid for its captions, and says where."""
    out = run("bash", "scripts/demo.sh", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    grid = tmp_path / "demo" / "starflow_shapes_t2i_32x32" / "image_captions-00000.png"
    video = tmp_path / "demo" / "starflow-v_shapes_t2v_32x32" / "video_captions-00000.mp4"
    assert str(grid) in out.stdout and str(video) in out.stdout
    images = read_sample(grid)
    assert images.shape == (3 * 34 + 2, 4 * 34 + 2, 3)  # 3 rows x 4 columns of 32-px tiles, 2-px white lines
    frames = read_sample(video)
    assert frames.shape == (4, 2 * 34 + 2, 2 * 34 + 2, 3)
    for kind, pixels, rows, columns, need in (("image", images, 3, 4, 8), ("video", frames, 2, 2, 3)):
        captions = (tmp_path / "demo" / f"{kind}_captions.txt").read_text().splitlines()
        result = evaluate(captions, list(cut(pixels, rows, columns, 32, 32)))
        assert right(result) >= need, (kind, result["samples"])
    # every frame has its caption's colour, not only most of them (the green triangle's second frame was red before
    # the video checkpoint stored self_denoise: on)
    captions = (tmp_path / "demo" / "video_captions.txt").read_text().splitlines()
    for tile, caption in zip(cut(frames, 2, 2, 32, 32), captions):
        assert [measure_image(f)["color"] for f in tile] == [parse_caption(caption)["color"]] * 4, caption


@pytest.mark.parametrize("name", MODELS)
def test_shipped_decoding_plan_loads_and_held_its_tolerance(name):
    """The bundled models carry CPU decoding plans (ckpts/<name>.decoding.json) whose measured errors met their
    tolerance; a plan with Jacobi windows beat sequential decoding when it was calibrated, and one where no block's
    Jacobi setting did (the video model at batch 16) is sequential decoding, exact.  At least one plan uses Jacobi."""
    from utils.decoding import load_plans, plan_path

    ckpt = ROOT / "ckpts" / f"{name}.safetensors"
    plans = load_plans(ckpt, "cpu", len(stored_metadata(ckpt)["config"]["layers_per_block"]))
    assert plans and any(d.window > 1 for plan in plans.values() for d in plan)
    for batch, entry in json.loads(plan_path(ckpt).read_text())["plans"]["cpu"].items():
        measured = entry["measured"]
        assert measured["error"] <= measured["tolerance"], batch
        if any(d.window > 1 for d in plans[int(batch)]):
            assert measured["plan_s"] < measured["sequential_s"], batch
        else:
            assert measured["error"] == 0, batch


@pytest.mark.slow
def test_a_sample_does_not_depend_on_its_batch_or_process(tmp_path):
    """tests/data/jacobi-batch-five.txt (../shared/cases/jacobi-batch): the same five captions and seed give the
    same samples at batch 5, at batch 1 and split over two torchrun processes: latents within 1e-5, PNGs within one
    level (the Tweedie step before the decoder turns the ~1e-6 rounding differences of a batch's matmuls into at
    most one level in a pixel or two).  Jacobi decoding used to settle tokens on their change over the whole batch
    (max pixel differences up to 52)."""
    from safetensors.torch import load_file

    ckpt = str(ROOT / "ckpts" / "starflow_shapes_t2i_32x32.safetensors")
    captions = str(ROOT / "tests" / "data" / "jacobi-batch-five.txt")
    launches = {"batch5": ([], "5"), "batch1": ([], "1"),
                "torchrun2": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "5")}
    launch = lambda label, argv, batch: lambda: run(
        sys.executable, *argv, str(ROOT / "sample.py"), "--checkpoint_path", ckpt, "--caption", captions,
        "--save_folder", "1", "--save_latents", "1", "--sample_batch_size", batch, "--logdir", str(tmp_path / label),
        threads=1)  # four processes at once on the cores: one thread each
    for out in concurrently(*(launch(label, argv, batch) for label, (argv, batch) in launches.items())):
        assert out.returncode == 0, out.stderr[-3000:]
    folder = lambda label: tmp_path / label / "starflow_shapes_t2i_32x32" / "jacobi-batch-five"
    for i in range(5):
        latents = {label: load_file(folder(label) / f"{i:05d}.safetensors")["latents"] for label in launches}
        pixels = {label: read_sample(folder(label) / f"{i:05d}.png") for label in launches}
        for label in ("batch1", "torchrun2"):
            assert (latents[label] - latents["batch5"]).abs().max() <= 1e-5, (i, label)
            difference = np.abs(pixels[label].astype(int) - pixels["batch5"])
            assert difference.max() <= 1 and (difference > 0).sum() <= 4, (i, label, difference.max())


@pytest.mark.slow
def test_long_video_benchmark_denoises_as_the_official_windows(tmp_path, capsys):
    """scripts/benchmark.py --lengths on the shipped video model: at 1x and 3x the trained length the KV cache is the
    same size (the window bounds it), re-encoded or rolling, each length is timed over as many frames as the
    longest, and the Tweedie step that runs only each window's new frames gives what the official windows (each run
    whole) give, to float rounding, on the trained weights."""
    import re

    from scripts import benchmark

    captions = tmp_path / "c.txt"
    captions.write_text("a blue square moving down\na green triangle moving right\n")
    benchmark.main(["--checkpoint", str(ROOT / "ckpts" / "starflow-v_shapes_t2v_32x32.safetensors"), "--lengths",
                    "1", "3", "--captions", str(captions), "--threads", str(THREADS), "--kv_cache", "reencode",
                    "rolling"])
    out = capsys.readouterr().out
    assert "each length timed 1x 3 times, 3x 1 time, interleaved" in out  # as many frames per row as the longest
    rows = [line for line in out.splitlines() if re.match(r"\| \dx \|", line)]
    assert len(rows) == 3 and "| reencode |" in rows[1] and "| rolling |" in rows[2], rows
    gaps = [float(re.search(r"equal to ([0-9.e+-]+)\)", row)[1]) for row in rows]
    assert max(gaps) < 1e-4, rows
    caches = [re.search(r"\| ([0-9.]+) MB \|", row)[1] for row in rows]
    assert caches[0] == caches[1] == caches[2], rows
