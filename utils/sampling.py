"""sample.py's work: captions -> files, through the pipeline (utils.pipeline), split across torchrun's processes.

`sample(args)` runs a whole sample.py command line (parsed by utils.config with SAMPLING_GROUPS).
"""
import itertools
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset import parse_vid_size
from utils.config import ASPECT_RATIOS, ConfigError, check_image_size
from utils.decoding import calibrate, plan_path, save_plan
from utils.files import read_lines
from utils.media import save_image, save_latents, save_video
from utils.pipeline import STARFlowPipeline
from utils.training import init_processes

TEMPLATES = {  # --caption <name>
    "shapes": "a large red circle center",
    "shapes_video": "a blue square moving right",
    "portrait": "A studio portrait of an old fisherman with a grey beard, soft window light, film grain.",
    "city": "A rainy city street at night, neon reflections on the wet asphalt, seen from a low angle.",
    "landscape": "Snow-capped mountains above a still lake at sunrise, mist over the water, wide-angle photograph.",
}


SOURCE_FILE = "checkpoint.txt"  # in an output folder: the checkpoint whose samples it holds
CAPTIONS_SUFFIX = ".captions.txt"  # beside a --save_folder folder <name>/: its captions, line i for <i:05d>.png


def output_folder(logdir: Path, checkpoint: str) -> Path:
    """Where a checkpoint's samples go: <logdir>/<its file stem>, unless that folder holds another checkpoint's
    samples (its SOURCE_FILE names another path: two runs' model.safetensors), then <logdir>/<run folder>-<stem>,
    then with -2, -3, ...: one checkpoint's samples never overwrite another's."""
    path = Path(checkpoint).resolve()
    run = f"{path.parent.name}-{path.stem}"
    for name in itertools.chain([path.stem, run], (f"{run}-{k}" for k in range(2, 10_000))):
        marker = logdir / name / SOURCE_FILE
        if not marker.is_file() or marker.read_text(encoding="utf-8").strip() == str(path):
            return logdir / name
    raise ConfigError(f"--logdir {logdir}: no free folder for the samples of {checkpoint}")


def read_captions(args, procs) -> tuple[list[str], str]:
    """All captions of the run (every process sees the same list) and a name for the outputs."""
    if args.caption is None:
        raise ConfigError("--caption is required: a caption, a template name or a .txt file of captions")
    if args.caption.endswith(".txt"):
        return read_lines(args.caption, "--caption"), Path(args.caption).stem
    text = TEMPLATES.get(args.caption, args.caption)
    return [text] * (args.sample_batch_size * procs.world_size), "samples"


def calibrate_decoding(args, procs, captions, pipe: STARFlowPipeline):
    """--calibrate_decoding N: calibrate a decoding plan on the first N captions and store it beside the checkpoint."""
    if procs.world_size > 1:
        raise ConfigError("--calibrate_decoding times this device alone: run it with plain python, not torchrun")
    if args.target_length or args.input_image:
        flag = "--input_image" if args.input_image else "--target_length"
        raise ConfigError(f"--calibrate_decoding calibrates plain generation: drop {flag}")
    n = args.calibrate_decoding
    captions = (captions * n)[:n]
    (h, w), ratio = pipe.image_size()
    guidance, fps, noise_std = pipe.resolve()
    noise = pipe.prepare_latents(n, h, w, pipe.trained_frames, args.seed)
    y = pipe.encode_prompt(captions, None, guidance, ratio, fps, noise_std)
    print(f"calibrating the decoding of {args.checkpoint_path} on {n} captions (guidance {guidance:g}, "
          f"tolerance {args.calibration_tolerance:g}) on {procs.device} ...")
    plan, report = calibrate(pipe.model, noise, y, guidance, args.calibration_tolerance)
    path = save_plan(args.checkpoint_path, procs.device.type, n, plan, report)
    measured = report["measured"]
    for row in measured["blocks"]:
        print(f"  block {row['block']}: {row['chosen']} ({row['seconds']:.3f} s, sequential "
              f"{row['sequential_s']:.3f} s, error {row['error']:.1e})")
    print(f"whole model: {measured['plan_s']:.3f} s vs {measured['sequential_s']:.3f} s sequential "
          f"({measured['speedup']:.2f}x), relative L2 to the exact inverse {measured['error']:.1e}; plan for "
          f"{procs.device.type} at batch {n} written to {path}")


def outputs_name(folder: Path, name: str, per_caption: bool, overwrite: bool) -> tuple[str, str | None]:
    """The name of a run's outputs in `folder` (`name`-NNNNN.png|.mp4 grids, or a `name`/ folder of one file per
    caption) and a note when it is not `name`: earlier outputs of that name are never replaced unless `overwrite`;
    the run takes `name`-2, -3, ... instead."""
    def taken(candidate: str) -> bool:
        if per_caption:
            return (folder / candidate).is_dir() and any((folder / candidate).iterdir())
        return any(folder.glob(f"{candidate}-[0-9][0-9][0-9][0-9][0-9].*"))

    if overwrite or not taken(name):
        return name, None
    free = next(f"{name}-{k}" for k in itertools.count(2) if not taken(f"{name}-{k}"))
    shown = folder / name if per_caption else folder / f"{name}-00000.*"
    return free, f"note: {shown} holds earlier samples; these go to {folder / free} (--overwrite replaces them)"


