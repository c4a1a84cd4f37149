"""Fine-tune a VAE decoder to decode noisy latents, or train a small autoencoder from scratch.

    python finetune_decoder.py --vae NAME_OR_DIR [--noise_std 0.3] [flags]     # (a) fine-tune the decoder
    python finetune_decoder.py --train_autoencoder 1 [flags]                   # (b) a small AutoencoderKL

(a) The encoder stays frozen; the decoder (and post_quant_conv) learns to map z + noise_std * eps, z the normalised
latents, back to the clean pixels, so that samples of a flow trained on noisy latents decode directly. Output:
<logdir>/decoder.safetensors, for `--finetuned_vae` / `setup_vae(vae, finetuned=...)`.
(b) Trains a small diffusers AutoencoderKL on the data, then sets its shift and scaling factors so that its latents
have zero mean and unit std. Output: the diffusers directory <logdir>/vae, for `--vae <logdir>/vae`; follow with (a).

Loss: L2 + LPIPS (--lpips_weights, a local file) + a PatchGAN hinge loss with LeCam (from --disc_start) + a 3-D
Haar wavelet loss for video (misc/losses.py).  Each epoch (and before the first) reports on held-out images the
PSNR of decodes of clean and of noisy latents (and rFID with --inception_weights), and saves originals | decodes of
noisy latents side by side as <logdir>/recon-<epoch>.png.  metrics.jsonl holds one line per step and per evaluation.
"""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tqdm import tqdm

from dataset import ShapesDataset, Transform, build_loader, parse_vid_size
from misc.losses import LPIPS, AutoencoderLoss
from utils.config import (
    ConfigError,
    add_data_args,
    add_device_args,
    add_finetune_args,
    add_optimization_args,
    build_parser,
    parse_config,
    run_cli,
)
from utils.files import plain_mode
from utils.hub import PretrainedNotFound, resolve_pretrained
from utils.media import save_image, save_video
from utils.training import learning_rate
from utils.vae import LatentVAE, setup_vae

DECODER_FILE = "decoder.safetensors"
TRAINED_PREFIXES = ("decoder.", "post_quant_conv.")  # what mode (a) trains and saves
GROUPS = (add_data_args, add_optimization_args, add_finetune_args, add_device_args)
# Defaults of this entry point for the shared optimisation flags (utils.config.add_optimization_args).
DEFAULTS = dict(batch_size=32, epochs=10, epoch_length=4096, warmup_steps=100, grad_clip=1.0, log_every=50,
                num_workers=0)


# ---------------------------------------------------------------------------------------------------------------------
# The autoencoder

def small_autoencoder(args) -> AutoencoderKL:
    """(b): an AutoencoderKL downsampling by 2^(len(ae_channels) - 1), with `ae_latent_channels` latent channels."""
    blocks = len(args.ae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(args.ae_channels),
                         layers_per_block=args.ae_layers_per_block, latent_channels=args.ae_latent_channels,
                         norm_num_groups=args.ae_norm_groups, sample_size=args.img_size,
                         mid_block_add_attention=False)


@torch.no_grad()
def calibrate(vae: LatentVAE, x: torch.Tensor) -> tuple[float, float]:
    """Set an image VAE's shift and scaling factors (config and wrapper) so that the posterior means of `x` have zero
    mean and unit std; returns (shift, scale)."""
    z = vae.vae.encode(x.to(vae.vae.device)).latent_dist.mode().float()
    shift, scale = z.mean().item(), 1 / z.std().item()
    vae.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.shift_factor, vae.scaling_factor = shift, scale
    return shift, scale


def decode_with_grad(vae: LatentVAE, z: torch.Tensor) -> torch.Tensor:
    """LatentVAE.decode (normalised latents -> pixels) with gradients: the same code, without its no_grad."""
    return LatentVAE.decode.__wrapped__(vae, z)


def trainable_parameters(vae: LatentVAE, from_scratch: bool) -> list[torch.nn.Parameter]:
    """Switch on the gradients of what trains: everything (b), or the decoder and post_quant_conv (a)."""
    params = [p for name, p in vae.vae.named_parameters() if from_scratch or name.startswith(TRAINED_PREFIXES)]
    for p in params:
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------------------------------------------------------------
# Outputs

def save_decoder(vae: LatentVAE, path: Path, metadata: dict) -> Path:
    """(a): the decoder and post_quant_conv weights, with the autoencoder's own keys, as safetensors (atomic)."""
    state = {k: v.detach().cpu().contiguous() for k, v in vae.vae.state_dict().items()
             if k.startswith(TRAINED_PREFIXES)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, tmp, metadata={k: str(v) for k, v in metadata.items()})
    plain_mode(tmp)
    os.replace(tmp, path)
    return path


