"""PatchGAN discriminators: one logit per overlapping patch, for images (B, 3, H, W) and videos (B, T, 3, H, W)."""
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _norm_act(conv: nn.Module, channels: int, norm: str) -> list[nn.Module]:
    """conv -> normalisation -> LeakyReLU; `norm` is "group" (GroupNorm) or "spectral" (on the conv's weight)."""
    if norm == "spectral":
        return [spectral_norm(conv), nn.LeakyReLU(0.2)]
    if norm == "group":
        return [conv, nn.GroupNorm(min(32, channels // 4), channels), nn.LeakyReLU(0.2)]
    raise ValueError(f"discriminator norm {norm!r}: expected group or spectral")


class PatchDiscriminator(nn.Module):
    """An N-layer PatchGAN: a stem conv, `n_layers` stride-2 4x4 convs (widths hidden * 1, 2, 4, 8 ... up to 8x),
    and a 3x3 conv to one logit per patch. (B, 3, H, W) -> (B, 1, H / 2^n, W / 2^n); a video (B, T, 3, H, W) is
    judged frame by frame, giving (B*T, 1, h, w)."""

    def __init__(self, in_channels: int = 3, hidden: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers, width = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.2)], hidden
        for i in range(n_layers):
            out = hidden * min(2 ** (i + 1), 8)
            layers += _norm_act(nn.Conv2d(width, out, 4, stride=2, padding=1), out, norm)
            width = out
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            x = x.flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W)
        return self.net(x)


class PatchDiscriminator3D(nn.Module):
    """The 3-D PatchGAN for videos: like PatchDiscriminator with 3-D convs; the first downsampling is spatial only
    (stride 1, 2, 2), the others halve time as well. (B, T, 3, H, W) -> (B, 1, t, H / 2^n, W / 2^n)."""

    def __init__(self, in_channels: int = 3, hidden: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers, width = [nn.Conv3d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.2)], hidden
        for i in range(n_layers):
            out = hidden * min(2 ** (i + 1), 8)
            stride = (1, 2, 2) if i == 0 else (2, 2, 2)
            conv = nn.Conv3d(width, out, (3, 4, 4), stride=stride, padding=1)
            layers += _norm_act(conv, out, norm)
            width = out
        layers.append(nn.Conv3d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.transpose(1, 2))  # (B, T, 3, H, W) -> (B, 3, T, H, W) -> (B, 1, t, h, w)
