"""Speed of sampling and training, ours beside the official code on the same weights.

    python -m scripts.benchmark --checkpoint ckpts/starflow_shapes_t2i_32x32.safetensors --official ../ml-starflow
    python -m scripts.benchmark --checkpoint CKPT.pth --config ITS.yaml --captions caps.txt --official ../ml-starflow
    python -m scripts.benchmark                          # random weights, ours alone
    python -m scripts.benchmark --official ../ml-starflow  # random weights, side by side, with ratios

With --checkpoint: sampling of a trained checkpoint (ours: its calibrated decoding plan, else the default plan; and
exact sequential decoding), beside the official code (--official: its Jacobi decoding at the settings of its example
scripts, and its sequential decoding) on the same weights, noise and text embeddings, at the guidance stored in the
checkpoint, for the first --batch captions.  When the captions are shapes captions (scripts/eval_shapes.py grammar),
all of them are also sampled and decoded to pixels with our default and our exact decoding, and their caption
accuracies compared.  Without --captions, 4 shapes captions.

Random-weight setting: channels 256, layers 1,1,1,6, head_dim 64, 16x16x4 latents, 16 text tokens of width 64,
batch 2, guidance 2.0 (--calibrate also calibrates a decoding plan for it and times that).  Training reports
tokens/s of a forward + backward + AdamW step.

Runs take turns (ours, official, ours, ...) and the best of --repeats is reported, with the median beside it;
sampling reports the relative L2 distance to the exact inverse (our sequential decoding, which equals the official
sequential decoding bit for bit).  2 CPU threads by default.
"""
import argparse
import contextlib
import dataclasses
import importlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

from transformer_flow import KVCache, Model, ModelConfig, load_official_state_dict
from utils.config import POSITIVE, Parser, add_device_args
from utils.debug import randomize_weights
from utils.decoding import interleaved, relative_error
from utils.files import read_lines

SHARED_MODULES = ("transformer_flow", "misc")


def import_official(path: Path):
    """Import the official transformer_flow.py from a checkout without disturbing our modules of the same names."""
    if not (path / "transformer_flow.py").is_file():
        sys.exit(f"error: --official {path}: no transformer_flow.py there (give the root of an ml-starflow checkout)")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in SHARED_MODULES}
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("transformer_flow")
    except ModuleNotFoundError as err:  # the official code's own requirements (einops, ...), not ours
        sys.exit(f"error: --official {path}: its code needs the module {err.name!r}, which is not installed here "
                 f"(pip install {err.name})")
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if k.split(".")[0] in SHARED_MODULES]:
            sys.modules[f"official_{k}"] = sys.modules.pop(k)
        sys.modules.update(ours)
    return module


def random_setting(args) -> dict:
    """The ModelConfig of the random-weight setting, written as the model flags a user would type."""
    from utils.config import add_data_args, add_model_args, build_parser, model_options

    flags = ["--channel_size", args.latent_channels, "--img_size", args.latent_size, "--patch_size", 1,
             "--channels", args.channels, "--layers_per_block", *args.layers, "--head_dim", args.head_dim,
             "--txt_size", args.txt_size, "--sos", "--cond_top_only", "--use_softplus", "--use_final_norm",
             "--soft_clip", 4, "--seq_order", "L2R"]
    parsed = build_parser(add_model_args, add_data_args).parse_args([str(f) for f in flags])
    options = model_options(parsed, args.txt_dim, downsample_factor=1)
    return dataclasses.asdict(ModelConfig(**options))


def print_sampling(results: dict, width: int):
    """One line per sampling run of `interleaved`: best and median time, relative L2 distance to the run named
    "ours sequential (exact inverse)", and the time as a multiple of the official Jacobi run's, if there is one."""
    exact = results["ours sequential (exact inverse)"][2]
    base = next((best for name, (best, _, _) in results.items() if name.startswith("official Jacobi")), None)
    for name, (best, median, x) in results.items():
        ratio = f"  {best / base:5.2f}x official Jacobi" if base else ""
        print(f"  {name:{width}s} {best:7.3f} s (median {median:.3f})   rel L2 to exact "
              f"{relative_error(x, exact):.2e}{ratio}")


