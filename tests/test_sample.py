"""sample.py as a user runs it: one process or torchrun, files written, determinism, self-denoising, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import cli_error, concurrently, in_process

import sample as script
import train

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--img_size", "16", "--channel_size", "3", "--patch_size", "2", "--channels", "32", "--head_dim", "32",
        "--sos", "1", "--seq_order", "L2R", "--use_softplus", "1", "--cond_top_only", "1", "--use_final_norm", "1",
        "--soft_clip", "4", "--text", "sentence-transformers/all-MiniLM-L6-v2", "--txt_size", "8", "--noise_std",
        "0.1", "--drop_label", "0.1", "--num_workers", "0", "--sample_freq", "0", "--lr", "2e-3", "--warmup_steps",
        "2", "--log_every", "1000", "--cfg", "1.5"]
IMAGE = [*BASE, "--layers_per_block", "1", "2", "--batch_size", "8", "--epoch_length", "64", "--max_steps", "40"]
VIDEO = [*BASE, "--layers_per_block", "1", "1", "--vid_size", "4:8", "--temporal_causal", "2",
         "--shallow_block_local", "1", "--learnable_self_denoiser", "1", "--conditional_denoiser", "1",
         "--denoiser_window", "2", "--batch_size", "4", "--epoch_length", "16", "--max_steps", "4"]


def run(*argv, timeout=600):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny image and video models trained by our own train.py on the shapes data (pixel space, no VAE)."""
    logdirs = {kind: tmp_path_factory.mktemp(kind) for kind in ("image", "video")}
    for kind, argv in (("image", IMAGE), ("video", VIDEO)):
        result = in_process(train.main, ["--dataset", "shapes", *argv, "--logdir", logdirs[kind]])
        assert result.returncode == 0, result.stderr[-3000:]
    return {kind: logdir / "model.safetensors" for kind, logdir in logdirs.items()}


@pytest.fixture
def captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a small red circle left\na large blue square right\nein grüner Kreis ✓\n"
                    "a large yellow triangle top\na small purple circle center\n", encoding="utf-8")
    return path


def sample(checkpoint, logdir, *argv, torchrun=False):
    """`python sample.py ARGV` in this process (see conftest.in_process), or under `torchrun --nproc_per_node 2`."""
    argv = ["--checkpoint_path", str(checkpoint), "--logdir", str(logdir), *argv]
    if not torchrun:
        return in_process(script.main, argv)
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sample.py", *argv)


def read(path: Path) -> np.ndarray:
    return iio.imread(path) if path.suffix == ".png" else np.stack(list(iio.imiter(path, plugin="FFMPEG")))


@pytest.mark.parametrize("kind,suffix,shape", [("image", ".png", (16, 16, 3)), ("video", ".mp4", (4, 16, 16, 3))])
def test_one_file_per_caption_and_deterministic(trained, captions, tmp_path, kind, suffix, shape):
    out = sample(trained[kind], tmp_path / "a", "--caption", str(captions), "--save_folder", "1",
                 "--sample_batch_size", "2", "--seed", "5")
    again = sample(trained[kind], tmp_path / "b", "--caption", str(captions), "--save_folder", "1",  # another batching
                   "--sample_batch_size", "3", "--seed", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "a" / "model" / "captions"
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:05d}{suffix}" for i in range(5)]
    assert all(read(f).shape == shape for f in files)
    assert "5 samples in" in out.stdout and "samples/s" in out.stdout
    assert again.returncode == 0, again.stderr[-3000:]
    for f in files:  # the same seed gives the same samples, whatever the batching
        other = read(tmp_path / "b" / "model" / "captions" / f.name)
        assert np.abs(other.astype(int) - read(f).astype(int)).max() <= (0 if suffix == ".png" else 2)
    assert not np.array_equal(read(files[0]), read(files[1]))


