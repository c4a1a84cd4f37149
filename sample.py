"""Generate images or videos from text (and optionally a first frame) with a STARFlow / STARFlow-V model.

    python sample.py --checkpoint_path logs/run/model.safetensors --caption "a small red circle left"
    python sample.py --model_config_path configs/starflow_3B_t2i_256x256.yaml \\
        --checkpoint_path ckpts/starflow_3B_t2i_256x256.pth --caption prompts.txt --save_folder 1
    torchrun --nproc_per_node N sample.py ...            # the captions are split across the processes

Our checkpoints (exported .safetensors, or training checkpoint folders) carry their model configuration and input
flags, so they need no --model_config_path; an official .pth needs its YAML.  --caption is a caption, a template
name, or a .txt file with one caption per line.  Outputs go to <logdir>/<checkpoint stem>/: a PNG grid (MP4 for
video) per batch, or, with a caption file and --save_folder 1, one file per line named by its line index.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import aspect_ratio_to_image_size, parse_vid_size
from transformer_flow import Model, ModelConfig
from utils.config import (ASPECT_RATIOS, ConfigError, add_data_args, add_model_args, add_sampling_args, build_parser,
                          parse_config, run_cli)
from utils.inference import denoise
from utils.media import save_image, save_video
from utils.model_setup import load_weights, setup_transformer, stored_metadata
from utils.text import encode_text, setup_encoder
from utils.training import init_processes
from utils.vae import setup_vae

TEMPLATES = {  # --caption <name>
    "shapes": "a large red circle center",
    "shapes_video": "a blue square moving right",
    "portrait": "A studio portrait of an old fisherman with a grey beard, soft window light, film grain.",
    "city": "A rainy city street at night, neon reflections on the wet asphalt, seen from a low angle.",
    "landscape": "Snow-capped mountains above a still lake at sunrise, mist over the water, wide-angle photograph.",
}


def add_device_args(p):
    g = p.add_argument_group("device")
    g.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--verbose", type=int, default=0, help="progress bars for each flow block")


def read_captions(args, procs) -> tuple[list[str], str]:
    """All captions of the run (every process sees the same list) and a name for the outputs."""
    if args.caption is None:
        raise ConfigError("--caption is required: a caption, a template name or a .txt file of captions")
    if args.caption.endswith(".txt"):
        path = Path(args.caption)
        if not path.is_file():
            raise FileNotFoundError(f"--caption {path}: no such file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        if not any(lines):
            raise ConfigError(f"--caption {path}: the file holds no captions")
        return lines, path.stem
    text = TEMPLATES.get(args.caption, args.caption)
    return [text] * (args.sample_batch_size * procs.world_size), "samples"


def load_first_frame(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file -> (3, h, w) in [-1, 1]: scaled to cover (h, w), then center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--input_image {path}: not a readable image ({type(err).__name__})") from None
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def build(args, procs):
    """(model, tokenizer and encoder or None, vae or None) for the checkpoint."""
    path = Path(args.checkpoint_path)
    stored = stored_metadata(path)
    text = setup_encoder(args.text, procs.device) if args.text else None
    vae = setup_vae(args.vae, args.finetuned_vae, procs.device) if args.vae else None
    if "config" in stored:
        model = Model(ModelConfig(**stored["config"]))
    elif args.model_config_path is not None:
        model = setup_transformer(args, text[1].config.hidden_size if text else 0,
                                  vae.downsample_factor if vae else 1)
    else:
        raise ConfigError(f"--checkpoint_path {path} stores no model configuration (an official checkpoint?): "
                          f"pass its --model_config_path")
    width = text[1].config.hidden_size if text else 0
    if model.config.txt_dim != width:
        raise ConfigError(f"the model reads text of width {model.config.txt_dim}, the encoder "
                          f"{args.text or '(none)'} gives {width}")
    load_weights(model, path)
    return model.to(procs.device).eval(), text, vae


def main(argv=None):
    parser = build_parser(add_model_args, add_data_args, add_sampling_args, add_device_args, description=__doc__)
    known, _ = parser.parse_known_args(argv)
    if known.checkpoint_path is None:
        raise ConfigError("--checkpoint_path is required")
    if not Path(known.checkpoint_path).exists():
        raise FileNotFoundError(f"--checkpoint_path {known.checkpoint_path}: no such file or folder")
    args = parse_config(parser, argv, stored_metadata(known.checkpoint_path).get("run"))
    if args.jacobi_block_size < 1:
        raise ConfigError(f"--jacobi_block_size must be at least 1, got {args.jacobi_block_size}")
    if args.cfg < 0:
        raise ConfigError(f"--cfg must be 0 (no guidance) or positive, got {args.cfg}")
    procs = init_processes(args.device)
    captions, name = read_captions(args, procs)
    model, text, vae = build(args, procs)
    factor, temporal = (vae.downsample_factor, vae.temporal_downsample_factor) if vae else (1, 1)

    frames, fps = parse_vid_size(args.vid_size)
    context = None
    if args.target_length:  # longer than trained: a sliding window of the trained length (in latent frames)
        if frames == 1:
            raise ConfigError("--target_length needs a video model (--vid_size)")
        window = (frames - 1) // temporal + 1
        model.blocks[-1].local_attn_window = window
        context = args.context_length or window - 1
        frames = args.target_length
    latent_frames = (frames - 1) // temporal + 1 if frames > 1 else 1
    if args.input_image and frames == 1:
        raise ConfigError("--input_image (image-to-video) needs a video model (--vid_size)")
    out_fps = args.out_fps or fps or 8
    noise_std = args.target_noise_std if args.target_noise_std is not None else args.noise_std
    guidance = args.cfg if text is not None else 0.0

    mine = list(range(procs.rank, len(captions), procs.world_size))
    n_batches = math.ceil(math.ceil(len(captions) / procs.world_size) / args.sample_batch_size)
    out_dir = Path(args.logdir) / Path(args.checkpoint_path).stem
    per_caption = bool(args.save_folder) and args.caption.endswith(".txt")
    start, written = time.perf_counter(), []
    for b in tqdm(range(n_batches), disable=not procs.main, desc="sampling"):
        idx = mine[b * args.sample_batch_size:(b + 1) * args.sample_batch_size]
        if not idx:  # the processes share the captions unevenly; this one is done
            continue
        ratio = args.aspect_ratio if args.mix_aspect else None
        if ratio == "random":
            ratio = ASPECT_RATIOS[np.random.default_rng(args.seed + idx[0]).integers(len(ASPECT_RATIOS))]
        h, w = aspect_ratio_to_image_size(args.img_size, ratio, factor * model.config.patch_size)
        shape = (model.config.in_channels, h // factor, w // factor)
        shape = (latent_frames, *shape) if frames > 1 else shape
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))
                             for i in idx]).to(procs.device)
        batch = [captions[i] for i in idx]
        wrap = dict(aspect_ratio=ratio, fps=out_fps if args.fps_cond else None,
                    noise_std=noise_std if args.cond_noise_level else None)
        y = y_cond = None
        if text is not None:
            y = encode_text(text[1], text[0], batch + [""] * len(batch) if guidance > 0 else batch,
                            args.txt_size, procs.device, **wrap)
            y_cond = y[:len(batch)]
        caches = None
        with torch.no_grad():
            if args.input_image:
                first = load_first_frame(args.input_image, (h, w)).to(procs.device)
                first = vae.encode(first[None]) if vae else first[None]
                first = (first + noise_std * torch.randn_like(first)).expand(len(batch), *first.shape[1:])
                caches = model.prefill(first.unsqueeze(1), y)
            latents = model.reverse(noise, y, guidance=guidance, guide_top=args.guide_top,
                                    return_sequence=bool(args.return_sequence), kv_caches=caches,
                                    jacobi=bool(args.jacobi), jacobi_block_size=args.jacobi_block_size,
                                    jacobi_th=args.jacobi_th, jacobi_max_iter=args.jacobi_max_iter,
                                    context_length=context, attn_temp=args.attn_temp, verbose=bool(args.verbose))
        if args.return_sequence:  # every block's output side by side
            pixels = torch.cat([vae.decode(s) if vae else s for s in latents], dim=-1)
        else:
            if args.finetuned_vae in (None, "none"):  # a fine-tuned decoder would handle the noise itself
                learnable = model.config.learnable_self_denoiser and not args.disable_learnable_denoiser
                latents = denoise(model, latents, y_cond, noise_std, learnable, args.denoising_batch_size,
                                  model.blocks[-1].local_attn_window, model.config.denoiser_window)
            pixels = vae.decode(latents) if vae else latents
        save = save_video if pixels.dim() == 5 else save_image
        suffix, extra = (".mp4", {"fps": out_fps}) if pixels.dim() == 5 else (".png", {})
        if per_caption:
            for i, x in zip(idx, pixels):
                written.append(save(x, out_dir / name / f"{i:05d}{suffix}", **extra))
        else:
            written.append(save(pixels, out_dir / f"{name}-{idx[0]:05d}{suffix}", **extra))
    elapsed = time.perf_counter() - start
    procs.barrier()
    if procs.main:
        total = len(captions)
        where = out_dir / name if per_caption else out_dir
        print(f"{total} samples in {elapsed:.1f} s ({total / elapsed:.2f} samples/s) on {procs.world_size} "
              f"process(es); outputs in {where}")


if __name__ == "__main__":
    run_cli(main)
