"""Losses for training and fine-tuning autoencoders: L2, LPIPS (VGG16), hinge GAN with LeCam, 3-D Haar wavelets.

Everything takes pixels in [-1, 1]: images (B, 3, H, W) or videos (B, T, 3, H, W).  `AutoencoderLoss` mixes the
terms with the official weights (L2 1.0, LPIPS 1.1, GAN 0.1, LeCam 0.001, wavelet 0.5) and owns the discriminator.
"""
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from misc.discriminator import PatchDiscriminator, PatchDiscriminator3D


def l2_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x_hat.float(), x.float())


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS

# VGG16's `features` as in the usual ImageNet model: (out channels, convs) per stage, 2x2 max-pool between stages.
_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk up to relu5_3, with the module indices (and so the state-dict keys
    `<i>.weight`) of the standard ImageNet model's `features`."""
    layers, channels = [], 3
    for stage, (width, convs) in enumerate(_VGG16_STAGES):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    """LPIPS's learned per-channel weights of one layer's squared feature differences: a bias-free 1x1 conv.
    (The attribute names give the keys `model.1.weight` of the published LPIPS weight files.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on VGG16 features, per sample.

    Weights come from one local file (.safetensors or .pth): `features.<i>.weight/bias`, the ImageNet VGG16
    `features` keys, and `lin<k>.model.1.weight` (k = 0..4), the published LPIPS linear layers. Load it with
    `LPIPS.from_file`; the module is frozen and in eval mode.
    """
    # the inputs' statistics, so that pixels in [-1, 1] reach VGG normalised as for ImageNet
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for k, (width, _) in enumerate(_VGG16_STAGES):
            setattr(self, f"lin{k}", _LinearHead(width))
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LPIPS":
        """LPIPS with the weights in `path`; a file that cannot be read, or does not hold exactly these weights,
        is a ValueError naming it."""
        path = Path(path)
        model = cls()
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as err:  # truncated, foreign or mismatched: the path is what the user needs
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"LPIPS weights '{path}' could not be loaded ({type(err).__name__}: {message})") \
                from None
        return model.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) x 2 in [-1, 1] -> (N,) distances (0 for identical inputs)."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total, start = 0.0, 0
        for k, tap in enumerate(self.TAPS):
            h = self.features[start:tap + 1](h)
            start = tap + 1
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            fx, fy = f.chunk(2)
            total = total + getattr(self, f"lin{k}")((fx - fy).pow(2)).mean((1, 2, 3))
        return total


# ---------------------------------------------------------------------------------------------------------------------
# GAN

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): keeps the mean real and fake logits near the EMAs of each other's.

    `forward` returns the penalty and then moves the EMAs (decay `decay`) to this batch's means.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        loss = F.relu(real - self.ema_fake).pow(2) + F.relu(self.ema_real - fake).pow(2)
        with torch.no_grad():
            self.ema_real.lerp_(real.detach(), 1 - self.decay)
            self.ema_fake.lerp_(fake.detach(), 1 - self.decay)
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# Wavelets