@pytest.mark.slow
def test_torchrun_splits_captions_into_one_complete_set(trained, captions, tmp_path):
    multi, grid = concurrently(
        lambda: sample(trained["image"], tmp_path / "two", "--caption", str(captions), "--save_folder", "1",
                       "--sample_batch_size", "2", torchrun=True),
        lambda: sample(trained["image"], tmp_path / "grid", "--caption", "a small red circle left",
                       "--sample_batch_size", "3", torchrun=True))
    single = sample(trained["image"], tmp_path / "one", "--caption", str(captions), "--save_folder", "1")
    assert single.returncode == 0, single.stderr[-2000:]
    assert multi.returncode == 0, multi.stderr[-3000:]
    files = sorted((tmp_path / "two" / "model" / "captions").iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    for f in files:  # each caption's sample depends on its index and the seed only, not on the process
        assert np.array_equal(read(f), read(tmp_path / "one" / "model" / "captions" / f.name))
    assert grid.returncode == 0, grid.stderr[-3000:]
    grids = sorted((tmp_path / "grid" / "model").glob("samples-*.png"))
    assert [g.name for g in grids] == ["samples-00000.png", "samples-00001.png"]  # one grid per process
    assert not np.array_equal(read(grids[0]), read(grids[1]))


def test_flow_score_step_moves_samples_toward_the_data(trained):
    """Tweedie with the flow's own score: noisy data move closer to the clean data, and their likelihood rises."""
    from dataset import ShapesDataset
    from transformer_flow import Model, ModelConfig
    from utils.inference import flow_score_step
    from utils.model_setup import load_weights, stored_metadata
    from utils.text import TextEncoder

    path = trained["image"]
    model = Model(ModelConfig(**stored_metadata(path)["config"])).eval()
    load_weights(model, path)
    text = TextEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", txt_size=8)
    data = ShapesDataset(16, img_size=16)
    clean = torch.stack([torch.from_numpy(data.load(i, np.random.default_rng(0))[0].copy()).permute(2, 0, 1)
                         for i in range(16)]).float() / 127.5 - 1
    y = text([data.load(i, np.random.default_rng(0))[1] for i in range(16)])
    sigma = 0.1
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    denoised = flow_score_step(model, noisy, y, sigma)

    def nll(x):
        with torch.no_grad():
            z, _, _, logdets = model(x, y)
            return model.get_loss(z, logdets)["loss"].item()

    assert nll(denoised) < nll(noisy)
    assert (denoised - clean).norm() < (noisy - clean).norm()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_image_to_video_starts_from_the_given_frame(trained, tmp_path):
    from PIL import Image

    first = tmp_path / "first.png"
    Image.new("RGB", (20, 24), (220, 40, 40)).save(first)
    first.with_suffix(".txt").write_text("a red circle moving right\na blue square moving up\n")
    out = sample(trained["video"], tmp_path / "v", "--input_image", str(first), "--save_folder", "1",
                 "--caption", str(first.with_suffix(".txt")))
    assert out.returncode == 0, out.stderr[-3000:]
    for video in sorted((tmp_path / "v" / "model" / "first").glob("*.mp4")):
        frames = read(video)
        assert frames.shape == (4, 16, 16, 3)
        target = np.broadcast_to(np.array([220, 40, 40], np.uint8), frames[0].shape)
        assert psnr(frames[0], target) > 20  # the given frame, up to the training noise and H.264
        assert psnr(frames[-1], target) < psnr(frames[0], target)  # the rest is generated


def test_long_video_beyond_the_trained_length(trained, tmp_path):
    out = sample(trained["video"], tmp_path / "long", "--caption", "a green triangle moving left",
                 "--target_length", "12", "--sample_batch_size", "1", "--out_fps", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    frames = read(next((tmp_path / "long" / "model").glob("samples-*.mp4")))
    assert frames.shape[0] == 12  # 3x the 4 trained frames


def test_bad_input_is_one_line(trained, captions, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained["image"].read_bytes()[:5000])
    other = tmp_path / "other.safetensors"  # the image model's configuration over the video model's weights
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(trained["image"]), "pt") as f:
        meta = f.metadata()
    with safe_open(str(trained["video"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(other), metadata=meta)
    official = tmp_path / "official.pth"
    with safe_open(str(trained["image"]), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, official)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    not_image = tmp_path / "not_image.png"
    not_image.write_text("hello")
    ckpt, cap = str(trained["image"]), "a red circle"
    cases = [
        ([str(tmp_path / "missing.safetensors"), "--caption", cap], "missing.safetensors"),
        ([str(truncated), "--caption", cap], "truncated.safetensors"),
        ([str(other), "--caption", cap], "blocks."),
        ([str(official), "--caption", cap], "--model_config_path"),
        ([ckpt, "--caption", cap, "--aspect_ratio", "7:3", "--mix_aspect", "1"], "--aspect_ratio"),
        ([str(trained["video"]), "--caption", cap, "--input_image", str(not_image)], "not_image.png"),
        ([ckpt, "--caption", str(empty)], "empty.txt"),
        ([ckpt, "--caption", cap, "--jacobi_block_size", "0"], "--jacobi_block_size"),
        ([ckpt, "--caption", cap, "--cfg", "-1"], "--cfg"),
    ]
    for argv, name in cases:
        code, stderr = cli_error(script.main, ["--checkpoint_path", *argv, "--logdir", str(tmp_path / "out")])
        errors = [line for line in stderr.splitlines() if line.startswith("error")]
        assert code != 0 and "Traceback" not in stderr, (argv, stderr[-1500:])
        assert len(errors) == 1 and name in stderr[stderr.index("error"):], (argv, stderr[-1500:])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


@pytest.mark.slow
def test_video_under_torchrun(trained, tmp_path):
    captions = tmp_path / "videos.txt"
    captions.write_text("a red circle moving right\na blue square moving up\na green triangle moving left\n")
    out = sample(trained["video"], tmp_path / "v", "--caption", str(captions), "--save_folder", "1", torchrun=True)
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted((tmp_path / "v" / "model" / "videos").iterdir())
    assert [f.name for f in files] == ["00000.mp4", "00001.mp4", "00002.mp4"]
    assert all(read(f).shape == (4, 16, 16, 3) for f in files)


def test_official_style_checkpoint_with_its_yaml(trained, tmp_path):
    """An official .pth stores no configuration: the YAML (official format) rebuilds the model."""
    from safetensors import safe_open

    official = tmp_path / "official.pth"
    with safe_open(str(trained["image"]), "pt") as f:
        torch.save({**{k: f.get_tensor(k) for k in f.keys()}, "var": torch.ones(64, 12)}, official)  # + a dead buffer
    yaml = tmp_path / "official.yaml"  # the tiny model's training flags, in the official format
    yaml.write_text("arguments:\n- img_size: 16\n- channel_size: 3\n- patch_size: 2\n- channels: 32\n- head_dim: 32\n"
                    "- layers_per_block: 1 2\n- sos: 1\n- seq_order: L2R\n- use_softplus: 1\n- cond_top_only: 1\n"
                    "- use_final_norm: 1\n- soft_clip: 4\n- text: sentence-transformers/all-MiniLM-L6-v2\n"
                    "- txt_size: 8\n- noise_std: 0.1\n- cfg: 1.5\n")
    out = sample(official, tmp_path / "o", "--model_config_path", str(yaml), "--caption", "a small red circle left",
                 "--sample_batch_size", "2", "--seed", "5")
    ours = sample(trained["image"], tmp_path / "s", "--caption", "a small red circle left", "--sample_batch_size",
                  "2", "--seed", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert np.array_equal(read(tmp_path / "o" / "official" / "samples-00000.png"),
                          read(tmp_path / "s" / "model" / "samples-00000.png"))


def test_calibrated_plan_is_stored_beside_the_checkpoint_and_used(trained, captions, tmp_path):
    """--calibrate_decoding writes <stem>.decoding.json beside the checkpoint; sampling then uses it without flags
    (and says so), --jacobi 0 still decodes exactly; a damaged plan file is one line naming it."""
    import shutil

    ckpt = tmp_path / "model.safetensors"
    shutil.copy(trained["image"], ckpt)
    out = sample(ckpt, tmp_path / "cal", "--caption", str(captions), "--calibrate_decoding", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = tmp_path / "model.decoding.json"
    assert f"written to {plan}" in out.stdout and not (tmp_path / "cal").exists()  # no samples
    assert len(json.loads(plan.read_text())["plans"]["cpu"]["3"]["blocks"]) == 2
    used = sample(ckpt, tmp_path / "a", "--caption", str(captions))
    exact = sample(ckpt, tmp_path / "b", "--caption", str(captions), "--jacobi", "0")
    assert used.returncode == 0 and f"decoding: calibrated plan {plan}" in used.stdout, used.stderr[-2000:]
    assert exact.returncode == 0 and "decoding: exact (sequential)" in exact.stdout, exact.stderr[-2000:]
    plan.write_text("{")
    code, stderr = cli_error(script.main, ["--checkpoint_path", ckpt, "--logdir", tmp_path / "c", "--caption",
                                           captions])
    assert code != 0 and "Traceback" not in stderr
    assert "model.decoding.json: not a decoding plan file" in stderr.splitlines()[-1]


@pytest.mark.parametrize("kind,flags,name", [
    ("image", ["--cfg", "inf"], "--cfg"), ("image", ["--cfg", "nan"], "--cfg"),
    ("image", ["--sample_batch_size", "0"], "--sample_batch_size"),
    ("image", ["--sample_batch_size", "-2"], "--sample_batch_size"), ("image", ["--attn_temp", "0"], "--attn_temp"),
    ("image", ["--jacobi_max_iter", "0"], "--jacobi_max_iter"), ("image", ["--jacobi_th", "-1e-3"], "--jacobi_th"),
    ("image", ["--calibrate_decoding", "-1"], "--calibrate_decoding"),
    ("image", ["--target_length", "8"], "--target_length"), ("image", ["--rolling_kv_cache"], "--rolling_kv_cache"),
    ("video", ["--target_length", "12", "--context_length", "4"], "--context_length"),
])
def test_bad_sampling_flags_are_one_line(trained, tmp_path, kind, flags, name):
    """Out-of-range sampling flags (../shared/cases/README.md: they used to give a traceback, a false success or
    silent garbage) are refused in one line naming the flag and the allowed range, and nothing is written."""
    argv = ["--checkpoint_path", str(trained[kind]), "--caption", "a red circle", "--logdir", str(tmp_path), *flags]
    code, err = cli_error(script.main, argv)  # progress bars of the text encoder's loading may come first
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and name in errors[0] and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_earlier_samples_are_kept_unless_overwrite(tmp_path, capsys):
    """Sampling again under the same name keeps the earlier files: a grid goes to <name>-2-NNNNN.png, a
    --save_folder folder to <name>-2/, each with a note; --overwrite replaces them.  Beside a --save_folder folder
    <name>.captions.txt records its captions, and the evaluator refuses to score it against other captions."""
    from scripts import eval_shapes

    ckpt, logdir = str(ROOT / "ckpts" / "starflow_shapes_t2i_32x32.safetensors"), tmp_path / "logs"
    folder = logdir / "starflow_shapes_t2i_32x32"
    grid = lambda caption, *more: script.main(["--checkpoint_path", ckpt, "--caption", caption, "--logdir",
                                                 str(logdir), "--sample_batch_size", "1", *more])
    grid("a large red circle on the left")
    grid("a large blue circle on the left")
    note = capsys.readouterr().out
    assert f"note: {folder / 'samples-00000.*'} holds earlier samples; these go to {folder / 'samples-2'}" in note
    red, blue = read(folder / "samples-00000.png"), read(folder / "samples-2-00000.png")
    assert red[..., 0].mean() > red[..., 2].mean() and blue[..., 2].mean() > blue[..., 0].mean()
    grid("a large blue circle on the left", "--overwrite")
    assert "holds earlier samples" not in capsys.readouterr().out
    blue = read(folder / "samples-00000.png")
    assert blue[..., 2].mean() > blue[..., 0].mean() and not (folder / "samples-3-00000.png").exists()
    captions = tmp_path / "c.txt"
    for text in ("a large red circle on the left", "a small green square on the right"):
        captions.write_text(text + "\n")
        script.main(["--checkpoint_path", ckpt, "--caption", str(captions), "--save_folder", "1", "--logdir",
                        str(logdir)])
    assert "these go to" in capsys.readouterr().out
    assert (folder / "c.captions.txt").read_text() == "a large red circle on the left\n"
    assert (folder / "c-2.captions.txt").read_text() == "a small green square on the right\n"
    with pytest.raises(SystemExit) as stop:  # c.txt now holds the second caption: folder c has the first's sample
        eval_shapes.main(["--captions", str(captions), "--samples", str(folder / "c")])
    assert str(stop.value) == (f"error: {folder / 'c'} holds samples of other captions than these "
                               f"({folder / 'c.captions.txt'} differs)")
    eval_shapes.main(["--captions", str(captions), "--samples", str(folder / "c-2")])


def test_two_runs_model_files_never_overwrite_each_others_samples(tmp_path, capsys):
    """logs/runA/model.safetensors and logs/runB/model.safetensors share a file stem: the first one's samples go to
    <logdir>/model (its checkpoint.txt names it), the second one's to <logdir>/runB-model with a note; each goes back
    to its own folder next time.  Written files can be read by the group and others (the umask's mode, not 0600)."""
    shipped = ROOT / "ckpts" / "starflow_shapes_t2i_32x32.safetensors"
    for run_name in ("runA", "runB"):
        (tmp_path / run_name).mkdir()
        shutil.copy(shipped, tmp_path / run_name / "model.safetensors")
    logdir = tmp_path / "logs"
    folders = {}
    for run_name in ("runA", "runB", "runA", "runB"):
        script.main(["--checkpoint_path", str(tmp_path / run_name / "model.safetensors"), "--caption",
                        f"a small {'red' if run_name == 'runA' else 'blue'} circle on the left", "--logdir",
                        str(logdir), "--save_latents", "1"])
        out = capsys.readouterr().out
        folders.setdefault(run_name, set()).add(out.split("outputs in ")[-1].strip())
        assert ("holds another checkpoint's samples" in out) == (run_name == "runB"), out
    assert folders == {"runA": {str(logdir / "model")}, "runB": {str(logdir / "runB-model")}}
    for folder, run_name in ((logdir / "model", "runA"), (logdir / "runB-model", "runB")):
        assert (folder / "checkpoint.txt").read_text().strip() == str((tmp_path / run_name / "model.safetensors").resolve())
    red, blue = read(logdir / "model" / "samples-00000.png"), read(logdir / "runB-model" / "samples-00000.png")
    assert red[..., 0].mean() > red[..., 2].mean() and blue[..., 2].mean() > blue[..., 0].mean()
    mask = os.umask(0)
    os.umask(mask)
    for written in (logdir / "model" / "samples-00000.png", logdir / "model" / "samples-00000.safetensors"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~mask, written
