"""Sampling from a checkpoint as sample.py does it: captions -> noise and text -> latents -> pixels -> files.

`sample(args)` runs a whole sample.py command line (parsed by utils.config with sample.GROUPS); the pieces
(`build`, `Batches`, `to_pixels`) serve the benchmark and the tests.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import aspect_ratio_to_image_size, parse_vid_size
from transformer_flow import Model, ModelConfig
from utils.config import ASPECT_RATIOS, ConfigError, check_image_size
from utils.decoding import calibrate, load_plans, plan_path, save_plan
from utils.files import read_image, read_text
from utils.inference import denoise
from utils.media import save_image, save_latents, save_video
from utils.model_setup import load_weights, setup_transformer, stored_metadata, vae_downsample_factors
from utils.text import TextEncoder
from utils.training import init_processes
from utils.vae import setup_vae

TEMPLATES = {  # --caption <name>
    "shapes": "a large red circle center",
    "shapes_video": "a blue square moving right",
    "portrait": "A studio portrait of an old fisherman with a grey beard, soft window light, film grain.",
    "city": "A rainy city street at night, neon reflections on the wet asphalt, seen from a low angle.",
    "landscape": "Snow-capped mountains above a still lake at sunrise, mist over the water, wide-angle photograph.",
}


def read_captions(args, procs) -> tuple[list[str], str]:
    """All captions of the run (every process sees the same list) and a name for the outputs."""
    if args.caption is None:
        raise ConfigError("--caption is required: a caption, a template name or a .txt file of captions")
    if args.caption.endswith(".txt"):
        path = Path(args.caption)
        if not path.is_file():
            raise FileNotFoundError(f"--caption {path}: no such file")
        lines = [line.strip() for line in read_text(path).split("\n")]
        captions = [line for line in lines if line]  # blank lines are skipped, never sampled as the empty caption
        if not captions:
            raise ConfigError(f"--caption {path}: the file holds no captions")
        return captions, path.stem
    text = TEMPLATES.get(args.caption, args.caption)
    return [text] * (args.sample_batch_size * procs.world_size), "samples"


def load_first_frame(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A picture -> (3, h, w) in [-1, 1]: read as a viewer shows it (utils.files.read_image, as the training data),
    scaled to cover (h, w), then center-cropped."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"--input_image {path}: no such file")
    image = Image.fromarray(read_image(path, f"--input_image {path}"))
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def build(args, procs, with_vae=True):
    """(model, tokenizer and encoder or None, vae or None) for the checkpoint; the model's decoding plan is the one
    calibrated for it on this device type, if any."""
    path = Path(args.checkpoint_path)
    stored = stored_metadata(path)
    text = TextEncoder.from_args(args, procs.device)
    vae = setup_vae(args.vae, args.finetuned_vae, procs.device) if args.vae and with_vae else None
    if "config" in stored:
        model = Model(ModelConfig(**stored["config"]))
    elif args.model_config_path is not None:
        factor = vae.downsample_factor if vae else None if args.vae else 1
        model = setup_transformer(args, text.width if text else 0, factor)
    else:
        raise ConfigError(f"--checkpoint_path {path} stores no model configuration (an official checkpoint?): "
                          f"pass its --model_config_path")
    width = text.width if text else 0
    if model.config.txt_dim != width:
        raise ConfigError(f"the model reads text of width {model.config.txt_dim}, the encoder "
                          f"{args.text or '(none)'} gives {width}")
    load_weights(model, path)
    model.decoding = load_plans(path, procs.device.type, len(model.blocks))
    return model.to(procs.device).eval(), text, vae


class Batches:
    """Turns captions into the noise, text embeddings and latent shape of a sampling batch, as the checkpoint was
    trained (prompt wording, fps, noise level, aspect ratio); the noise of caption i comes from seed and i only."""

    def __init__(self, args, model, text, factor, temporal):
        self.args, self.model, self.text, self.factor = args, model, text, factor
        frames, fps = parse_vid_size(args.vid_size)
        self.context = None
        if args.target_length:  # longer than trained: a sliding window of the trained length (in latent frames)
            if (args.target_length - 1) % temporal:
                nearest = (args.target_length - 1) // temporal * temporal + 1
                raise ConfigError(f"--target_length {args.target_length}: the VAE makes 1 + {temporal}k frames (its "
                                  f"{temporal}x temporal downsampling); the nearest are {nearest} and "
                                  f"{nearest + temporal}")
            window = (frames - 1) // temporal + 1
            if args.context_length is not None and args.context_length >= window:
                raise ConfigError(f"--context_length must be below the trained length of {window} latent frames, "
                                  f"got {args.context_length}")
            model.blocks[-1].local_attn_window = window
            self.context = args.context_length or window - 1
            frames = args.target_length
        self.frames = frames
        self.latent_frames = (frames - 1) // temporal + 1 if frames > 1 else 1
        self.out_fps = args.out_fps or fps or 8
        self.noise_std = args.target_noise_std if args.target_noise_std is not None else args.noise_std
        self.guidance = args.cfg if text is not None else 0.0

    def __call__(self, captions: list[str], idx: list[int], device):
        """(noise, y for reverse, conditional y, (h, w), aspect ratio) of the captions with these indices."""
        args = self.args
        ratio = args.aspect_ratio if args.mix_aspect else None
        if ratio == "random":
            ratio = ASPECT_RATIOS[np.random.default_rng(args.seed + idx[0]).integers(len(ASPECT_RATIOS))]
        h, w = aspect_ratio_to_image_size(args.img_size, ratio, self.factor * self.model.config.patch_size)
        shape = (self.model.config.in_channels, h // self.factor, w // self.factor)
        shape = (self.latent_frames, *shape) if self.frames > 1 else shape
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))
                             for i in idx]).to(device)
        y = y_cond = None
        if self.text is not None:
            y = self.text([captions[i] for i in idx], device, aspect_ratio=ratio, fps=self.out_fps,
                          noise_std=self.noise_std, unconditional=self.guidance > 0)
            y_cond = y[:len(idx)]
        return noise, y, y_cond, (h, w), ratio


def to_pixels(args, model, vae, latents, y_cond, noise_std) -> torch.Tensor:
    """Sampled latents -> pixels in [-1, 1]: self-denoised (unless a fine-tuned decoder handles the noise), then
    decoded by the VAE."""
    if args.finetuned_vae in (None, "none"):
        learnable = model.config.learnable_self_denoiser and not args.disable_learnable_denoiser
        latents = denoise(model, latents, y_cond, noise_std, learnable, args.denoising_batch_size,
                          model.blocks[-1].local_attn_window, model.config.denoiser_window)
    return vae.decode(latents) if vae else latents


def calibrate_decoding(args, procs, captions, model, batches):
    """--calibrate_decoding N: calibrate a decoding plan on the first N captions and store it beside the checkpoint."""
    if procs.world_size > 1:
        raise ConfigError("--calibrate_decoding times this device alone: run it with plain python, not torchrun")
    if batches.context is not None or args.input_image:
        raise ConfigError("--calibrate_decoding calibrates plain generation: drop --target_length and --input_image")
    n = args.calibrate_decoding
    captions = (captions * n)[:n]
    noise, y, _, _, _ = batches(captions, list(range(n)), procs.device)
    print(f"calibrating the decoding of {args.checkpoint_path} on {n} captions (guidance {batches.guidance:g}, "
          f"tolerance {args.calibration_tolerance:g}) on {procs.device} ...")
    plan, report = calibrate(model, noise, y, batches.guidance, args.calibration_tolerance)
    path = save_plan(args.checkpoint_path, procs.device.type, n, plan, report)
    measured = report["measured"]
    for row in measured["blocks"]:
        print(f"  block {row['block']}: {row['chosen']} ({row['seconds']:.3f} s, sequential "
              f"{row['sequential_s']:.3f} s, error {row['error']:.1e})")
    print(f"whole model: {measured['plan_s']:.3f} s vs {measured['sequential_s']:.3f} s sequential "
          f"({measured['speedup']:.2f}x), relative L2 to the exact inverse {measured['error']:.1e}; plan for "
          f"{procs.device.type} at batch {n} written to {path}")


def sample(args):
    """Run a parsed sample.py configuration: sample every caption (split across torchrun's processes) and write the
    outputs, or, with --calibrate_decoding, calibrate and store a decoding plan."""
    if parse_vid_size(args.vid_size)[0] == 1 and (args.input_image or args.target_length):
        flag = "--input_image" if args.input_image else "--target_length"
        raise ConfigError(f"{flag} needs a video model (--vid_size)")
    if args.aspect_ratio != "1:1" and not args.mix_aspect:
        raise ConfigError(f"--aspect_ratio {args.aspect_ratio}: this model was trained on square images only "
                          f"(without --mix_aspect)")
    procs = init_processes(args.device)
    captions, name = read_captions(args, procs)
    model, text, vae = build(args, procs, with_vae=not args.calibrate_decoding)
    factor, temporal = (vae.downsample_factor, vae.temporal_downsample_factor) if vae else \
        vae_downsample_factors(args.vae) if args.vae else (1, 1)
    check_image_size(args, factor)
    batches = Batches(args, model, text, factor, temporal)
    if args.calibrate_decoding:
        return calibrate_decoding(args, procs, captions, model, batches)
    decoding = dict(jacobi=None if args.jacobi else False, jacobi_block_size=args.jacobi_block_size,
                    jacobi_th=args.jacobi_th, jacobi_max_iter=args.jacobi_max_iter)

    mine = list(range(procs.rank, len(captions), procs.world_size))
    n_batches = math.ceil(math.ceil(len(captions) / procs.world_size) / args.sample_batch_size)
    out_dir = Path(args.logdir) / Path(args.checkpoint_path).stem
    per_caption = bool(args.save_folder) and args.caption.endswith(".txt")
    start = time.perf_counter()
    for b in tqdm(range(n_batches), disable=not procs.main, desc="sampling"):
        idx = mine[b * args.sample_batch_size:(b + 1) * args.sample_batch_size]
        if not idx:  # the processes share the captions unevenly; this one is done
            continue
        noise, y, y_cond, (h, w), _ = batches(captions, idx, procs.device)
        caches = None
        with torch.no_grad():
            if args.input_image:
                first = load_first_frame(args.input_image, (h, w)).to(procs.device)
                first = vae.encode(first[None]) if vae else first[None]
                first = (first + batches.noise_std * torch.randn_like(first)).expand(len(idx), *first.shape[1:])
                caches = model.prefill(first.unsqueeze(1), y)
            latents = model.reverse(noise, y, guidance=batches.guidance, guide_top=1 if args.guide_top else None,
                                    return_sequence=bool(args.return_sequence), kv_caches=caches,
                                    context_length=batches.context, attn_temp=args.attn_temp,
                                    verbose=bool(args.verbose), **decoding)
        if args.return_sequence:  # every block's output side by side
            pixels = torch.cat([vae.decode(s) if vae else s for s in latents], dim=-1)
        else:
            pixels = to_pixels(args, model, vae, latents, y_cond, batches.noise_std)
        save = save_video if pixels.dim() == 5 else save_image
        suffix, extra = (".mp4", {"fps": batches.out_fps}) if pixels.dim() == 5 else (".png", {})
        final = latents[-1] if args.return_sequence else latents
        stems = [out_dir / name / f"{i:05d}" for i in idx] if per_caption else [out_dir / f"{name}-{idx[0]:05d}"]
        for stem, x, z in zip(stems, pixels if per_caption else [pixels], final if per_caption else [final]):
            save(x, Path(f"{stem}{suffix}"), **extra)
            if args.save_latents:
                save_latents(z, Path(f"{stem}.safetensors"))
    elapsed = time.perf_counter() - start
    procs.barrier()
    if procs.main:
        total = len(captions)
        where = out_dir / name if per_caption else out_dir
        plan = "exact (sequential)" if not args.jacobi else \
            "Jacobi as flagged" if any(v is not None for v in list(decoding.values())[1:]) else \
            f"calibrated plan {plan_path(args.checkpoint_path)}" if model.decoding else "default plan"
        print(f"{total} samples in {elapsed:.1f} s ({total / elapsed:.2f} samples/s) on {procs.world_size} "
              f"process(es), decoding: {plan}; outputs in {where}")