def _proc_status_mb(field: str) -> float | None:
    """VmRSS or VmHWM (peak RSS since the last reset) of this process, on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = _proc_status_mb("VmHWM")  # whole process
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: restart the peak-RSS count from the current RSS
            Path("/proc/self/clear_refs").write_text("5")


def current_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    current = _proc_status_mb("VmRSS")
    return current if current is not None else peak_memory_mb(device)


def train_step_fn(model, x, y):
    """A closure running one forward + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def step():
        model.train()
        z, _, _, logdets = model(x, y)
        model.get_loss(z, logdets)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    step()  # warm-up: allocates the optimizer state
    return step


def config_benchmark(args, device):
    """Training throughput and peak memory, and sampling time with and without Jacobi (with the distance to the exact
    inverse), of the flow model of a YAML configuration, with random weights, latents and text of its shapes (no VAE
    or text encoder needed).  For video models, --lengths also samples 1x, 2x, ... the trained number of frames with
    a sliding window of the trained length and with full attention, and reports the deep block's KV-cache memory
    (what grows with the length) and, on CUDA, the peak allocated memory."""
    from dataset import parse_vid_size
    from utils.config import GROUPS, build_parser, parse_config
    from utils.model_setup import setup_transformer, text_width, vae_downsample_factors

    cfg = parse_config(build_parser(*GROUPS), ["--model_config_path", str(args.config)])
    factor, temporal = vae_downsample_factors(cfg.vae) if cfg.vae else (1, 1)
    txt_dim = text_width(cfg.text) if cfg.text else 0
    torch.manual_seed(0)
    model = randomize_weights(setup_transformer(cfg, txt_dim, factor), 0, args.weight_scale).to(device)
    side = cfg.img_size // factor
    frames = (parse_vid_size(cfg.vid_size)[0] - 1) // temporal + 1 if cfg.vid_size else 0
    shape = (frames, cfg.channel_size, side, side) if frames else (cfg.channel_size, side, side)
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randn(n, cfg.txt_size, txt_dim, generator=g).to(device) if txt_dim else None
    print(f"{args.config}: {sum(p.numel() for p in model.parameters()):,} parameters, latents {shape}, {device}")

    x = torch.randn(args.train_batch, *shape, generator=g).to(device)
    reset_peak(device)
    best, median, _ = interleaved({"step": train_step_fn(model, x, text(args.train_batch))}, args.train_steps)["step"]
    tokens = x.size(0) * x[0, ..., 0, :, :].numel() // (cfg.patch_size ** 2)
    print(f"  training, batch {args.train_batch} ({tokens} tokens): {tokens / best:.0f} tokens/s "
          f"(median {tokens / median:.0f}), peak memory {peak_memory_mb(device):.0f} MB")

    z = torch.randn(args.batch, *shape, generator=g).to(device)
    guidance = args.guidance if txt_dim else 0.0
    y = text(2 * args.batch if guidance > 0 else args.batch)
    with torch.no_grad():
        results = interleaved({"sequential (exact)": lambda: model.reverse(z, y, guidance=guidance, jacobi=False),
                               "default (Jacobi)": lambda: model.reverse(z, y, guidance=guidance)}, args.repeats)
    exact = results["sequential (exact)"][2]
    for name, (best, median, out) in results.items():
        print(f"  sampling, batch {args.batch}, {name}: {best:.3f} s (median {median:.3f}), "
              f"rel L2 to exact {relative_error(out, exact):.2e}")

    for k in args.lengths if frames else []:
        long = torch.randn(1, k * frames, *shape[1:], generator=g).to(device)
        for window in (frames, None):  # the trained length as a sliding window, and full attention to compare
            model.blocks[-1].local_attn_window = window
            caches = [KVCache() for _ in model.blocks]
            reset_peak(device)
            base = current_memory_mb(device)
            with torch.no_grad():
                start = time.perf_counter()
                out = model.reverse(long, text(2 if guidance > 0 else 1), guidance=guidance, kv_caches=caches,
                                    context_length=frames - 1 if window else None)
            cache_mb = sum(t.untyped_storage().nbytes() for c in caches for t in c.keys + c.values) / 2 ** 20
            memory = f", peak memory +{peak_memory_mb(device) - base:.0f} MB" if device.type == "cuda" else ""
            print(f"  video {k}x the trained length ({out.size(1)} latent frames), "
                  f"{f'window {window}' if window else 'full attention'}: {time.perf_counter() - start:.2f} s, "
                  f"KV cache {cache_mb:.1f} MB{memory}")


