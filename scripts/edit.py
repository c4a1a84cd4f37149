"""Training-free editing of real images with an image checkpoint: invert the image to the flow's Gaussian z under a
caption that describes it, then decode z under another caption (the STARFlow paper's training-free editing;
`STARFlowPipeline.invert`).

    python -m scripts.edit --checkpoint ckpts/starflow_shapes_t2i_32x32.safetensors --input_image photo.png \\
        --source_caption "a large red circle on the left" --caption "a large blue circle on the left"
    python -m scripts.edit ... --mask region.png --caption "a small green triangle on the left"   # inpainting
    python -m scripts.edit --checkpoint ckpts/starflow_shapes_t2i_32x32.safetensors --shapes_eval 36

The inverse is exact: decoding z under the source caption gives the image back up to the VAE (the image's VAE
posterior mean is what is inverted, without the training noise).  Under another caption the flow keeps what z
holds and the caption does not change.  --strength s in [0, 1] mixes fresh noise into z
(sqrt(1 - s^2) z + s eps, drawn from --seed): 0 keeps the most of the image, 1 is a new sample of the caption.
--guidance (default 0) adds classifier-free guidance to the decoding: stronger edits, less of the image kept.
--mask (inpainting): fresh noise only at the latent tokens under the mask's white pixels (--strength defaults to 1
there), decoded under the caption; the pixels outside the mask are the input's.
Writes <stem>-same.png (the reconstruction) and <stem>-edit-<k>.png (one per --caption) to --output_dir, and prints
the reconstruction's PSNR to the input as the model sees it (center-cropped and resized).
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

from utils.config import ConfigError, Parser, add_device_args


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def edit(pipe, images, source: "str | list[str]", target: "str | list[str]", strength: float = 0.0,
         guidance: float = 0.0, seed: int = 0, masks: list[np.ndarray] | None = None,
         paste: bool = True) -> list[np.ndarray]:
    """Edited uint8 pictures (H, W, 3): each image inverted under its source caption, decoded under its target
    caption (one for all, or one per image).  With `masks` ((H, W) bool at the model's size, True = regenerate;
    inpainting) the noise is mixed in only at the latent tokens a mask touches, and (with `paste`) the pixels
    outside each mask are the input's."""
    if not 0 <= strength <= 1:
        raise ConfigError(f"--strength {strength}: must be in [0, 1]")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    z = pipe.invert(images, source)
    if strength > 0:
        eps = pipe.prepare_latents(len(z), *pipe.image_size()[0], seed=seed)
        mixed = math.sqrt(1 - strength ** 2) * z + strength * eps
        if masks is None:
            z = mixed
        else:  # a latent token is regenerated when its patch of pixels holds any masked pixel
            inside = torch.from_numpy(np.stack(masks)).float()[:, None]
            inside = torch.nn.functional.max_pool2d(inside, pipe.factor).to(z.device) > 0  # (B, 1, h, w)
            z = torch.where(inside, mixed, z)
    targets = [target] * len(z) if isinstance(target, str) else list(target)
    out = list(pipe(targets, latents=z, guidance_scale=guidance, self_denoise=False).as_uint8())
    if masks is not None and paste:
        out = [np.where(m[..., None], o, as_model_sees(pipe, im)) for o, m, im in zip(out, masks, images)]
    return out


def read_mask(pipe, path: Path) -> np.ndarray:
    """A mask picture (white or any bright pixel = regenerate), center-cropped and resized like the image:
    (H, W) bool at the model's size."""
    from utils.pipeline import load_first_frame

    if not path.is_file():
        raise FileNotFoundError(f"--mask {path}: no such file")
    return (load_first_frame(path, pipe.image_size()[0]).mean(0) > 0).numpy()


