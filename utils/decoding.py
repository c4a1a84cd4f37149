"""Decoding plans: how each flow block of a checkpoint is inverted when sampling, calibrated on that checkpoint and
device, and stored beside it so that sampling uses it without flags.

A trained STARFlow does not converge evenly under Jacobi iteration.  Its shallow blocks settle in a few sweeps over
a whole frame, while the deep block's tokens depend so strongly on each other (more so under guidance) that its
frontier advances a token or two per sweep, and on a CPU a wide window then costs more than it saves (GS-Jacobi,
arXiv 2505.12849, and Selective Jacobi Decoding, arXiv 2505.24791, find the same imbalance).  `calibrate` measures,
block by block on a few samples, the time of candidate Jacobi settings and the error they cause (relative L2
distance of the final latents to the exact inverse, the block's input being exact and the later blocks decoded
exactly), then picks per block the fastest setting such that the errors add up to at most the tolerance.  A block
where no Jacobi setting beats sequential decoding by a margin stays sequential, so a plan is never slower than
sequential decoding.  The chosen plan is decoded once more as a whole to check its time and error.

    python sample.py --checkpoint_path ckpts/x.safetensors --caption caps.txt --calibrate_decoding 8

writes ckpts/x.decoding.json, which holds plans by device type (cpu, cuda) and by the batch size they were
calibrated at (a plan's best windows shrink as the batch grows); `Model.decoding` holds the loaded plans and
sampling uses the one calibrated nearest its batch size.
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from transformer_flow import SEQUENTIAL, BlockDecoding, Model

PLAN_VERSION = 1


def plan_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's plans live: beside a weights file (x.safetensors -> x.decoding.json), inside a training
    checkpoint folder."""
    path = Path(checkpoint)
    return path / "decoding.json" if path.is_dir() else path.with_suffix(".decoding.json")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("plans"), dict):
            raise KeyError("plans")
        return data
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: not a decoding plan file ({type(err).__name__}: {err}); delete it or calibrate "
                         f"again with --calibrate_decoding") from None