def sample(args):
    """Run a parsed sample.py configuration: sample every caption (split across torchrun's processes) and write the
    outputs, or, with --calibrate_decoding, calibrate and store a decoding plan."""
    if args.mask and not args.input_image:
        raise ConfigError("--mask needs --input_image (the picture to inpaint)")
    for flag, path in (("--input_image", args.input_image), ("--mask", args.mask)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    video_only = [flag for flag, given in (("--input_image", args.input_image and not args.mask),
                                           ("--target_length", args.target_length),
                                           ("--rolling_kv_cache", args.rolling_kv_cache)) if given]
    if parse_vid_size(args.vid_size)[0] == 1 and video_only:
        inpainting = " or --mask (inpainting)" if video_only[0] == "--input_image" else ""
        raise ConfigError(f"{video_only[0]} needs a video model (--vid_size){inpainting}")
    if args.aspect_ratio != "1:1" and not args.mix_aspect:
        raise ConfigError(f"--aspect_ratio {args.aspect_ratio}: this model was trained on square images only "
                          f"(without --mix_aspect)")
    procs = init_processes(args.device)
    captions, name = read_captions(args, procs)
    pipe = STARFlowPipeline.from_args(args, procs.device, with_vae=not args.calibrate_decoding)
    pipe.set_progress_bar_config(disable=True)  # one bar over the batches instead
    check_image_size(args, pipe.factor)
    pipe.video_length(args.target_length, args.context_length)  # a length the model cannot make stops here
    if args.calibrate_decoding:
        return calibrate_decoding(args, procs, captions, pipe)

    mine = list(range(procs.rank, len(captions), procs.world_size))
    n_batches = math.ceil(math.ceil(len(captions) / procs.world_size) / args.sample_batch_size)
    out_dir = output_folder(Path(args.logdir), args.checkpoint_path)
    per_caption = bool(args.save_folder) and args.caption.endswith(".txt")
    name, note = outputs_name(out_dir, name, per_caption, args.overwrite)
    procs.barrier()  # every process has chosen before the first one claims the folder
    if procs.main:
        if out_dir.name != Path(args.checkpoint_path).stem:
            print(f"note: {out_dir.parent / Path(args.checkpoint_path).stem} holds another checkpoint's samples; "
                  f"these go to {out_dir}")
        if note:
            print(note)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SOURCE_FILE).write_text(f"{Path(args.checkpoint_path).resolve()}\n", encoding="utf-8")
        if per_caption:
            (out_dir / f"{name}{CAPTIONS_SUFFIX}").write_text("".join(f"{c}\n" for c in captions), encoding="utf-8")
    start = time.perf_counter()
    for b in tqdm(range(n_batches), disable=not procs.main, desc="sampling"):
        idx = mine[b * args.sample_batch_size:(b + 1) * args.sample_batch_size]
        if not idx:  # the processes share the captions unevenly; this one is done
            continue
        ratio = args.aspect_ratio if args.mix_aspect else None
        if ratio == "random":
            ratio = ASPECT_RATIOS[np.random.default_rng(args.seed + idx[0]).integers(len(ASPECT_RATIOS))]
        batch = [captions[i] for i in idx]
        if args.mask:  # inpainting: the picture inverted under each caption, the masked tokens drawn anew
            out = pipe.edit([args.input_image] * len(idx), batch, batch, 1.0, args.cfg, args.mask, args.seed, idx,
                            args.target_length)
        else:
            out = pipe(batch, aspect_ratio=ratio, num_frames=args.target_length, image=args.input_image,
                       seed=args.seed, indices=idx, return_sequence=bool(args.return_sequence),
                       verbose=bool(args.verbose))
        pixels = out.as_uint8()
        save = save_video if out.frames is not None else save_image
        suffix, extra = (".mp4", {"fps": out.fps}) if out.frames is not None else (".png", {})
        stems = [out_dir / name / f"{i:05d}" for i in idx] if per_caption else [out_dir / f"{name}-{idx[0]:05d}"]
        for stem, x, z in zip(stems, pixels if per_caption else [pixels],
                              out.latents if per_caption else [out.latents]):
            save(x, Path(f"{stem}{suffix}"), **extra)
            if args.save_latents:
                save_latents(z, Path(f"{stem}.safetensors"))
    elapsed = time.perf_counter() - start
    procs.barrier()
    if procs.main:
        total = len(captions)
        where = out_dir / name if per_caption else out_dir
        flagged = any(v is not None for v in (args.jacobi_block_size, args.jacobi_th, args.jacobi_max_iter))
        plan = "exact (sequential)" if not args.jacobi else "Jacobi as flagged" if flagged else \
            f"calibrated plan {plan_path(args.checkpoint_path)}" if pipe.model.decoding else "default plan"
        print(f"{total} samples in {elapsed:.1f} s ({total / elapsed:.2f} samples/s) on {procs.world_size} "
              f"process(es), decoding: {plan}; outputs in {where}")