def checkpoint_benchmark(args, device):
    """Sampling of a trained checkpoint: ours (default and exact decoding) beside the official code (Jacobi and
    sequential) on the same weights, noise and text; caption accuracy for shapes checkpoints."""
    import numpy as np

    from scripts.eval_shapes import evaluate, make_captions, parse_caption, report
    from utils.config import ConfigError
    from utils.decoding import plan_path
    from utils.pipeline import STARFlowPipeline

    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
    official = import_official(args.official.resolve()) if args.official else None  # before the slow loading
    pipe = STARFlowPipeline.from_pretrained(args.checkpoint, args.config, device)
    pipe.set_progress_bar_config(disable=True)
    model, video = pipe.model, pipe.trained_frames > 1
    if args.lengths:
        if not video:
            raise ConfigError(f"--lengths: {args.checkpoint} is an image model")
        return long_video_benchmark(args, pipe)
    captions = read_lines(args.captions, "--captions") if args.captions is not None else make_captions(4, video, seed=0)
    timed = captions[:args.batch]
    (h, w_), ratio = pipe.image_size()
    w, fps, noise_std = pipe.resolve()
    z = pipe.prepare_latents(len(timed), h, w_, pipe.trained_frames, pipe.args.seed)
    y = pipe.encode_prompt(timed, None, w, ratio, fps, noise_std)
    plan = f"calibrated plan {plan_path(args.checkpoint)}" if model.decoding else "default plan"
    runs = {f"ours default ({plan})": lambda: model.reverse(z, y, guidance=w),
            "ours sequential (exact inverse)": lambda: model.reverse(z, y, guidance=w, jacobi=False)}
    if official is not None:
        reference = official.Model(**dataclasses.asdict(model.config))
        missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(k.split(".")[-1] in ("var", "attn_mask", "freqs_cos", "freqs_sin")
                                      for k in missing), (missing, unexpected)
        reference.to(device).eval()
        _official_process_group(device)
        block = args.jacobi_block_size or (32 if video else 16)  # the official example scripts' settings
        settings = dict(jacobi=True, jacobi_block_size=block, jacobi_th=args.jacobi_th,
                        jacobi_max_iter=args.jacobi_max_iter)
        runs[f"official Jacobi (block {block}, th {args.jacobi_th:g}, {args.jacobi_max_iter} it.)"] = \
            lambda: reference(z, y, reverse=True, guidance=w, **settings)
        runs["official sequential"] = lambda: reference(z, y, reverse=True, guidance=w)
    with torch.no_grad():
        results = interleaved(runs, args.repeats)
    rows = y.size(0) if y is not None else len(timed)
    print(f"{args.checkpoint}: {len(timed)} captions, guidance {w:g} (batch {rows} rows), latents "
          f"{tuple(z.shape[1:])}, {args.threads} threads, {device}; best and median of {args.repeats}, interleaved")
    print_sampling(results, 58)

    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return  # not shapes captions: no accuracy to measure
    accuracy = {}
    for name, decoding in (("default", {}), ("exact", {"jacobi": False})):
        pixels, batch = [], pipe.args.sample_batch_size
        for i in range(0, len(captions), batch):
            idx = list(range(i, min(i + batch, len(captions))))
            out = pipe([captions[j] for j in idx], seed=pipe.args.seed, indices=idx, **decoding)
            pixels += [np.stack([np.asarray(f) for f in v]) for v in out.frames] if video else \
                [np.asarray(im) for im in out.images]
        accuracy[name] = evaluate(captions, pixels)
        print(f"caption accuracy, {name} decoding\n{report(accuracy[name])}")
    gap = 100 * (accuracy["default"]["accuracy"]["all"] - accuracy["exact"]["accuracy"]["all"])
    print(f"default - exact decoding, all attributes right: {gap:+.1f} points")


