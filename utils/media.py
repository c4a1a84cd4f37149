"""Writing samples: PNG grids of images and H.264 MP4 videos (imageio + imageio-ffmpeg), from tensors in [-1, 1]."""
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from utils.files import plain_mode


def to_uint8(x) -> np.ndarray:
    """A tensor (..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8; a uint8 array (..., H, W, 3) as it is."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x
    import torch  # here, so that the grid tools start without it

    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def grid_columns(n: int) -> int:
    """Columns of a grid of n tiles: n divided by its largest divisor up to sqrt(n) (as the official grids)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n // rows


def tile(x: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, [T,] H, W, 3) -> ([T,] rows*(H+pad)+pad, columns*(W+pad)+pad, 3) on a white background."""
    n, (h, w) = x.shape[0], x.shape[-3:-1]
    rows = math.ceil(n / columns)
    out = np.full((*x.shape[1:-3], rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        out[..., pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w, :] = x[i]
    return out


def _atomic(path: Path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    plain_mode(tmp)
    os.replace(tmp, path)
    return path


def save_image(x, path, columns: int | None = None) -> Path:
    """One image (3, H, W), or a grid of a batch (B, 3, H, W), in [-1, 1] (or uint8 (..., H, W, 3)) as PNG."""
    pixels = to_uint8(x)
    if pixels.ndim == 4:
        pixels = tile(pixels, columns or grid_columns(len(pixels)))
    return _atomic(path, lambda p: Image.fromarray(pixels).save(p, format="PNG"))


def save_video(x, path, fps: int, columns: int | None = None) -> Path:
    """One video (T, 3, H, W), or a grid of a batch (B, T, 3, H, W), in [-1, 1] (or uint8 (..., T, H, W, 3)) as
    H.264 MP4."""
    import imageio.v2 as imageio

    frames = to_uint8(x)
    if frames.ndim == 5:
        frames = tile(frames, columns or grid_columns(len(frames)))
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sides

    def write(p):
        with imageio.get_writer(p, format="FFMPEG", fps=max(1, int(fps)), codec="libx264", macro_block_size=1,
                                pixelformat="yuv420p", ffmpeg_params=["-crf", "18"]) as writer:
            for frame in frames:
                writer.append_data(frame)

    return _atomic(path, write)


def save_latents(x, path) -> Path:
    """Latents (any shape) as a safetensors file holding one tensor, "latents", in fp32."""
    from safetensors.torch import save_file

    return _atomic(path, lambda p: save_file({"latents": x.detach().float().cpu().contiguous()}, str(p)))
