"""The frozen autoencoders (from diffusers) between pixels in [-1, 1] and the normalised latents the flow models.

Image VAEs (SD-VAE, SDXL-VAE: `AutoencoderKL`) and video VAEs (Wan2.1, Wan2.2: `AutoencoderKLWan`) share one wrapper,
so the rest of the code sees one layout: images (B, C, H, W) and videos (B, T, C, H, W).
"""
import contextlib
import importlib.util
import json
import os
from typing import TYPE_CHECKING

import torch

from utils.hub import local_path, resolve_pretrained

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderKLWan

_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")  # diffusers classes; diffusers is imported when a VAE is built
# The VAE's own files, at the root of a VAE repository or under vae/ of a pipeline repository: never a pipeline's
# transformer or text encoder.
_VAE_FILES = [f"{sub}{f}" for sub in ("", "vae/") for f in ("config.json", "diffusion_pytorch_model*.safetensors*")]


def split_scale(name: str) -> tuple[str, float]:
    """'org/model:0.6' -> ('org/model', 0.6); a name whose last ':' is not followed by a number is kept whole."""
    head, sep, tail = name.rpartition(":")
    try:
        return (head, float(tail)) if sep else (name, 1.0)
    except ValueError:
        return name, 1.0


def downsample_factors(class_name: str, config) -> tuple[int, int]:
    """(spatial, temporal) downsampling of a diffusers autoencoder, from its class name and config."""
    if class_name == "AutoencoderKLWan":
        return config.get("scale_factor_spatial") or 2 ** (len(config["dim_mult"]) - 1), \
            config.get("scale_factor_temporal") or 4
    return 2 ** (len(config["down_block_types"]) - 1), 1


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an image function to (B, C, H, W), or frame by frame to (B, T, C, H, W)."""
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2]) if x.dim() == 5 else fn(x)


def _as_video(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a video function to (B, T, C, H, W), or to (B, C, H, W) as a one-frame video."""
    return fn(x) if x.dim() == 5 else fn(x.unsqueeze(1)).squeeze(1)


