"""Debug-size model configurations shared by the tests."""
import os
import subprocess
import sys

import pytest
import torch

from transformer_flow import Model
from utils.debug import randomize_weights

# Shaped like the official 3B text-to-image model: cond_top_only, SOS, softplus, final norm, soft clip, L2R.
IMAGE = dict(in_channels=4, img_size=8, patch_size=1, channels=64, num_blocks=3, layers_per_block=[1, 1, 2],
             head_dim=32, rope=1, sos=1, txt_size=6, txt_dim=16, cond_top_only=1, use_softplus=1, use_final_norm=1,
             soft_clip=4.0, seq_order="L2R")
# Shaped like the official 7B text-to-video model: a wider deep block, temporal causality, frame-local shallow
# blocks and a conditional learnable denoiser with a window.
VIDEO = dict(IMAGE, img_size=4, top_block_channels=96, temporal_causal=2, shallow_block_local=1,
             learnable_self_denoiser=1, conditional_denoiser=1, denoiser_window=2)


@pytest.fixture(params=["dynamic", "static"])
def sweeps(request, monkeypatch):
    """Run a test with both kinds of Jacobi sweep: "dynamic" (the CPU's: slices and gathers of the current widths)
    and "static" (CUDA's, replayed there as CUDA graphs: fixed widths over positions held on the device)."""
    import transformer_flow

    monkeypatch.setattr(transformer_flow, "STATIC_SWEEP_DEVICES", ("cpu",) if request.param == "static" else ())
    return request.param


def tiny_model(seed=0, **kwargs) -> Model:
    torch.manual_seed(seed)
    return randomize_weights(Model(**kwargs), seed, scale=0.5).eval()


# The cores each test may use: all of them (at most 2) when the tests run one at a time, a share under pytest-xdist
# (scripts/test.sh runs one worker per core); the tests' subprocesses get it as OMP_NUM_THREADS.  More threads than
# cores make torch's OpenMP threads wait on each other: several times slower, not a little.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
THREADS = max(1, min(2, len(os.sched_getaffinity(0)) // WORKERS))


def pytest_collection_modifyitems(config, items):
    """The README walk-through (2-3 minutes, the longest test by far) first: with pytest-xdist's `--dist load` the
    other worker meanwhile takes the rest test by test, so it cannot start last and hold up the suite."""
    items.sort(key=lambda item: item.path.name != "test_readme.py" or item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


def in_process(main, argv, run_cli=True) -> subprocess.CompletedProcess:
    """Run an entry point in this process as `python script.py ARGV` would run it, without the 4-5 s of imports a
    new process pays: through utils.config.run_cli (as the entry points' __main__ does; run_cli=False for a script
    whose __main__ calls main() bare).  Returns its exit status, stdout and stderr as subprocess.run gives them:
    sys.exit("text") is status 1 with the text on stderr, and warnings are on stderr unless the interpreter's default
    filters hide them (deprecations outside __main__).  Anything other than SystemExit (what would be a traceback)
    propagates and fails the test."""
    import contextlib
    import io
    import warnings

    from utils.config import run_cli as run

    argv, stdout, stderr, code = [str(a) for a in argv], io.StringIO(), io.StringIO(), 0
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            run(lambda: main(argv)) if run_cli else main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int | None) else print(exit_.code, file=sys.stderr) or 1
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught
                    if not issubclass(w.category, hidden))
    return subprocess.CompletedProcess(argv, code or 0, stdout.getvalue(), shown + stderr.getvalue())


def cli_error(main, argv, run_cli=True) -> tuple[int, str]:
    """`in_process` for a run that must stop with an error: (exit status, stderr)."""
    out = in_process(main, argv, run_cli)
    assert out.returncode != 0, f"{' '.join(out.args)}: did not stop with an error\n{out.stderr[-2000:]}"
    return out.returncode, out.stderr


def concurrently(*calls):
    """Call each of `calls` (independent runs of a subprocess) on its own thread, at once; their results in order.
    On 2 cores two runs take about the time of one: most of a run is Python imports, on one core."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]