def as_model_sees(pipe, image) -> np.ndarray:
    """The picture center-cropped and resized to the model's size, uint8 (H, W, 3)."""
    from utils.pipeline import load_first_frame

    x = load_first_frame(image, pipe.image_size()[0])
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def shapes_eval(pipe, n: int, picture: Path | None) -> str:
    """The acceptance figures of the editing issue on a shapes image checkpoint: n images of the training
    distribution (an unused seed), each inverted under its caption; decoded under the same caption (PSNR), and
    under the caption with only the colour changed (scripts/eval_shapes reads the new colour, the old shape and
    position).  Inpainting: n images generated from the same captions, the shape's box (+3 px) masked and
    regenerated under a caption with another colour and another shape at the same place."""
    from PIL import Image

    from dataset import COLORS, SHAPES, ShapesDataset, render_shape, shape_caption
    from scripts.eval_shapes import measure_image

    if pipe.trained_frames > 1:
        raise ConfigError("--shapes_eval: for shapes image checkpoints")
    data, rng = ShapesDataset(n, img_size=pipe.args.img_size, seed=4242), np.random.default_rng(0)
    read_right = lambda pictures, asked: sum(all(measure_image(p)[k] == a[k] for k in ("color", "shape", "position"))
                                             for p, a in zip(pictures, asked))
    rendered, sources, targets, wanted = [], [], [], []
    for i in range(n):
        attrs = data.attributes(i)
        rendered.append(render_shape(**attrs, img_size=pipe.args.img_size))
        sources.append(shape_caption(**attrs))
        new = dict(attrs, color=rng.choice([c for c in COLORS if c != attrs["color"]]).item())
        targets.append(shape_caption(**new))
        wanted.append(new)
    same = edit(pipe, rendered, sources, sources)
    edited = edit(pipe, rendered, sources, targets)
    quality = [psnr(a, b) for a, b in zip(same, rendered)]
    right = read_right(edited, wanted)
    # inpainting, on images the model generated from the captions: the shape's box plus a 3-pixel margin
    # regenerated as another colour and another shape
    generated = list(pipe(sources, seed=0, indices=list(range(n))).as_uint8())
    masks, asked = [], []
    for i in range(n):
        ink = generated[i].min(-1) < 200
        columns, rows = np.flatnonzero(ink.any(0)), np.flatnonzero(ink.any(1))
        mask = np.zeros(generated[i].shape[:2], bool)
        mask[max(rows[0] - 3, 0):rows[-1] + 4, max(columns[0] - 3, 0):columns[-1] + 4] = True
        masks.append(mask)
        other = rng.choice([s for s in SHAPES if s != wanted[i]["shape"]]).item()
        asked.append(dict(wanted[i], shape=other))
    raw = edit(pipe, generated, sources, [shape_caption(**a) for a in asked], 1.0, masks=masks, paste=False)
    outside = [psnr(r[~m], im[~m]) for r, m, im in zip(raw, masks, generated)]
    filled = read_right([np.where(m[..., None], r, im) for r, m, im in zip(raw, masks, generated)], asked)
    if picture is not None:
        gap = np.full((32, 2, 3), 255, np.uint8)
        rows = [np.concatenate([rendered[i], gap, same[i], gap, edited[i]], axis=1) for i in range(6)]
        grid = np.concatenate([np.concatenate([r, np.full((2, r.shape[1], 3), 255, np.uint8)]) for r in rows])
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(picture)
    return (f"{n} images: same caption reproduces them at {np.mean(quality):.1f} dB PSNR (lowest "
            f"{min(quality):.1f}); colour changed, the rest kept: {right}/{n} = {right / n:.1%}; inpainting the "
            f"shape's box (+3 px) as another colour and shape: {filled}/{n} = {filled / n:.1%} read right, pixels "
            f"outside the masks at {np.mean(outside):.1f} dB PSNR before pasting the input back (lowest "
            f"{min(outside):.1f})" +
            (f"; picture {picture}" if picture else ""))


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="an image checkpoint")
    p.add_argument("--config", type=Path, help="the YAML of an official .pth checkpoint")
    p.add_argument("--input_image", type=Path, help="the picture to edit")
    p.add_argument("--source_caption", help="a caption that describes the picture as it is")
    p.add_argument("--caption", action="append", default=[], help="the edited picture's caption (repeatable)")
    p.add_argument("--mask", type=Path, help="inpainting: a picture whose white (bright) pixels are regenerated; "
                   "the rest stays the input's")
    p.add_argument("--strength", type=float, default=None,
                   help="fresh noise mixed into z, 0 to 1 (default 0; with --mask 1, inside the mask only)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale of the decoding (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --strength noise")
    p.add_argument("--output_dir", type=Path, default=Path("outputs/edit"), help="where the pictures go")
    p.add_argument("--shapes_eval", type=int, default=0, metavar="N", help="shapes image checkpoints: the editing "
                   "figures on N images (same-caption PSNR, colour edits read back)")
    p.add_argument("--picture", type=Path, help="with --shapes_eval: a PNG of 6 inputs, reconstructions and edits")
    add_device_args(p)
    args = p.parse_args(argv)
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if not args.shapes_eval:
        if args.input_image is None or args.source_caption is None or not args.caption:
            raise ConfigError("give --input_image, --source_caption and at least one --caption (or --shapes_eval N)")
        if not args.input_image.is_file():
            raise FileNotFoundError(f"--input_image {args.input_image}: no such file")
        if args.mask is not None and not args.mask.is_file():
            raise FileNotFoundError(f"--mask {args.mask}: no such file")
    if args.strength is None:
        args.strength = 1.0 if args.mask is not None else 0.0
    if not 0 <= args.strength <= 1:
        raise ConfigError(f"--strength {args.strength}: must be in [0, 1]")

    from PIL import Image

    from utils.files import plain_mode
    from utils.pipeline import STARFlowPipeline

    pipe = STARFlowPipeline.from_pretrained(args.checkpoint, args.config, args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.shapes_eval:
        print(shapes_eval(pipe, args.shapes_eval, args.picture))
        return
    captions = [args.source_caption] + args.caption
    masks = None if args.mask is None else [read_mask(pipe, args.mask)] * len(captions)
    pictures = edit(pipe, [args.input_image] * len(captions), args.source_caption, captions, args.strength,
                    args.guidance, args.seed, masks)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.input_image.stem
    names = [f"{stem}-same.png"] + [f"{stem}-edit-{k}.png" for k in range(len(args.caption))]
    for name, pixels in zip(names, pictures):
        Image.fromarray(pixels).save(args.output_dir / name)
        plain_mode(args.output_dir / name)
    quality = psnr(pictures[0], as_model_sees(pipe, args.input_image))
    print(f"reconstruction (same caption): {quality:.1f} dB PSNR" if masks is None else
          f"the source caption with the mask regenerated: {quality:.1f} dB PSNR to the input")
    print(f"wrote {', '.join(names)} to {args.output_dir}")


if __name__ == "__main__":
    from utils.config import run_cli

    run_cli(main)
