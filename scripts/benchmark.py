"""Speed of sampling and training, ours beside the official code on the same weights.

    python scripts/benchmark.py                          # ours alone
    python scripts/benchmark.py --official ../ml-starflow  # side by side with an official checkout, with ratios

Default setting: channels 256, layers 1,1,1,6, head_dim 64, 16x16x4 latents, 16 text tokens of width 64, batch 2,
guidance 2.0, 2 CPU threads.  Sampling reports the median time over --repeats and the relative L2 distance to the
exact inverse (sequential decoding); training reports tokens/s of forward + backward + AdamW step and peak memory.
"""
import argparse
import contextlib
import importlib
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from transformer_flow import Model, load_official_state_dict  # noqa: E402
from utils.debug import randomize_weights  # noqa: E402

SHARED_MODULES = ("transformer_flow", "misc")


def import_official(path: Path):
    """Import the official transformer_flow.py from a checkout without disturbing our modules of the same names."""
    if not (path / "transformer_flow.py").is_file():
        sys.exit(f"error: --official {path}: no transformer_flow.py there (give the root of an ml-starflow checkout)")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in SHARED_MODULES}
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("transformer_flow")
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if k.split(".")[0] in SHARED_MODULES]:
            sys.modules[f"official_{k}"] = sys.modules.pop(k)
        sys.modules.update(ours)
    return module


def model_kwargs(args):
    return dict(in_channels=args.latent_channels, img_size=args.latent_size, patch_size=1, channels=args.channels,
                num_blocks=len(args.layers), layers_per_block=args.layers, head_dim=args.head_dim, rope=1, sos=1,
                txt_size=args.txt_size, txt_dim=args.txt_dim, cond_top_only=1, use_softplus=1, use_final_norm=1,
                soft_clip=4.0, seq_order="L2R")


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, Linux reports KiB


def train_throughput(model, x, y, steps, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    model.train()

    def step():
        z, _, _, logdets = model(x, y)
        loss = model.get_loss(z, logdets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = timed(lambda: [step() for _ in range(steps)], 1)
    model.eval()
    return x.size(0) * x[0, 0].numel() * steps / seconds, peak_memory_mb(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, help="root of an official ml-starflow checkout to compare against")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 1, 1, 6])
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--latent_size", type=int, default=16)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--txt_size", type=int, default=16)
    p.add_argument("--txt_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--weight_scale", type=float, default=0.25, help="std of the random proj_out weights (x 1/sqrt C)")
    p.add_argument("--jacobi_block_size", type=int, default=16, help="official Jacobi setting (test_sample_image.sh)")
    p.add_argument("--jacobi_th", type=float, default=1e-3)
    p.add_argument("--jacobi_max_iter", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    official = import_official(args.official.resolve()) if args.official else None
    torch.manual_seed(0)
    ours = Model(**model_kwargs(args))
    randomize_weights(ours, 0, args.weight_scale)
    ours.to(device).eval()
    reference = None
    if official is not None:
        reference = official.Model(**model_kwargs(args))
        missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(k.split(".")[-1] in ("var", "attn_mask", "freqs_cos", "freqs_sin")
                                      for k in missing), (missing, unexpected)
        load_official_state_dict(ours, reference.state_dict())  # and back through the official checkpoint loader
        reference.to(device).eval()
        if not torch.distributed.is_initialized():  # the official Jacobi all-reduces on every iteration
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
            torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.latent_channels, args.latent_size, args.latent_size)
    z = torch.randn(shape, generator=g).to(device)
    y = torch.randn(2 * args.batch, args.txt_size, args.txt_dim, generator=g).to(device)
    w = args.guidance
    official_jacobi = dict(jacobi=True, jacobi_block_size=args.jacobi_block_size, jacobi_th=args.jacobi_th,
                           jacobi_max_iter=args.jacobi_max_iter)

    rows = []  # (name, seconds, distance)
    with torch.no_grad():
        t_exact, exact = timed(lambda: ours.reverse(z, y, guidance=w, jacobi=False), args.repeats)
        rows.append(("ours sequential (exact inverse)", t_exact, 0.0))
        t, x = timed(lambda: ours.reverse(z, y, guidance=w), args.repeats)
        rows.append(("ours default", t, rel_l2(x, exact)))
        t, x = timed(lambda: ours.reverse(z, y, guidance=w, **official_jacobi), args.repeats)
        rows.append(("ours Jacobi, official settings", t, rel_l2(x, exact)))
        if reference is not None:
            t, x = timed(lambda: reference(z, y, reverse=True, guidance=w), args.repeats)
            rows.append(("official sequential", t, rel_l2(x, exact)))
            t, x = timed(lambda: reference(z, y, reverse=True, guidance=w, **official_jacobi), args.repeats)
            rows.append(("official Jacobi", t, rel_l2(x, exact)))

    print(f"sampling: {args.batch}x{args.latent_channels}x{args.latent_size}x{args.latent_size} latents, "
          f"guidance {w}, {args.threads} threads, {device}")
    base = rows[-1][1] if reference is not None else None
    for name, seconds, dist in rows:
        ratio = f"  {seconds / base:5.2f}x official Jacobi" if base else ""
        print(f"  {name:34s} {seconds:8.3f} s   rel L2 to exact {dist:.2e}{ratio}")

    x = torch.randn(args.train_batch, *shape[1:], generator=g).to(device)
    y_train = torch.randn(args.train_batch, args.txt_size, args.txt_dim, generator=g).to(device)
    tok, mem = train_throughput(ours, x, y_train, args.train_steps, device)
    print(f"training: batch {args.train_batch}, forward + backward + AdamW")
    print(f"  {'ours':34s} {tok:8.0f} tokens/s   peak memory {mem:.0f} MB")
    if reference is not None:
        tok_ref, mem_ref = train_throughput(reference, x, y_train, args.train_steps, device)
        print(f"  {'official':34s} {tok_ref:8.0f} tokens/s   peak memory {mem_ref:.0f} MB")
        print(f"  ours / official throughput: {tok / tok_ref:.2f}x")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
