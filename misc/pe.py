"""Rotary position embeddings of STARFlow: 2-D for images, 3-D (x, y, time/text) for video and text prefixes.

A token's position is a row of (x, y[, t]) coordinates.  Image coordinates are rescaled so that the geometric-mean
side of the latent grid spans `pt_seq_len` (this is what lets a model trained on one resolution and aspect ratio run
at others).  Text tokens sit at (0, 0, k / txt * pt_seq_len).  Each coordinate is turned into rotation angles for
pairs of adjacent channels of every attention head: with text (or frames) there are head_dim/2 - 8 angles for x and y
together (half each) and 8 for the third axis, otherwise head_dim/4 for each of x and y.
"""
import math

import torch

THETA = 10000.0


def get_positions(h: int, w: int, txt_size: int = 0, pt_seq_len: float | None = None, frames: int = 0,
                  mode: str = "3d") -> torch.Tensor:
    """Positions of txt_size text tokens followed by `frames` (or one) frames of h x w tokens, as (L, axes) floats.

    mode "2d" gives (x, y) rows and takes no text; "3d" gives (x, y, t) rows, t being the frame index for video
    and a ramp over [0, pt_seq_len) for the text prefix.
    """
    if mode not in ("2d", "3d"):
        raise ValueError(f"unknown position mode {mode!r}: expected '2d' or '3d'")
    mean_len = math.sqrt(h * w)
    pt_seq_len = pt_seq_len or mean_len
    px = torch.arange(h) / mean_len * pt_seq_len
    py = torch.arange(w) / mean_len * pt_seq_len
    px, py = (p.reshape(-1) for p in torch.meshgrid(px, py, indexing="ij"))
    if mode == "2d":
        if txt_size:
            raise ValueError("2-D positions cannot hold a text prefix")
        return torch.stack([px, py], dim=-1)
    n = max(frames, 1)
    t = torch.arange(n).repeat_interleave(h * w) if frames else torch.zeros(h * w)
    pos = torch.stack([px.repeat(n), py.repeat(n), t.float()], dim=-1)
    if txt_size:
        ramp = torch.arange(txt_size) / txt_size * pt_seq_len
        text = torch.stack([torch.zeros(txt_size), torch.zeros(txt_size), ramp], dim=-1)
        pos = torch.cat([text, pos], dim=0)
    return pos


class RotaryEmbedding:
    """Maps positions (L, axes) to the cos/sin tables (L, head_dim/2) that `rope_rotation` prepares for `apply_rope`.

    `time_axis` reserves 8 of the head_dim/2 angle slots for the third coordinate (models with a text prefix).
    Holds no state worth saving: the frequencies are rebuilt on the positions' device.
    """

    def __init__(self, head_dim: int, time_axis: bool):
        self.head_dim, self.time_axis = head_dim, time_axis

    def frequencies(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        dim = self.head_dim // 2
        space = dim - 8 if self.time_axis else dim
        freqs = 1.0 / (THETA ** (torch.arange(0, space, 2, device=device).float() / space))
        freqs_t = 1.0 / (THETA ** (torch.arange(0, 8, device=device).float() / 8)) if self.time_axis else None
        return freqs, freqs_t

    def __call__(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs, freqs_t = self.frequencies(pos.device)
        pos = pos.float()
        angles = [pos[:, 0, None] * freqs, pos[:, 1, None] * freqs]
        if pos.size(1) == 3:
            if freqs_t is None:
                raise ValueError("3-D positions (video) need a model with a text prefix (txt_size > 0)")
            angles.append(pos[:, 2, None] * freqs_t)
        angles = torch.cat(angles, dim=-1)  # (L, head_dim / 2)
        return angles.cos(), angles.sin()


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, hf_style: bool = False):
    """The rotation that `apply_rope` applies, prepared once for all layers of a call: cos/sin of shape
    (L, head_dim/2), or one table per row (B, L, head_dim/2), become a complex table broadcast over heads (or, with
    hf_style, the (cos, sin) pair)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (cos, sin) if hf_style else torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, rotation) -> torch.Tensor:
    """Rotate channel pairs of x (B, L, heads, head_dim) by a `rope_rotation`, in fp32.

    Pairs are adjacent channels (2k, 2k+1); with hf_style they are (k, k + head_dim/2), as in Hugging Face models.
    """
    x = x.float()
    if isinstance(rotation, tuple):
        cos, sin = rotation
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)
