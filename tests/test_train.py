"""Training that trains: a step changes the weights, a skipped step changes nothing, the loss goes down, a resumed
run repeats the uninterrupted one exactly, torchrun + FSDP2 trains and resumes, and bad input is one line."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_error, concurrently, in_process

import train
from utils.config import build_parser, parse_config
from utils.text import minilm_path
from utils.training import learning_rate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "shapes", "--img_size", "16", "--channel_size", "3", "--patch_size", "2", "--channels", "32",
        "--head_dim", "32", "--layers_per_block", "1", "1", "--sos", "1", "--rope", "1", "--seq_order", "L2R",
        "--use_softplus", "1", "--cond_top_only", "1", "--use_final_norm", "1", "--soft_clip", "4",
        "--text", str(minilm_path()), "--txt_size", "24", "--noise_std", "0.1", "--drop_label", "0.1",
        "--batch_size", "4", "--epoch_length", "24", "--lr", "1e-3", "--warmup_steps", "2", "--sample_freq", "0",
        "--num_workers", "0", "--log_every", "100", "--train_seed", "3", "--ema_decay", "0.9"]


def run(*argv, env=None, timeout=600):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_train(*argv) -> subprocess.CompletedProcess:
    """`python train.py ARGV`, in this process (see conftest.in_process)."""
    return in_process(train.main, argv)


def metrics(logdir) -> list[dict]:
    return [json.loads(line) for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 1e-3, 1e-5, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 10) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 1e-5
    assert learning_rate(110, 1e-3, 1e-5, 10, 110) == pytest.approx(1e-5)


def build_step(tmp_path, *extra):
    """The pieces of main() for in-process tests of one optimizer step."""
    from dataset import build_loader
    from utils.model_setup import setup_transformer
    from utils.text import TextEncoder
    from utils.training import EMA, Processes

    args = parse_config(build_parser(*train.GROUPS), TINY + ["--logdir", str(tmp_path), *extra])
    procs, text = Processes(), TextEncoder.from_args(args)
    torch.manual_seed(0)
    model = setup_transformer(args, text.width, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    step = train.Step(args, model, model, None, text, (opt, None), EMA(model, 0.9), procs, "fp32")
    loader = build_loader(args, 0, 1, 2, 0)
    loader.set_epoch(0)
    return step, model, opt, next(iter(loader))


def snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in opt.state.items()})


def test_a_step_changes_the_weights_and_a_skipped_step_changes_nothing(tmp_path):
    step, model, opt, batch = build_step(tmp_path)
    before, _ = snapshot(model, opt)
    out = step([batch], 0, 2, 10)
    assert out["skipped"] == 0 and math.isfinite(out["loss"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    weights, state = snapshot(model, opt)
    ema = {k: v.clone() for k, v in step.ema.params.items()}
    x, captions, meta = batch
    out = step([(x * float("nan"), captions, meta)], 1, 2, 10)  # a non-finite loss
    assert out["skipped"] == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(t, state[p][n]) for p, s in opt.state.items() for n, t in s.items() if torch.is_tensor(t))
    assert all(torch.equal(v, ema[k]) for k, v in step.ema.params.items())
    step.args.grad_skip, step.args.grad_clip = 1, 1e-9  # a gradient-norm spike, once past the first 100 steps
    assert step([batch], 200, 2, 10)["skipped"] == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_learnable_denoiser_trains_with_its_own_optimizer(tmp_path):
    from utils.training import EMA, Processes

    step, model, opt, batch = build_step(tmp_path, "--learnable_self_denoiser", "1", "--conditional_denoiser", "1")
    den = model.learnable_self_denoiser
    opt_d = torch.optim.AdamW(den.parameters(), lr=1e-3)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("learnable")], lr=1e-3)
    step = train.Step(step.args, model, model, None, step.text, (opt, opt_d), EMA(model, 0.9), Processes(), "fp32")
    before = den.proj_out.weight.clone()
    out = step([batch], 0, 2, 10)
    assert out["loss_denoiser"] > 0 and not torch.equal(den.proj_out.weight, before)


def test_loss_goes_down_and_outputs_are_written(tmp_path):
    out = run_train(*TINY, "--logdir", str(tmp_path), "--max_steps", "30", "--epoch_length", "40",
              "--sample_freq", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert (tmp_path / "model.safetensors").is_file() and list((tmp_path / "samples").glob("step-*.png"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600
    assert "starting a new run" in out.stdout and "checkpoint:" in out.stdout


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path):
    """Stop after 3 steps (the step-3 checkpoint is what a stopped run leaves) and resume: steps 4-6 equal."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    out = run_train(*TINY, "--logdir", str(full), "--max_steps", "6", "--save_every_steps", "3",
              "--keep_checkpoints", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    stop = full / "checkpoints" / "step-00000003"
    out = run_train(*TINY, "--logdir", str(resumed), "--max_steps", "6", "--resume_path", str(stop))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {stop} at step 3" in out.stdout
    expected, got = metrics(full)[3:], metrics(resumed)
    assert [m["step"] for m in got] == [4, 5, 6]
    for a, b in zip(expected, got):
        for key in ("loss", "loss_z", "loss_logdet", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])