class LatentVAE(torch.nn.Module):
    """Frozen VAE mapping pixels in [-1, 1] to the normalised latents the flow models.

    SD-style VAEs shift and scale their latents by two scalars. Wan VAEs normalise each channel by the dataset
    statistics in their config; Wan2.2 (`is_residual`) normalises the posterior mean only and adds the posterior noise
    unnormalised, and multiplies the latent frames after the first by `temporal_scale` (the `name:scale` suffix).
    """

    def __init__(self, vae: "AutoencoderKL | AutoencoderKLWan", temporal_scale: float = 1.0):
        from diffusers import AutoencoderKLWan

        super().__init__()
        self.vae = vae
        config = vae.config
        self.is_video = isinstance(vae, AutoencoderKLWan)
        if not self.is_video and temporal_scale != 1:
            raise ValueError(f"a ':{temporal_scale}' temporal scale only applies to video (Wan) VAEs, "
                             f"not {type(vae).__name__}")
        if not temporal_scale > 0:
            raise ValueError(f"the temporal scale must be positive, got {temporal_scale}")
        self.temporal_scale = temporal_scale
        self.base_weights: dict[str, torch.Tensor] = {}  # what load_finetuned replaced, on the CPU (base_decoder)
        self.downsample_factor, self.temporal_downsample_factor = downsample_factors(type(vae).__name__, config)
        if self.is_video:
            self.latent_channels = config.z_dim
            # Per-channel statistics, shaped to broadcast over (B, t, c, h, w); they come from the config, so they are
            # not saved with the weights.
            for key in ("latents_mean", "latents_std"):
                stats = torch.tensor(getattr(config, key), dtype=torch.float32).view(-1, 1, 1)
                self.register_buffer(key, stats, persistent=False)
        else:
            self.latent_channels = config.latent_channels
            self.scaling_factor = config.scaling_factor
            self.shift_factor = config.shift_factor or 0.0
        self.requires_grad_(False).eval()

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.vae.device, self.vae.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Pixels (B, 3, H, W) or (B, T, 3, H, W) -> fp32 latents (B, c, h, w) or (B, t, c, h, w), t = 1 + (T-1)//4
        for Wan. With sample=False the posterior mean (mode) is used instead of a sample."""
        if not self.is_video:
            def encode_images(images):  # (N, 3, H, W) -> (N, c, h, w)
                posterior = self.vae.encode(self._to_vae(images)).latent_dist
                z = posterior.sample() if sample else posterior.mode()
                return (z.float() - self.shift_factor) * self.scaling_factor
            return _per_frame(encode_images, x)
        return _as_video(lambda video: self._encode_video(video, sample), x)

    def _encode_video(self, video: torch.Tensor, sample: bool) -> torch.Tensor:
        # diffusers' Wan VAE works on (B, C, T, H, W): (B, T, 3, H, W) -> (B, 3, T, H, W) -> (B, c, t, h, w).
        posterior = self.vae.encode(self._to_vae(video.transpose(1, 2))).latent_dist
        mean, std = (t.transpose(1, 2).float() for t in (posterior.mean, posterior.std))  # (B, t, c, h, w)
        noise = std * torch.randn_like(std) if sample else 0.0
        if self.vae.config.is_residual:  # Wan2.2: the noise stays at the posterior's own (unnormalised) scale
            z = (mean - self.latents_mean) / self.latents_std + noise
        else:
            z = (mean + noise - self.latents_mean) / self.latents_std
        z[:, 1:] *= self.temporal_scale  # the first latent frame holds one pixel frame, the others four
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) or (B, t, c, h, w) -> fp32 pixels in about [-1, 1], (B, 3, H, W) or (B, T, 3, H, W)."""
        if not self.is_video:
            def decode_images(latents):  # (N, c, h, w) -> (N, 3, H, W)
                latents = latents.float() / self.scaling_factor + self.shift_factor
                return self.vae.decode(self._to_vae(latents)).sample.float()
            return _per_frame(decode_images, z)
        return _as_video(self._decode_video, z)

    def _decode_video(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.vae.device, torch.float32)
        z = torch.cat([z[:, :1], z[:, 1:] / self.temporal_scale], 1)  # a copy: the caller's z is untouched
        z = z * self.latents_std + self.latents_mean
        video = self.vae.decode(self._to_vae(z.transpose(1, 2))).sample  # (B, c, t, h, w) -> (B, 3, T, H, W)
        return video.transpose(1, 2).float()  # (B, T, 3, H, W)

    def load_finetuned(self, path: str | os.PathLike) -> None:
        """Load weights fine-tuned on noisy latents (usually the decoder's) from a .safetensors or .pth/.pt file.

        The file holds a state dict of the diffusers autoencoder, all its keys or a subset, optionally prefixed
        `vae.` (as saved from this wrapper). Strict for the keys present: an unknown key or a shape mismatch raises a
        ValueError before any weight is changed.
        """
        path = local_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fine-tuned VAE weights '{path}': no such file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("vae."): v for k, v in state.items()}
            if not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise TypeError("not a state dict of tensors")
        except Exception as err:  # a truncated or foreign file: the path is what the user needs to know
            raise ValueError(f"fine-tuned VAE weights '{path}' could not be read ({type(err).__name__}: {err})") \
                from None
        own = self.vae.state_dict()
        unknown = [k for k in state if k not in own]
        mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                      if k in own and v.shape != own[k].shape]
        if unknown or mismatched:
            raise ValueError(f"fine-tuned VAE weights '{path}' do not fit {type(self.vae).__name__}: "
                             f"unknown keys {unknown}, shape mismatches {mismatched}")
        self.base_weights = {k: own[k].detach().to("cpu", copy=True) for k in state}
        self.vae.load_state_dict(state, strict=False)

    @contextlib.contextmanager
    def base_decoder(self):
        """Decode with the autoencoder's own weights inside the block: those that load_finetuned replaced are swapped
        back in, then out again.  For clean latents (a real image's posterior mean, as inverted for editing), which
        the base decoder reproduces and a decoder fine-tuned on noisy latents blurs; a no-op without one."""
        if not self.base_weights:
            yield
            return
        own = self.vae.state_dict()
        tuned = {k: own[k].detach().clone() for k in self.base_weights}
        self.vae.load_state_dict(self.base_weights, strict=False)
        try:
            yield
        finally:
            self.vae.load_state_dict(tuned, strict=False)


def setup_vae(name: str, finetuned: str | os.PathLike | None = None, device="cpu", dtype=torch.float32) -> LatentVAE:
    """Build the frozen LatentVAE from a Hub name or local directory, optionally suffixed ':scale' (Wan only).

    `finetuned` is None/"none" or a local file of fine-tuned decoder weights (see LatentVAE.load_finetuned).
    """
    name, temporal_scale = split_scale(str(name))
    root = resolve_pretrained(name, "VAE", allow_patterns=_VAE_FILES)
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root  # pipeline or VAE repository
    if not (folder / "config.json").is_file():
        raise ValueError(f"VAE '{name}': no config.json in {root} or {root / 'vae'}")
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if class_name not in _CLASSES:
        raise ValueError(f"VAE '{name}' is a {class_name}; supported: {', '.join(_CLASSES)}")
    # Low-memory loading needs accelerate; without it diffusers falls back with a warning, so ask only when it is there.
    low_memory = importlib.util.find_spec("accelerate") is not None
    import diffusers

    vae = LatentVAE(getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=dtype,
                                                                   low_cpu_mem_usage=low_memory), temporal_scale)
    if finetuned not in (None, "none"):
        vae.load_finetuned(finetuned)
    return vae.to(device)