def load_plans(checkpoint: str | os.PathLike, device_type: str, num_blocks: int) -> dict[int, list[BlockDecoding]]:
    """The plans calibrated for this checkpoint on this device type, by the batch size (samples) each was
    calibrated at: one BlockDecoding per block (blocks.0 first).  Empty when there is none.  Raises ValueError
    naming the file when it is unreadable or does not fit the model."""
    path = plan_path(checkpoint)
    if not path.is_file():
        return {}
    entries, plans = _read(path)["plans"].get(device_type, {}), {}
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: bad {device_type} plans (expected plans by batch size)")
    for batch, entry in entries.items():
        try:
            plans[int(batch)] = [BlockDecoding(**block) for block in entry["blocks"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bad {device_type} plan for batch {batch} ({err})") from None
        if len(plans[int(batch)]) != num_blocks:
            raise ValueError(f"{path}: the {device_type} plan has {len(plans[int(batch)])} blocks, the model "
                             f"{num_blocks}")
    return plans


def save_plan(checkpoint: str | os.PathLike, device_type: str, batch: int, plan: list[BlockDecoding],
              report: dict) -> Path:
    """Store `plan`, calibrated at `batch` samples, for this device type beside the checkpoint (the plans of other
    batch sizes and device types are kept); atomic."""
    path = plan_path(checkpoint)
    data = _read(path) if path.is_file() else {"version": PLAN_VERSION, "plans": {}}
    entries = data["plans"].setdefault(device_type, {})
    entries[str(batch)] = {"blocks": [dataclasses.asdict(d) for d in plan], **report}
    data["plans"][device_type] = dict(sorted(entries.items(), key=lambda kv: int(kv[0])))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def candidates(tokens: int, frame_tokens: int) -> list[BlockDecoding]:
    """Jacobi settings tried for a block whose sequence has `tokens` tokens (`frame_tokens` per video frame):
    windows from 2 tokens to a whole frame (at most 1024) and two thresholds; for video, after the first frame a
    window of one or four times that of the first (which may then be decoded sequentially: window 1)."""
    widest = min(frame_tokens, 1024)
    windows = sorted({w for w in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if w < widest} | {widest})
    if tokens <= frame_tokens:
        pairs = [(w, None) for w in windows]
    else:
        pairs = [(w, k * w) for w in [1] + windows for k in (1, 4) if k * w > 1]
    return [BlockDecoding(window=w, threshold=th, frame_window=later) for th in (1e-3, 1e-4) for w, later in pairs]


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative L2 distance ||x - exact|| / ||exact|| over the whole batch."""
    return ((x.float() - exact.float()).norm() / exact.float().norm()).item()


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(seconds, output) of one call, CUDA work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def interleaved(fns: dict, repeats: int) -> dict:
    """Time each function `repeats` times, taking turns so that all see the same machine load.
    Returns {name: (best seconds, median seconds, last output)}."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, outs[name] = timed(fn)
            times[name].append(seconds)
    return {k: (min(t), statistics.median(t), outs[k]) for k, t in times.items()}


def choose(options: list[list[tuple[float, float, BlockDecoding]]], budget: float) -> list[int]:
    """Per block, the index of an option (seconds, error, decoding) such that the errors add up to at most `budget`
    at the least total time (exact: partial plans are extended block by block, keeping only those that no other
    partial plan beats in both time and error).  Option 0 of every block must have error 0."""
    plans = [(0.0, 0.0, [])]  # (seconds, error, picks)
    for block in options:
        grown = sorted((t + o[0], e + o[1], picks + [k]) for t, e, picks in plans for k, o in enumerate(block)
                       if e + o[1] <= budget)
        plans, least = [], math.inf
        for t, e, picks in grown:  # by time: keep a plan only if its error is below every faster plan's
            if e < least:
                plans.append((t, e, picks))
                least = e
    return plans[0][2]


@torch.no_grad()
def calibrate(model: Model, z: torch.Tensor, y: torch.Tensor | None, guidance: float, tolerance: float = 1e-2,
              repeats: int = 2, margin: float = 0.05, verbose: bool = True) -> tuple[list[BlockDecoding], dict]:
    """Calibrate a decoding plan on noise z (B, ...) and text y (as for `Model.reverse`).

    Returns (plan, report): one BlockDecoding per block (blocks.0 first) whose whole-model error on these samples is
    at most `tolerance` (relative L2 to the exact inverse) and whose time is below that of sequential decoding, and
    the measurements (seconds, errors) behind it.  Times are the best of `repeats` runs, taken in turns with
    sequential decoding; a Jacobi setting must beat sequential decoding of its block by `margin` (a fraction) to be
    chosen.
    """
    if not (0 < tolerance < math.inf):
        raise ValueError(f"the calibration tolerance must be a positive number, got {tolerance}")
    n, device = len(model.blocks), z.device
    conditioning = [model.block_guidance(i, y, guidance) for i in range(n)]
    decode = lambda i, x, d: model.reverse_block(i, x, *conditioning[i], d)
    exact = {n - 1: z}  # exact[i]: the exact output of block i (what it decodes from)
    for i in reversed(range(n)):
        exact[i - 1] = decode(i, exact[i], SEQUENTIAL)
    final = exact[-1]

    def finish(i, x):  # decode the blocks after block i exactly
        for k in reversed(range(i)):
            x = decode(k, x, SEQUENTIAL)
        return x

    options, rows = [], []
    log = tqdm.write if verbose else (lambda _: None)
    for i in reversed(range(n)):
        h = model.patchify(exact[i])
        frame = h[0, 0].numel() // h.size(-1) if h.dim() == 5 else h[0].numel() // h.size(-1)
        local = model.config.shallow_block_local and h.dim() == 5 and i < n - 1
        tokens = frame if local else h[0].numel() // h.size(-1)
        tried = candidates(tokens, frame)
        seconds = {SEQUENTIAL: math.inf} | {d: math.inf for d in tried}
        errors, slow = {SEQUENTIAL: 0.0}, set()
        bar = tqdm(total=repeats * len(seconds), desc=f"calibrating block {i}", disable=not verbose, leave=False)
        for _ in range(repeats):
            for d in seconds:
                bar.update()
                if d in slow:
                    continue
                t, out = timed(lambda i=i, d=d: decode(i, exact[i], d))
                seconds[d] = min(seconds[d], t)
                if d not in errors:
                    errors[d] = relative_error(finish(i, out), final)
                if d is not SEQUENTIAL and t > 1.5 * seconds[SEQUENTIAL]:
                    slow.add(d)  # far slower than sequential: not worth more runs
        bar.close()
        base = seconds[SEQUENTIAL]
        choice = [(base, 0.0, SEQUENTIAL)] + sorted((seconds[d], errors[d], d) for d in tried
                                                    if seconds[d] < (1 - margin) * base)
        options.insert(0, choice)
        rows.insert(0, {"block": i, "sequential_s": round(base, 4),
                        "tried": [[_describe(d), round(seconds[d], 4), float(f"{errors.get(d, math.nan):.3g}")]
                                  for d in tried]})
        log(f"block {i}: sequential {base:.3f} s; {len(choice) - 1} of {len(tried)} Jacobi settings faster" +
            (f", best {choice[1][0]:.3f} s at error {choice[1][1]:.1e} ({_describe(choice[1][2])})"
             if len(choice) > 1 else ""))

    budget, plan = tolerance / 2, None  # the blocks' errors do not add exactly: keep room, then check the whole
    for _ in range(4):
        pick = choose(options, budget)
        plan = [o[k][2] for o, k in zip(options, pick)]
        if all(d == SEQUENTIAL for d in plan):
            break
        seq_s, plan_s, error = _compare(model, z, y, guidance, plan, repeats + 1)
        if error <= tolerance:
            plan = plan if plan_s < (1 - margin / 2) * seq_s else None  # the gains must survive in the whole plan
            break
        budget, plan = budget / 4, None
    if plan is None or all(d == SEQUENTIAL for d in plan):
        plan = [SEQUENTIAL] * n
        seq_s, plan_s, error = _compare(model, z, y, guidance, plan, 1)
    for row, o, d in zip(rows, options, plan):
        chosen = next(opt for opt in o if opt[2] == d)
        row.update(chosen=_describe(d), seconds=round(chosen[0], 4), error=float(f"{chosen[1]:.3g}"))
    report = {"measured": {"samples": z.size(0), "guidance": guidance, "tolerance": tolerance,
                           "sequential_s": round(seq_s, 4), "plan_s": round(plan_s, 4),
                           "speedup": round(seq_s / plan_s, 3), "error": float(f"{error:.3g}"), "blocks": rows},
              "device": _device_name(device), "torch": torch.__version__,
              "date": datetime.date.today().isoformat()}
    return plan, report


def _compare(model, z, y, guidance, plan, repeats) -> tuple[float, float, float]:
    """(sequential seconds, plan seconds, plan error) of whole-model decoding, best of `repeats` taken in turns."""
    results = interleaved({"sequential": lambda: model.reverse(z, y, guidance=guidance, jacobi=False),
                           "plan": lambda: model.reverse(z, y, guidance=guidance, decoding=plan)}, repeats)
    (seq_s, _, exact), (plan_s, _, out) = results["sequential"], results["plan"]
    return seq_s, plan_s, relative_error(out, exact)


def _describe(d: BlockDecoding) -> str:
    later = d.frame_window if d.frame_window not in (None, d.window) else None  # candidates set it for video only
    if d.window == 1 and later is None:
        return "sequential"
    first = "sequential" if d.window == 1 else f"Jacobi window {d.window}"
    return f"{first}{f', Jacobi window {later} after the first frame' if later else ''}, threshold {d.threshold:g}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads"