def save_autoencoder(vae: LatentVAE, folder: Path) -> Path:
    """(b): the whole autoencoder as a diffusers directory; written beside `folder`, then moved into place."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.vae.save_pretrained(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation

def held_out_batch(args, n: int) -> tuple[torch.Tensor, bool]:
    """(x, held_out): for shapes, `n` samples after the training indices (never trained on); for other data, the
    first `n` samples of the training data."""
    if args.dataset == "shapes":
        frames, fps = parse_vid_size(args.vid_size)
        source = ShapesDataset(args.epoch_length + n, args.img_size, frames, fps or 8)
        transform, rng = Transform(args.img_size), np.random.default_rng(0)
        return torch.stack([transform(source.load(i, rng)[0], "1:1", rng)
                            for i in range(args.epoch_length, args.epoch_length + n)]), True
    batches, x = build_loader(args), []
    batches.set_epoch(0)
    for batch, _, _ in batches:
        x.append(batch)
        if sum(len(b) for b in x) >= n:
            break
    return torch.cat(x)[:n], False


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images (frames) of the PSNR in dB, pixels in [-1, 1] taken as [0, 1]."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(-3).mean(-1).flatten()
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()


class FID:
    """rFID from a TorchScript Inception-v3 feature extractor (e.g. NVlabs' inception-2015-12-05.pt, called as
    `net(uint8 images (N, 3, H, W), return_features=True)` -> (N, 2048))."""

    def __init__(self, path: Path, device):
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as err:
            raise ValueError(f"Inception weights '{path}' could not be loaded ({type(err).__name__})") from None

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        frames = x.flatten(0, 1) if x.dim() == 5 else x
        pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(pixels, return_features=True).double().cpu().numpy()

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        """Frechet distance of Gaussians fitted to two feature sets; tr sqrt(S_a S_b) from the eigenvalues."""
        mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root_trace = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


@torch.no_grad()
def evaluate(vae: LatentVAE, x: torch.Tensor, noise: torch.Tensor, noise_std: float, fid: FID | None,
             grid: Path) -> dict:
    """PSNR of decodes of the clean latents (posterior means) and of the noisy ones (+ noise_std * `noise`), rFID of
    the noisy decodes, and the grid originals | noisy decodes."""
    vae.eval()
    z = vae.encode(x, sample=False)
    clean, noisy = vae.decode(z), vae.decode(z + noise_std * noise)
    out = {"psnr_clean": psnr(clean, x), "psnr_noisy": psnr(noisy, x)}
    if fid is not None:
        out["rfid_noisy"] = FID.distance(fid.features(x), fid.features(noisy))
    pairs = torch.cat([x, noisy.clamp(-1, 1)], -1)  # side by side
    if pairs.dim() == 5:
        save_video(pairs, grid.with_suffix(".mp4"), 8)
    else:
        save_image(pairs, grid)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Training

def lpips_weights_file(name) -> Path | None:
    """The LPIPS weights: a local file, or the .safetensors/.pth file of a Hugging Face Hub repository; None, after
    one warning line, when neither can be had."""
    if Path(name).is_file():
        return Path(name)
    try:
        root = resolve_pretrained(str(name), "LPIPS weights", ["*.safetensors", "*.pth"])
        found = [root] if root.is_file() else sorted(root.glob("*.safetensors")) + sorted(root.glob("*.pth"))
        if found:
            return found[0]
        reason = f"no .safetensors or .pth file in {root}"
    except PretrainedNotFound as err:
        reason = str(err)
    print(f"warning: LPIPS weights '{name}' not found ({reason}): training without the perceptual loss")
    return None


def setup_losses(args, video: bool, device) -> AutoencoderLoss:
    lpips = None
    if args.lpips_weight > 0:
        path = lpips_weights_file(args.lpips_weights)
        lpips = LPIPS.from_file(path) if path is not None else None
    return AutoencoderLoss(lpips, args.lpips_weight, args.disc_weight, args.disc_start, args.lecam_weight,
                           args.wavelet_weight, video_disc=video and bool(args.use_3d_disc),
                           disc_channels=args.disc_channels).to(device)


def train_step(vae, losses, opt, opt_disc, params, x, step: int, args, lr: float) -> dict:
    """One generator step (and one discriminator step once the GAN loss is on)."""
    for o in (opt, opt_disc):
        for group in (o.param_groups if o is not None else []):
            group["lr"] = lr
    vae.vae.train()
    if args.train_autoencoder:  # (b): the posterior sample, unnormalised latents, plus the KL term
        posterior = vae.vae.encode(x).latent_dist
        x_hat = vae.vae.decode(posterior.sample()).sample
        loss, metrics = losses.generator_loss(x_hat, x, step)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the L2: kl_weight is relative to summed errors
        loss, metrics["kl"] = loss + args.kl_weight * kl, float(kl.detach())
    else:  # (a): a sample of the frozen encoder's posterior, normalised, plus noise
        with torch.no_grad():
            z = vae.encode(x)
            z = z + args.noise_std * torch.randn_like(z)
        x_hat = decode_with_grad(vae, z)
        loss, metrics = losses.generator_loss(x_hat, x, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
    opt.step()
    if losses.gan_active(step):
        loss_d, parts = losses.discriminator_loss(x_hat, x)
        opt_disc.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_disc.step()
        metrics.update(parts)
    return {"loss": float(loss.detach()), **metrics, "lr": lr}


def main(argv=None):
    parser = build_parser(*GROUPS, description=__doc__, defaults=DEFAULTS)
    args = parse_config(parser, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    frames, _ = parse_vid_size(args.vid_size)
    video = frames > 1
    if args.train_autoencoder and (args.vae or video):
        raise ConfigError("--train_autoencoder 1 trains a new image autoencoder: give neither --vae nor --vid_size")
    if not args.train_autoencoder and not args.vae:
        raise ConfigError("give --vae (the autoencoder whose decoder to fine-tune) or --train_autoencoder 1")
    torch.manual_seed(args.train_seed or 0)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)

    vae = LatentVAE(small_autoencoder(args)) if args.train_autoencoder else setup_vae(args.vae, args.finetuned_vae)
    vae = vae.to(device)
    params = trainable_parameters(vae, bool(args.train_autoencoder))
    losses = setup_losses(args, video, device)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    opt_disc = torch.optim.AdamW(losses.discriminator.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                 weight_decay=1e-4) if losses.discriminator is not None else None
    loader = build_loader(args, 0, 1, vae.downsample_factor, args.num_workers)
    total = args.max_steps or args.epochs * len(loader)

    x_eval, held_out = held_out_batch(args, args.eval_images)
    x_eval = x_eval.to(device)
    noise = torch.randn(vae.encode(x_eval).shape, generator=torch.Generator().manual_seed(1234)).to(device)
    fid = FID(args.inception_weights, device) if args.inception_weights.is_file() else None
    if fid is None:
        print(f"note: no Inception weights at '{args.inception_weights}': rFID is skipped")
    task = "training a new autoencoder" if args.train_autoencoder else \
        f"fine-tuning the decoder of {args.vae} on noisy latents (noise_std {args.noise_std})"
    print(f"{task} for {total} steps; {sum(p.numel() for p in params):,}"
          f" trainable parameters; evaluation on {len(x_eval)} {'held-out' if held_out else 'training'} samples")

    metrics_file = (logdir / "metrics.jsonl").open("a")

    def report(epoch: int, step: int):
        if args.train_autoencoder:
            calibrate(vae, x_eval)
        result = evaluate(vae, x_eval, noise, args.noise_std, fid, logdir / f"recon-{epoch:03d}.png")
        metrics_file.write(json.dumps({"eval": True, "epoch": epoch, "step": step, **result}) + "\n")
        metrics_file.flush()
        tqdm.write(f"eval epoch {epoch} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result

    first = report(0, 0)
    step, epoch, done = 0, 0, total == 0
    bar = tqdm(total=total, desc="training", dynamic_ncols=True)
    start = time.perf_counter()
    while not done:
        loader.set_epoch(epoch)
        for x, _, _ in loader:
            metrics = train_step(vae, losses, opt, opt_disc, params, x.to(device), step, args,
                                 learning_rate(step, args.lr, args.min_lr, args.warmup_steps, total))
            step += 1
            bar.update(1)
            metrics_file.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
            if step % args.log_every == 0 or step == 1:
                bar.write(f"step {step} epoch {epoch} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            done = step >= total
            if done:
                break
        epoch += 1
        last = report(epoch, step)
    bar.close()
    metrics_file.close()

    if args.train_autoencoder:
        path = save_autoencoder(vae, logdir / "vae")
        hint = f"use it with --vae {path}"
    else:
        path = save_decoder(vae, logdir / DECODER_FILE, {"vae": args.vae, "noise_std": args.noise_std})
        hint = f"use it with --vae {args.vae} --finetuned_vae {path}"
    if total:
        print(f"noisy-latent PSNR {first['psnr_noisy']:.2f} -> {last['psnr_noisy']:.2f} dB, clean "
              f"{first['psnr_clean']:.2f} -> {last['psnr_clean']:.2f} dB ({time.perf_counter() - start:.0f} s)")
    print(f"done at step {step}: {'autoencoder' if args.train_autoencoder else 'decoder weights'} in {path} "
          f"({hint}); grids and metrics.jsonl in {logdir}")


if __name__ == "__main__":
    run_cli(main)