def _haar_split(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One orthonormal Haar step along the negative `dim`: (..., N, ...) -> (2, ..., N/2, ...) [low, high]; an odd N
    first repeats its last slice."""
    if x.shape[dim] % 2:
        x = torch.cat([x, x.narrow(dim, x.shape[dim] - 1, 1)], dim)
    even, odd = x.unflatten(dim, (-1, 2)).unbind(dim)  # (..., N/2, 2, ...) -> two of (..., N/2, ...)
    return torch.stack([(even + odd), (even - odd)]) / math.sqrt(2)


def _haar_merge(bands: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of _haar_split (for even sizes) along the negative `dim`: (2, ..., N/2, ...) -> (..., N, ...)."""
    low, high = bands
    even, odd = (low + high) / math.sqrt(2), (low - high) / math.sqrt(2)
    return torch.stack([even, odd], dim).flatten(dim - 1, dim)  # (..., N/2, 2, ...) -> (..., N, ...)


def haar3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 3-D Haar transform: (B, C, T, H, W) -> (8, B, C, T/2, H/2, W/2) subbands, band
    4w + 2h + t for w, h, t in {0: low, 1: high} along each axis. Even sizes keep the energy (sum of squares)."""
    bands = _haar_split(x, -3)  # (2, B, C, T/2, H, W)
    bands = _haar_split(bands, -2).flatten(0, 1)  # (4, B, C, T/2, H/2, W)
    return _haar_split(bands, -1).flatten(0, 1)  # (8, B, C, T/2, H/2, W/2)


def ihaar3d(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of haar3d for even sizes: (8, B, C, t, h, w) -> (B, C, 2t, 2h, 2w)."""
    x = _haar_merge(bands.unflatten(0, (2, 4)), -1)  # (4, B, C, t, h, 2w)
    x = _haar_merge(x.unflatten(0, (2, 2)), -2)  # (2, B, C, t, 2h, 2w)
    return _haar_merge(x, -3)


def wavelet_loss(video_hat: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the 3-D Haar subbands of two videos (B, T, C, H, W)."""
    to_bands = lambda v: haar3d(v.float().transpose(1, 2))  # (B, T, C, H, W) -> (B, C, T, H, W) -> subbands
    return (to_bands(video_hat) - to_bands(video)).abs().mean()


# ---------------------------------------------------------------------------------------------------------------------
# The mix

class AutoencoderLoss(nn.Module):
    """The reconstruction objective of an autoencoder's decoder, and its discriminator's objective.

    generator:      l2 + lpips_weight * LPIPS + disc_weight * hinge_g [from step disc_start] + wavelet_weight * wavelet
    discriminator:  hinge_d + lecam_weight * LeCam

    `lpips` is an LPIPS module or None (term off); disc_weight 0 means no discriminator at all. The wavelet term
    applies to videos only. Videos go to a 3-D discriminator with `video_disc`, else frame by frame to the 2-D one.
    """

    def __init__(self, lpips: LPIPS | None = None, lpips_weight: float = 1.1, disc_weight: float = 0.1,
                 disc_start: int = 0, lecam_weight: float = 0.001, wavelet_weight: float = 0.5,
                 video_disc: bool = False, disc_channels: int = 64, disc_layers: int = 3):
        super().__init__()
        self.lpips, self.lpips_weight = lpips, lpips_weight
        self.disc_weight, self.disc_start, self.lecam_weight = disc_weight, disc_start, lecam_weight
        self.wavelet_weight = wavelet_weight
        self.video_disc = video_disc
        disc = PatchDiscriminator3D if video_disc else PatchDiscriminator
        self.discriminator = disc(hidden=disc_channels, n_layers=disc_layers) if disc_weight > 0 else None
        self.lecam = LeCam()

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and not self.video_disc:
            x = x.flatten(0, 1)  # frame by frame
        return self.discriminator(x)

    def generator_loss(self, x_hat: torch.Tensor, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The decoder's loss and its parts; gradients reach x_hat only (the discriminator is frozen meanwhile)."""
        parts = {"l2": l2_loss(x_hat, x)}
        loss = parts["l2"]
        if self.lpips is not None and self.lpips_weight > 0:
            frames = lambda v: v.flatten(0, 1) if v.dim() == 5 else v
            parts["lpips"] = self.lpips(frames(x_hat), frames(x)).mean()
            loss = loss + self.lpips_weight * parts["lpips"]
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)
            parts["gan_g"] = hinge_g_loss(self._logits(x_hat))
            self.discriminator.requires_grad_(True)
            loss = loss + self.disc_weight * parts["gan_g"]
        if x.dim() == 5 and self.wavelet_weight > 0:
            parts["wavelet"] = wavelet_loss(x_hat, x)
            loss = loss + self.wavelet_weight * parts["wavelet"]
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def discriminator_loss(self, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss and its parts; both inputs are detached, so only the discriminator learns."""
        logits_real, logits_fake = self._logits(x.detach()), self._logits(x_hat.detach())
        hinge, lecam = hinge_d_loss(logits_real, logits_fake), self.lecam(logits_real, logits_fake)
        parts = {"d_hinge": hinge, "d_lecam": lecam, "logits_real": logits_real.mean(),
                 "logits_fake": logits_fake.mean()}
        parts = {k: float(v.detach()) for k, v in parts.items()}
        return hinge + self.lecam_weight * lecam, parts