KV_CACHE_MODES = {"reencode": "re-encoded at each slide (official)", "rolling": "rolling (--rolling_kv_cache)"}


def long_video_benchmark(args, pipe):
    """Videos of a trained video checkpoint at --lengths multiples of its trained length, with the sliding window of
    the trained length: time per generated frame (the whole pipeline: text, flow, self-denoising, VAE), the deep
    block's KV-cache memory, and for shapes captions the long-video figures of scripts/eval_shapes.evaluate_long
    (issue "long videos").

    Each length is timed over about as many frames as the longest (k x the trained length is sampled max/k times,
    the same videos each time), its runs interleaved with the other lengths': a 1x row of a few seconds, timed once,
    swung the 8x / 1x ratio from 1.1x to 1.5x between runs of the same network on a CPU whose speed wanders.
    Lengths past the trained one get a row per --kv_cache mode: the context re-encoded at each slide (the official
    sampler's) and/or a rolling KV cache (`Model.reverse(rolling_kv_cache=True)`)."""

    from scripts.eval_shapes import evaluate_long, make_captions
    from utils.inference import denoise

    captions = read_lines(args.captions, "--captions") if args.captions else make_captions(36, True, seed=0, split="train")
    trained, batch = pipe.trained_frames, pipe.args.sample_batch_size
    repeats = {k: max(max(args.lengths) // k, 1) for k in args.lengths}
    # one row per length and KV-cache mode; the trained length never slides, so it has one row whatever the mode
    rows = [(k, mode) for k in args.lengths for mode in (args.kv_cache[:1] if k == 1 else args.kv_cache)]
    print(f"{args.checkpoint}: {len(captions)} captions, trained length {trained} frames (the sliding window), "
          f"batch {batch}, {args.threads} threads, {pipe.device}; each length timed "
          + ", ".join(f"{k}x {n} time{'s' * (n > 1)}" for k, n in repeats.items()) + ", interleaved; KV cache "
          + " and ".join(KV_CACHE_MODES[m] for m in args.kv_cache))
    print("| length | frames | KV cache when the window slides | time per frame | self-denoising per frame: ours / "
          "official windows | KV cache | presence | colour stable | shape stable | motion consistent (clips) | "
          "background drift (mean / max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    model, window = pipe.model, (trained - 1) // pipe.temporal + 1
    _, fps, noise_std = pipe.resolve(None, None, None)
    pipe(captions[:batch], num_frames=trained, seed=pipe.args.seed)  # warm-up: the first call's one-off costs
    elapsed, videos, cache, last = dict.fromkeys(rows, 0.0), {r: [] for r in rows}, dict.fromkeys(rows, 0), {}
    for r in range(max(repeats.values())):
        for k, mode in ((k, mode) for k, mode in rows if r < repeats[k]):
            start = time.perf_counter()
            for i in range(0, len(captions), batch):
                idx = list(range(i, min(i + batch, len(captions))))
                out = pipe([captions[j] for j in idx], num_frames=k * trained, seed=pipe.args.seed, indices=idx,
                           rolling_kv_cache=mode == "rolling")
                pixels = list(out.as_uint8())
                if r == 0:
                    videos[k, mode] += pixels
                    cache[k, mode] = max(cache[k, mode], out.kv_cache_bytes)
            elapsed[k, mode] += time.perf_counter() - start
            last[k, mode] = out, idx
    for k, mode in rows:
        frames, (out, idx), denoising = k * trained, last[k, mode], {True: 0.0, False: 0.0}
        seconds = elapsed[k, mode] / (repeats[k] * len(captions) * frames)
        # the Tweedie step alone on the last batch's latents, each way: the same values, the time side by side
        y = pipe.encode_prompt([captions[j] for j in idx], None, 0.0, None, fps, noise_std)
        steps = {}
        for continued in (True, False) if model.config.temporal_causal else ():
            tick = time.perf_counter()
            steps[continued] = denoise(model, out.latents, y, noise_std, False, pipe.args.denoising_batch_size,
                                       window, model.config.denoiser_window, continued=continued)
            denoising[continued] = 1000 * (time.perf_counter() - tick) / (len(idx) * frames)
        side = "" if not steps else f"{denoising[True]:.0f} / {denoising[False]:.0f} ms (equal to " \
            f"{(steps[True] - steps[False]).abs().max().item():.0e})"
        row = f"| {k}x | {frames} | {'' if k == 1 else mode} | {1000 * seconds:.0f} ms | {side} | " \
            f"{cache[k, mode] / 2 ** 20:.2f} MB |"
        try:
            result = evaluate_long(captions, videos[k, mode])
        except ValueError:  # not shapes captions
            print(row + " | | | | |")
            continue
        drift = result["background_drift"]
        print(row + f" {result['presence']:.1%} | {result['color_stable']:.1%} | {result['shape_stable']:.1%} | "
              f"{result['motion_consistent']:.1%} ({result['consistent_steps']:.1%} of steps, "
              f"{result['bounces']:.1f} bounces) | "
              f"{drift['mean']:.1f} / {drift['max']:.1f} |")


def _official_process_group(device: torch.device):
    """The official Jacobi all-reduces on every iteration: it needs a process group, even for one process (NCCL on
    CUDA, as the official torchrun scripts run it; gloo on the CPU)."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, help="root of an official ml-starflow checkout to compare against")
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint (ours, or an official .pth with --config)")
    p.add_argument("--captions", type=Path, help="with --checkpoint: caption file (the first --batch are timed)")
    p.add_argument("--calibrate", action="store_true", help="random-weight setting: also time a calibrated plan")
    add_device_args(p)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each kind, interleaved")
    p.add_argument("--channels", type=int, default=256, help="random-weight setting: transformer width")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 1, 1, 6],
                   help="random-weight setting: layers per flow block, the deep block last")
    p.add_argument("--head_dim", type=int, default=64, help="random-weight setting: channels per head")
    p.add_argument("--latent_size", type=int, default=16, help="random-weight setting: latent side, in latents")
    p.add_argument("--latent_channels", type=int, default=4, help="random-weight setting: latent channels")
    p.add_argument("--txt_size", type=int, default=16, help="random-weight setting: text tokens")
    p.add_argument("--txt_dim", type=int, default=64, help="random-weight setting: text embedding width")
    p.add_argument("--batch", type=int, default=None, help="samples timed (default: 2, or 4 with --checkpoint)")
    p.add_argument("--train_batch", type=int, default=8, help="samples per timed training step")
    p.add_argument("--train_steps", type=int, default=8, help="timed training steps")
    p.add_argument("--guidance", type=float, default=2.0, help="random-weight setting: guidance scale")
    p.add_argument("--weight_scale", type=float, default=0.25, help="std of the random proj_out weights (x 1/sqrt C)")
    p.add_argument("--jacobi_block_size", type=int, default=None,
                   help="official Jacobi window (default 16, or 32 for video: test_sample_*.sh)")
    p.add_argument("--jacobi_th", type=float, default=1e-3, help="official Jacobi threshold")
    p.add_argument("--jacobi_max_iter", type=int, default=32, help="official Jacobi iterations per window")
    p.add_argument("--config", type=Path, help="measure this YAML configuration's model instead (random weights); "
                   "with --checkpoint, the checkpoint's configuration")
    p.add_argument("--kv_cache", nargs="+", choices=list(KV_CACHE_MODES), default=["reencode"],
                   help="with --lengths: how the deep block's KV cache follows the sliding window, one row each: "
                        "reencode (the official sampler's: the kept context re-encoded within the window) and/or "
                        "rolling (sample.py --rolling_kv_cache: kept as computed, no re-encoding pass)")
    p.add_argument("--lengths", type=POSITIVE, nargs="*", default=[], help="video models: sample these multiples of the "
                   "trained length (e.g. 1 4 8); with --config, random weights: time and memory; with --checkpoint: "
                   "time per frame (each length over about as many frames as the longest, interleaved), KV cache and, for "
                   "shapes captions (36 by default), the long-video figures")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.checkpoint:
        args.batch = args.batch or 4
        return checkpoint_benchmark(args, device)
    args.batch = args.batch or 2
    args.jacobi_block_size = args.jacobi_block_size or 16
    if args.config:
        return config_benchmark(args, device)

    official = import_official(args.official.resolve()) if args.official else None
    torch.manual_seed(0)
    ours = Model(**random_setting(args))
    randomize_weights(ours, 0, args.weight_scale)
    ours.to(device).eval()
    reference = None
    if official is not None:
        reference = official.Model(**random_setting(args))
        missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(k.split(".")[-1] in ("var", "attn_mask", "freqs_cos", "freqs_sin")
                                      for k in missing), (missing, unexpected)
        load_official_state_dict(ours, reference.state_dict())  # and back through the official checkpoint loader
        reference.to(device).eval()
        _official_process_group(device)

    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.latent_channels, args.latent_size, args.latent_size)
    z = torch.randn(shape, generator=g).to(device)
    y = torch.randn(2 * args.batch, args.txt_size, args.txt_dim, generator=g).to(device)
    w = args.guidance
    official_jacobi = dict(jacobi=True, jacobi_block_size=args.jacobi_block_size, jacobi_th=args.jacobi_th,
                           jacobi_max_iter=args.jacobi_max_iter)

    runs = {"ours sequential (exact inverse)": lambda: ours.reverse(z, y, guidance=w, jacobi=False),
            "ours default plan": lambda: ours.reverse(z, y, guidance=w),
            "ours Jacobi, official settings": lambda: ours.reverse(z, y, guidance=w, **official_jacobi)}
    if args.calibrate:
        from utils.decoding import calibrate

        plan, _ = calibrate(ours, z, y, w)
        runs["ours calibrated plan"] = lambda: ours.reverse(z, y, guidance=w, decoding=plan)
    if reference is not None:
        runs["official sequential"] = lambda: reference(z, y, reverse=True, guidance=w)
        runs["official Jacobi"] = lambda: reference(z, y, reverse=True, guidance=w, **official_jacobi)
    with torch.no_grad():
        results = interleaved(runs, args.repeats)

    print(f"sampling: {args.batch}x{args.latent_channels}x{args.latent_size}x{args.latent_size} latents, "
          f"guidance {w}, {args.threads} threads, {device}; best and median of {args.repeats}, interleaved")
    print_sampling(results, 34)

    x = torch.randn(args.train_batch, *shape[1:], generator=g).to(device)
    y_train = torch.randn(args.train_batch, args.txt_size, args.txt_dim, generator=g).to(device)
    steps = {"ours": train_step_fn(ours, x, y_train)}
    if reference is not None:
        steps["official"] = train_step_fn(reference, x, y_train)
    reset_peak(device)
    results = interleaved(steps, args.train_steps)
    tokens = x.size(0) * x[0, 0].numel()
    print(f"training: batch {args.train_batch} ({tokens} tokens), forward + backward + AdamW, best of "
          f"{args.train_steps} steps; peak memory {peak_memory_mb(device):.0f} MB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process RSS, both models'})")
    for name, (best, median, _) in results.items():
        print(f"  {name:34s} {tokens / best:8.0f} tokens/s (median {tokens / median:.0f})")
    if reference is not None:
        print(f"  ours / official throughput: {results['official'][0] / results['ours'][0]:.2f}x")


if __name__ == "__main__":
    from utils.config import run_cli

    with contextlib.suppress(KeyboardInterrupt):
        try:
            run_cli(main)
        finally:
            if torch.distributed.is_initialized():  # the official side's process group
                torch.distributed.destroy_process_group()