def test_weights_file_initialises_a_new_run_and_an_interrupted_one_goes_on(tmp_path):
    """--resume_path WEIGHTS starts a new run from those weights (as the video demo model starts from the image
    one); run again on the same logdir, the run under way goes on from its newest checkpoint instead."""
    out = run_train(*TINY, "--logdir", str(tmp_path / "base"), "--max_steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    weights, tuned = tmp_path / "base" / "model.safetensors", tmp_path / "tuned"
    out = run_train(*TINY, "--logdir", str(tuned), "--max_steps", "2", "--resume_path", str(weights))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"initialised the weights from {weights}" in out.stdout
    assert metrics(tuned)[0]["loss"] != metrics(tmp_path / "base")[0]["loss"]  # same seed: only the weights differ
    out = run_train(*TINY, "--logdir", str(tuned), "--max_steps", "3", "--resume_path", str(weights))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {tuned / 'checkpoints' / 'step-00000002'} at step 2" in out.stdout
    assert [m["step"] for m in metrics(tuned)] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_fsdp_trains_writes_a_checkpoint_and_resumes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [*TINY, "--logdir", str(tmp_path), "--fsdp", "1", "--fsdp_text_encoder", "1", "--max_steps", "2",
            "--batch_size", "4"]
    first = run(*torchrun[1:], "train.py", *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step-00000002" / "extra-rank00001.pt").is_file()
    second = run(*torchrun[1:], "train.py", *argv[:-4], "--max_steps", "3", "--batch_size", "4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at step 2" in second.stdout
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_input_is_one_line_and_touches_nothing(tmp_path):
    corrupt = tmp_path / "step-00000005"
    corrupt.mkdir()
    (corrupt / ".metadata").write_bytes(b"not a checkpoint")
    (corrupt / "extra-rank00000.pt").write_bytes(b"garbage")
    before = digest(corrupt / ".metadata")
    unknown = tmp_path / "bad.yaml"
    unknown.write_text("arguments:\n- channels: 32\n- colours: 3\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16), "white").save(lonely / "a.png")
    cases = [
        (["--resume_path", str(tmp_path / "missing")], "missing"),
        (["--resume_path", str(corrupt)], str(corrupt)),
        (["--model_config_path", str(unknown)], "colours"),
        (["--dataset", "folder", "--data", str(empty)], str(empty)),
        (["--dataset", "folder", "--data", str(lonely)], "a.png"),
        (["--fsdp", "1", "--fsdp_replicate", "2"], "--fsdp_replicate 2 needs --fsdp 1 and several processes"),
    ]
    for extra, name in cases:  # in-process: `python train.py` stops the same way, less the imports
        code, stderr = cli_error(train.main, [*TINY, "--logdir", str(tmp_path / "run"), "--max_steps", "1", *extra])
        assert code != 0 and "Traceback" not in stderr, stderr[-1500:]
        errors = [line for line in stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and name in errors[0], stderr[-1500:]
    assert digest(corrupt / ".metadata") == before


@pytest.mark.slow
def test_torchrun_ddp_with_denoiser_and_accumulation(tmp_path):
    """DDP (--fsdp 0) routes both training calls through its forward; the .pth export loads like an official one."""
    from transformer_flow import Model, load_official_state_dict
    from utils.model_setup import setup_transformer

    argv = [*TINY, "--logdir", str(tmp_path), "--fsdp", "0", "--max_steps", "2", "--acc", "2", "--batch_size", "8",
            "--learnable_self_denoiser", "1", "--conditional_denoiser", "1", "--export_name", "model.pth"]
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss_denoiser"] > 0 for m in lines)
    args = parse_config(build_parser(*train.GROUPS), argv)
    model = setup_transformer(args, 384, 1)
    load_official_state_dict(model, torch.load(tmp_path / "model.pth", weights_only=True))
    assert isinstance(model, Model)


# the tiny run's 8 tokens cut "(extend) a blue square moving left"; only the caption's start is checked here
@pytest.mark.filterwarnings("ignore:captions are cut")
def test_drop_image_trains_on_the_clip_without_its_first_frame(tmp_path):
    """--drop_image: the first latent frame is dropped and the caption says "(extend)" (and the model still trains)."""
    step, model, opt, _ = build_step(tmp_path, "--vid_size", "4:8", "--temporal_causal", "2", "--shallow_block_local",
                                     "1", "--epoch_length", "8", "--drop_image", "1.0", "--drop_label", "0")
    from dataset import build_loader

    loader = build_loader(step.args, 0, 1, 2, 0)
    loader.set_epoch(0)
    x, captions, meta = next(iter(loader))
    seen, encode = [], step.text
    step.text = lambda captions, *a, **k: seen.extend(captions) or encode(captions, *a, **k)
    latents, y = step.inputs(x, captions, meta)
    out = step([(x, captions, meta)], 0, 2, 10)
    assert latents.shape[1] == x.shape[1] - 1 and y.shape[0] == x.shape[0]
    assert seen and all(c.startswith("(extend) ") for c in seen)
    assert out["skipped"] == 0 and math.isfinite(out["loss"])


@pytest.mark.filterwarnings("ignore:captions are cut")
@pytest.mark.parametrize("drop_image", [0, 1])
def test_continuation_clips_are_scored_after_their_context(tmp_path, monkeypatch, drop_image):
    """--shapes_continuation: the loss is told each sample's given frames (all but the last of a continuation clip,
    one fewer when --drop_image took the first frame off), and the step trains; an image model refuses the flag."""
    step, model, opt, (x, captions, meta) = build_step(
        tmp_path, "--vid_size", "4:8", "--temporal_causal", "2", "--shallow_block_local", "1", "--epoch_length", "8",
        "--shapes_motion", "bounce", "--shapes_continuation", "0.5", "--drop_image", str(drop_image))
    seen, get_loss = [], model.get_loss
    monkeypatch.setattr(model, "get_loss", lambda *a, context=None: seen.append(context) or get_loss(*a, context=context))
    out = step([(x, captions, meta)], 0, 2, 10)
    assert sorted(set(meta["context"].tolist())) == [0, 3]
    assert seen[0].tolist() == (meta["context"] - drop_image).clamp(min=0).tolist()
    assert out["skipped"] == 0 and math.isfinite(out["loss"])
    code, err = cli_error(train.main, [*TINY, "--logdir", str(tmp_path / "image"), "--shapes_continuation", "0.5"])
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: --shapes_continuation 0.5 scores")
    code, err = cli_error(train.main, [*TINY, "--logdir", str(tmp_path / "image"), "--shapes_from_to", "0.5"])
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: --shapes_from_to 0.5: a share"), err
    assert not (tmp_path / "image").exists() or not any((tmp_path / "image").iterdir())


def test_half_precision_export_halves_the_file_and_loads_back(tmp_path):
    """--export_dtype fp16 stores every weight rounded to fp16 (half the bytes, the config kept); loading casts them
    back into an fp32 model exactly."""
    from transformer_flow import Model
    from utils.model_setup import load_weights, stored_metadata
    from utils.training import Processes, export_weights

    torch.manual_seed(0)
    model = Model(in_channels=3, img_size=8, patch_size=2, channels=32, head_dim=32, num_blocks=2,
                  layers_per_block=[1, 1], txt_size=4, txt_dim=16, sos=1)
    procs = Processes(device=torch.device("cpu"))
    export_weights(model, tmp_path / "fp32.safetensors", procs)
    export_weights(model, tmp_path / "fp16.safetensors", procs, dtype=torch.float16)
    sizes = [(tmp_path / f"{name}.safetensors").stat().st_size for name in ("fp32", "fp16")]
    assert 0.45 < sizes[1] / sizes[0] < 0.55
    assert stored_metadata(tmp_path / "fp16.safetensors")["config"]["channels"] == 32
    loaded = Model(model.config)
    load_weights(loaded, tmp_path / "fp16.safetensors")
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert q.dtype == torch.float32 and torch.equal(q, p.detach().half().float()), name


# ---- runs that stop and go on (issue 16) --------------------------------------------------------------------------
CONSTANT_LR = ["--lr", "1e-3", "--min_lr", "1e-3", "--warmup_steps", "0"]  # the same schedule for any budget


def assert_same_steps(expected: list[dict], got: list[dict]):
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got):
        for key in ("loss", "loss_z", "loss_logdet", "grad_norm", "lr"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("budget", [("--epochs", "1", "2"), ("--max_steps", "6", "9")])
def test_a_finished_run_goes_on_with_a_larger_budget(tmp_path, budget):
    """A run that ended (here exactly at an epoch's end, where its data position is the epoch's last batch) is run
    again with more --epochs or a larger --max_steps: it goes on at the next step of the next epoch, and with a
    schedule that does not depend on the budget its steps equal those of a run that had the larger budget."""
    flag, before, after = budget
    common = [*TINY, *CONSTANT_LR, "--sample_freq", "1"]  # the end-of-epoch preview is where it used to crash
    common += ["--epochs", "5"] if flag == "--max_steps" else []
    finished, whole = tmp_path / "finished", tmp_path / "whole"
    out = run_train(*common, "--logdir", str(finished), flag, before)
    assert out.returncode == 0, out.stderr[-2000:]
    out = run_train(*common, "--logdir", str(finished), flag, after)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "at step 6 (epoch 1)" in out.stdout and f"done at step {9 if flag == '--max_steps' else 12}" in out.stdout
    out = run_train(*common, "--logdir", str(whole), flag, after)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_steps(metrics(whole), metrics(finished))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR1", "--time_limit"])
def test_preemption_checkpoints_and_the_next_launch_goes_on_exactly(tmp_path, how):
    """SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job) and --time_limit: the run finishes its
    step, writes a checkpoint, says where in one line and exits 0; the same command then continues, and every step
    equals the uninterrupted run's (1e-6)."""
    import signal
    import time

    argv = [sys.executable, "train.py", *TINY, "--max_steps", "10", "--save_every", "1000"]
    stopped = tmp_path / "stopped"
    extra = ["--time_limit", "0.001"] if how == "--time_limit" else []
    process = subprocess.Popen([*argv, "--logdir", str(stopped), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        if how != "--time_limit":
            deadline = time.monotonic() + 300
            while not ((stopped / "metrics.jsonl").is_file() and len(metrics(stopped)) >= 2):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
                time.sleep(0.05)
            process.send_signal(getattr(signal, how))
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    lines = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert process.returncode == 0 and len(lines) == 1 and how in lines[0], (stdout, stderr[-2000:])
    step = len(metrics(stopped))
    assert step < 10 and (stopped / "checkpoints" / f"step-{step:08d}").is_dir()
    out = run_train(*TINY, "--max_steps", "10", "--save_every", "1000", "--logdir", str(stopped))
    assert out.returncode == 0 and f"resuming from {stopped / 'checkpoints'}" in out.stdout, out.stderr[-2000:]
    whole = tmp_path / "whole"
    out = run_train(*TINY, "--max_steps", "10", "--save_every", "1000", "--logdir", str(whole))
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_steps(metrics(whole), metrics(stopped))


def test_going_on_with_another_architecture_is_refused_and_changed_settings_are_noted(tmp_path):
    """Config drift: a run continued with a different model is one line listing what differs (and the checkpoint is
    untouched); settings a user changes on purpose (learning rate, budget) are noted in one line."""
    out = run_train(*TINY, "--max_steps", "2", "--logdir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    out = run_train(*TINY, "--max_steps", "3", "--channels", "64", "--head_dim", "32", "--logdir", str(tmp_path))
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert "another architecture (channels 32 -> 64; top_block_channels 32 -> 64)" in errors[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    out = run_train(*TINY, "--max_steps", "3", "--lr", "5e-4", "--logdir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "note: going on with changed settings: lr 0.001 -> 0.0005, max_steps 2 -> 3" in out.stdout


def test_a_full_disk_or_a_cut_off_save_never_costs_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that fails (no space left) is one CheckpointError and removes its partial folder; a folder left by a
    save that was killed (step-N.tmp) or cut short (no .metadata) is never taken for the newest checkpoint."""
    from dataset import build_loader
    from utils.training import (
        CheckpointError,
        Processes,
        TrainState,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    step, model, opt, _ = build_step(tmp_path / "run")
    loader = build_loader(step.args, 0, 1, 2, 0)
    state = TrainState(model, [opt], None, loader, step.generator, torch.device("cpu"), {}, {})
    folder, procs = tmp_path / "checkpoints", Processes()
    state.step = 1
    first = save_checkpoint(folder, state, procs)
    state.step = 2

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step-00000002: the checkpoint could not be written \(OSError: "
                                              r"\[Errno 28\] No space left on device\); the previous checkpoints"):
        save_checkpoint(folder, state, procs)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001"] and latest_checkpoint(folder) == first

    shutil.copytree(first, folder / "step-00000003.tmp")  # killed before its rename
    shutil.copytree(first, folder / "step-00000004")
    (folder / "step-00000004" / ".metadata").unlink()  # cut short after it
    assert latest_checkpoint(folder) == first
    state.step = 0
    load_checkpoint(latest_checkpoint(folder), state, procs)
    assert state.step == 1


def workers_of(logdir: Path) -> list[int]:
    """PIDs of the train.py processes torchrun started for this logdir (not torchrun itself)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(logdir).encode() in words and b"train.py" in words and b"torch.distributed.run" not in words:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint(tmp_path):
    """torchrun --max-restarts 1: a rank killed with SIGKILL mid-run makes torchrun restart both ranks, which go on
    from the newest complete checkpoint; the run ends with the weights of a run that was never killed."""
    import signal
    import time

    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1"]
    argv = [*TINY, "--batch_size", "4", "--max_steps", "8", "--save_every_steps", "2", "--keep_checkpoints", "0"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen([sys.executable, *torchrun, "train.py", *argv, "--logdir", str(killed)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not ((killed / "metrics.jsonl").is_file() and len(metrics(killed)) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.05)
        os.kill(max(workers_of(killed)), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=400)
    finally:
        process.kill()
        for pid in workers_of(killed):
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("starting a new run") == 1 and "resuming from" in stdout, stdout
    out = run(*torchrun, "train.py", *argv, "--logdir", str(whole))
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    ours, theirs = load_file(killed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_go_on(tmp_path):
    """Two torchrun agents (two "nodes" on this machine, one process each, c10d rendezvous) train with FSDP2, write
    one checkpoint between them, and go on from it."""
    def launch(max_steps: str) -> list[str]:
        endpoint = f"127.0.0.1:{free_port()}"
        argv = [*TINY, "--batch_size", "4", "--fsdp", "1", "--max_steps", max_steps, "--logdir", str(tmp_path)]
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                   "1", "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                   endpoint, "--rdzv-id", f"run-{max_steps}", "train.py", *argv], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
        try:
            outputs = [node.communicate(timeout=400) for node in nodes]
        finally:
            for node in nodes:
                node.kill()
        assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
        return [out for out, _ in outputs]

    launch("2")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-00000002").glob("extra-rank*")) == [
        "extra-rank00000.pt", "extra-rank00001.pt"]
    stdout = "".join(launch("4"))
    assert "at step 2" in stdout and [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_hsdp_trains_on_a_2x2_mesh_and_its_checkpoint_goes_on_with_2_and_4_processes(tmp_path):
    """--fsdp_replicate 2 with 4 processes: FSDP2 on a (replicate 2, shard 2) mesh.  Its step-2 checkpoint goes on
    under plain FSDP with 4 processes and with 2 (DCP reshards the weights and optimizer state); without noise
    augmentation or caption dropout the global batches and the math are the same, so the losses and the final
    weights equal the uninterrupted HSDP run's."""
    argv = [*TINY, "--noise_std", "0", "--drop_label", "0", "--batch_size", "8", "--fsdp", "1", "--max_steps", "4",
            "--save_every_steps", "2", "--keep_checkpoints", "0"]
    launch = lambda n, *extra: run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                                   "train.py", *argv, *extra, timeout=400)
    hsdp = launch(4, "--fsdp_replicate", "2", "--logdir", str(tmp_path / "hsdp"))
    assert hsdp.returncode == 0, hsdp.stderr[-3000:]
    checkpoint = tmp_path / "hsdp" / "checkpoints" / "step-00000002"
    for name in ("fsdp4", "fsdp2"):
        shutil.copytree(checkpoint, tmp_path / name / "checkpoints" / checkpoint.name)
    fsdp4, fsdp2 = concurrently(lambda: launch(4, "--logdir", str(tmp_path / "fsdp4")),
                                lambda: launch(2, "--logdir", str(tmp_path / "fsdp2")))
    for out, n in ((fsdp4, 4), (fsdp2, 2)):
        assert out.returncode == 0, out.stderr[-3000:]
        assert "at step 2" in out.stdout
        assert ("written by 4 process(es), going on with 2" in out.stdout) == (n == 2)
    from safetensors.torch import load_file

    expected, weights = metrics(tmp_path / "hsdp")[2:], load_file(tmp_path / "hsdp" / "model.safetensors")
    for name in ("fsdp4", "fsdp2"):
        got = metrics(tmp_path / name)
        assert [m["step"] for m in got] == [3, 4]
        assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(expected, got)), (expected, got)
        resumed = load_file(tmp_path / name / "model.safetensors")
        assert all(torch.allclose(resumed[k], weights[k], atol=1e-5) for k in weights)


@pytest.mark.slow
def test_one_step_on_two_processes_equals_the_single_process_step(tmp_path):
    """One optimizer step on 2 processes, FSDP2 (--fsdp 1) and DDP, equals the single-process step on the same
    global batch: the logged loss and the updated weights within 1e-5 (without noise augmentation and caption
    dropout, which draw from per-rank streams).  FSDP2's "returned a view tensor" warning is not shown: our
    modules return views, but nothing changes them in place (this test is the proof)."""
    from safetensors.torch import load_file

    argv = [*TINY, "--noise_std", "0", "--drop_label", "0", "--batch_size", "8", "--max_steps", "1",
            "--warmup_steps", "0", "--lr", "1e-2", "--ema_decay", "0"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"single": [], "fsdp": [*torchrun, "--fsdp", "1"], "ddp": [*torchrun, "--fsdp", "0"]}
    results = concurrently(*(lambda name=name, launch=launch: run(*launch[:5], "train.py", *argv, *launch[5:],
                                                                    "--logdir", str(tmp_path / name), timeout=400)
                             for name, launch in runs.items()))
    for name, out in zip(runs, results):
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert "returned a view tensor" not in out.stderr, name
    (single,), weights = metrics(tmp_path / "single"), load_file(tmp_path / "single" / "model.safetensors")
    assert single["grad_norm"] > 0 and not single["skipped"]
    for name in ("fsdp", "ddp"):
        (step,) = metrics(tmp_path / name)
        assert abs(step["loss"] - single["loss"]) < 1e-5 and abs(step["grad_norm"] - single["grad_norm"]) < 1e-4
        theirs = load_file(tmp_path / name / "model.safetensors")
        assert theirs.keys() == weights.keys()
        assert all(torch.allclose(theirs[k], weights[k], atol=1e-5) for k in weights), name


def test_oversubscribed_cpu_processes_are_noted(monkeypatch, capsys):
    """torchrun on CPU with more processes x threads than cores (e.g. OMP_NUM_THREADS=2 for 2 processes on 2
    cores) runs several times slower: rank 0 says so in one line and names the thread count that fits.  More
    processes than cores at one thread each is the user's choice, not noted."""
    from utils import training

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)  # (the group itself is not what is tested)
    for local, threads, noted in ((cores, 1, False), (cores + 1, 1, False), (cores, 2, True)):
        torch.set_num_threads(threads)
        monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        assert training.init_processes("cpu").world_size == 2
        out = capsys.readouterr().out
        assert (out == f"note: {local} processes with 2 thread(s) each on {cores} CPU cores are oversubscribed "
                       "(several times slower); set OMP_NUM_THREADS=1 (torchrun's default is 1)\n") if noted else not out
