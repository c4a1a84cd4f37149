"""Numerical agreement with the official STARFlow model on the same weights.

    python -m scripts.compare_official --official ../ml-starflow             # report the figures
    python -m scripts.compare_official --official ../ml-starflow --golden     # also write tests/data/official_*.safetensors

Builds debug-size image and video models (the video one with temporal causality, frame-local shallow blocks, a
wider deep block and a conditional learnable denoiser), randomises the official model's weights, loads them into
ours with `load_official_state_dict`, and compares: forward z and log-determinants, sequential decoding with
guidance, decoding after a prefilled first frame (video), the denoiser, and our converged Jacobi decoding against
the official exact inverse.  The golden files hold the official weights, inputs and outputs, so that
tests/test_official.py checks the same agreement without the official code.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
from scripts.benchmark import import_official
from transformer_flow import Model, load_official_state_dict
from utils.debug import randomize_weights

BASE = dict(in_channels=4, patch_size=1, num_blocks=3, layers_per_block=[1, 1, 2], head_dim=32, rope=1, sos=1,
            txt_size=6, txt_dim=16, cond_top_only=1, use_softplus=1, use_final_norm=1, soft_clip=4.0, seq_order="L2R")
CASES = {
    "image": (dict(BASE, img_size=8, channels=32), (4, 8, 8)),
    "video": (dict(BASE, img_size=4, channels=32, top_block_channels=64, temporal_causal=2, shallow_block_local=1,
                   learnable_self_denoiser=1, conditional_denoiser=1, denoiser_window=2), (3, 4, 4, 4)),
}
GUIDANCE = 1.5
TOLERANCE = {"forward_z": 1e-4, "logdets": 1e-3, "reverse_guided": 1e-3, "prefill_reverse": 1e-3, "denoise": 1e-4,
             "jacobi_vs_exact": 5e-3}


def official_outputs(official, kwargs, shape, seed=0):
    """Inputs and the official model's outputs, keyed by name."""
    torch.manual_seed(seed)
    model = randomize_weights(official.Model(**kwargs), seed, scale=0.5).eval()
    g = torch.Generator().manual_seed(seed + 1)
    t = {"x": torch.randn(2, *shape, generator=g), "y": torch.randn(4, 6, 16, generator=g),
         "noise": torch.randn(2, *shape, generator=g)}
    with torch.no_grad():
        z, _, _, logdets = model(t["x"], t["y"][:2])
        t["forward_z"], t["logdets"] = z, torch.cat([ld.flatten() for ld in logdets])
        t["reverse_guided"] = model(t["noise"], t["y"], reverse=True, guidance=GUIDANCE)
        if len(shape) == 4:
            caches = model(t["reverse_guided"][:, :1], t["y"], context=True)
            t["prefill_reverse"] = model(t["noise"], t["y"], reverse=True, guidance=GUIDANCE, kv_caches=caches)
        if kwargs.get("learnable_self_denoiser"):
            t["denoise"] = model(t["x"], t["y"][:2], denoiser=True)
    return model, t


def our_outputs(model, t):
    with torch.no_grad():
        z, _, _, logdets = model(t["x"], t["y"][:2])
        out = {"forward_z": z, "logdets": torch.cat([ld.flatten() for ld in logdets]),
               "reverse_guided": model.reverse(t["noise"], t["y"], guidance=GUIDANCE, jacobi=False),
               "jacobi_vs_exact": model.reverse(t["noise"], t["y"], guidance=GUIDANCE, jacobi=True,
                                                jacobi_block_size=16, jacobi_th=1e-8, jacobi_max_iter=1000)}
        if "prefill_reverse" in t:
            caches = model.prefill(t["reverse_guided"][:, :1], t["y"])
            out["prefill_reverse"] = model.reverse(t["noise"], t["y"], guidance=GUIDANCE, kv_caches=caches,
                                                   jacobi=False)
        if "denoise" in t:
            out["denoise"] = model.denoise(t["x"], t["y"][:2])
    return out


def compare(model, t) -> dict[str, float]:
    """Max abs difference of each output of ours against the official one (Jacobi against the exact inverse)."""
    ours = our_outputs(model, t)
    reference = lambda k: t["reverse_guided"] if k == "jacobi_vs_exact" else t[k]
    return {k: (v - reference(k)).abs().max().item() for k, v in ours.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="root of an official ml-starflow checkout")
    p.add_argument("--golden", action="store_true", help="write tests/data/official_<case>.safetensors")
    args = p.parse_args()
    official = import_official(args.official.resolve())
    if not torch.distributed.is_initialized():  # the official Jacobi needs a process group; ours does not
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29518")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    failed = False
    for case, (kwargs, shape) in CASES.items():
        reference, t = official_outputs(official, kwargs, shape)
        state = {k: v.clone() for k, v in reference.state_dict().items()}  # the RoPE buffers share one tensor
        model = Model(**kwargs).eval()
        load_official_state_dict(model, state)
        for name, diff in compare(model, t).items():
            ok = diff <= TOLERANCE[name]
            failed |= not ok
            print(f"{case:6s} {name:16s} max |ours - official| {diff:.2e}  (tolerance {TOLERANCE[name]:.0e})"
                  f"{'' if ok else '  FAILED'}")
        if args.golden:
            path = ROOT / "tests" / "data" / f"official_{case}.safetensors"
            tensors = {**{f"weight.{k}": v for k, v in state.items()}, **{f"io.{k}": v.contiguous() for k, v in t.items()}}
            save_file(tensors, str(path), metadata={"kwargs": json.dumps(kwargs), "guidance": str(GUIDANCE)})
            print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
