"""Training-free editing and inpainting of real images: invert the image to the flow's Gaussian z under a caption
that describes it, then decode z under another caption (the STARFlow paper's training-free editing;
`STARFlowPipeline.invert` and `STARFlowPipeline.edit`).  With a video checkpoint the image is a video's first frame:
it is edited (or inpainted) and the video continues from it.

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
Writes <stem>-same.png (the reconstruction) and <stem>-edit-<k>.png (one per --caption; videos: .mp4 of
--target_length frames) to --output_dir, and prints the reconstruction's PSNR to the input as the model sees it
(center-cropped and resized; a video's first frame).
"""
import argparse
import math
from pathlib import Path

import numpy as np

from utils.config import ConfigError, Parser, add_device_args


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def as_model_sees(pipe, image) -> np.ndarray:
    """The picture center-cropped and resized to the model's size, uint8 (H, W, 3)."""
    from utils.pipeline import load_first_frame

    x = load_first_frame(image, pipe.image_size()[0])
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def save_picture(rows: list[list[np.ndarray]], path: Path) -> None:
    """A PNG of pictures side by side, a row per list: each an image (H, W, 3) or a video (T, H, W, 3) whose
    frames go in a row; 2-pixel white gaps, a wider one between pictures; scaled up 4x (nearest)."""
    from utils.media import save_image

    gap = np.full((rows[0][0].shape[-3], 2, 3), 255, np.uint8)
    lines = []
    for row in rows:
        parts = []
        for x in row:
            frames = [x] if x.ndim == 3 else list(x)
            parts += [piece for frame in frames for piece in (frame, gap)] + [gap]
        lines.append(np.concatenate(parts[:-2], axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 2), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    grid = np.concatenate(lines)[:-2]
    save_image(grid.repeat(4, axis=0).repeat(4, axis=1), path)


def shapes_eval(pipe, n: int, picture: Path | None) -> str:
    """The acceptance figures of the editing issue on a shapes checkpoint: n pictures of the training distribution
    (an unused seed; a video model's are first frames), each inverted under its caption; decoded under the same
    caption (PSNR of the picture, or of a video's first frame) and under the caption with only the colour changed
    (scripts/eval_shapes reads the new colour with the old shape and position, or for a video the old shape and
    direction).  Inpainting as `sample.py --input_image --mask` does it (inverted under the new caption, the
    checkpoint's guidance): n pictures generated from the same captions (a video model's first frames), the
    shape's box (+3 px) masked and regenerated under a caption with another colour and another shape at the same
    place (a video: moving the same way)."""
    from dataset import COLORS, SHAPES, ShapesDataset, render_shape, shape_caption
    from scripts.eval_shapes import measure_image, measure_video

    frames = pipe.trained_frames
    data, rng = ShapesDataset(n, img_size=pipe.args.img_size, frames=frames, seed=4242), np.random.default_rng(0)
    where = "position" if frames == 1 else "direction"
    measure = measure_image if frames == 1 else measure_video
    read_right = lambda out, asked: sum(all(measure(x)[k] == a[k] for k in ("color", "shape", where))
                                        for x, a in zip(out, asked))
    first = (lambda x: x) if frames == 1 else (lambda x: x[:, 0])
    rendered, sources, targets, wanted = [], [], [], []
    for i in range(n):
        attrs = data.attributes(i)
        pixels = render_shape(**attrs, img_size=pipe.args.img_size, frames=frames)
        rendered.append(pixels if frames == 1 else pixels[0])
        sources.append(shape_caption(**attrs))
        new = dict(attrs, color=rng.choice([c for c in COLORS if c != attrs["color"]]).item())
        targets.append(shape_caption(**new))
        wanted.append(new)
    same = pipe.edit(rendered, sources, sources).as_uint8()
    edited = pipe.edit(rendered, sources, targets).as_uint8()
    quality = [psnr(a, b) for a, b in zip(first(same), rendered)]
    right = read_right(edited, wanted)
    # inpainting, on pictures the model generated from the captions: the shape's box plus a 3-pixel margin
    # regenerated as another colour and another shape
    generated = list(first(pipe(sources, seed=0, indices=list(range(n))).as_uint8()))
    masks, asked = [], []
    for i in range(n):
        ink = generated[i].min(-1) < 200
        columns, rows = np.flatnonzero(ink.any(0)), np.flatnonzero(ink.any(1))
        mask = np.zeros(generated[i].shape[:2], bool)
        if len(rows):
            mask[max(rows[0] - 3, 0):rows[-1] + 4, max(columns[0] - 3, 0):columns[-1] + 4] = True
        masks.append(mask)
        other = rng.choice([s for s in SHAPES if s != wanted[i]["shape"]]).item()
        asked.append(dict(wanted[i], shape=other))
    painted = [shape_caption(**a) for a in asked]  # as sample.py --mask: inverted under the caption, guided
    raw = pipe.edit(generated, painted, painted, 1.0, pipe.resolve()[0], mask=masks, paste=False).as_uint8()
    outside = [psnr(r[~m], im[~m]) for r, m, im in zip(first(raw), masks, generated)]
    for r, m, im in zip(first(raw), masks, generated):  # paste the input back, as edit(paste=True) does
        r[~m] = im[~m]
    filled = read_right(raw, asked)
    if picture is not None:
        save_picture([[rendered[i], same[i], edited[i]] for i in range(6)], picture)
    kind = "images" if frames == 1 else "first frames"
    return (f"{n} {kind}: same caption reproduces them at {np.mean(quality):.1f} dB PSNR (lowest "
            f"{min(quality):.1f}); colour changed, the rest kept: {right}/{n} = {right / n:.1%}; inpainting the "
            f"shape's box (+3 px) as another colour and shape: {filled}/{n} = {filled / n:.1%} read right, pixels "
            f"outside the masks at {np.mean(outside):.1f} dB PSNR before pasting the input back (lowest "
            f"{min(outside):.1f})" +
            (f"; picture {picture}" if picture else ""))


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="an image or video checkpoint")
    p.add_argument("--config", type=Path, help="the YAML of an official .pth checkpoint")
    p.add_argument("--input_image", type=Path, help="the picture to edit")
    p.add_argument("--source_caption", help="a caption that describes the picture as it is")
    p.add_argument("--caption", action="append", default=[], help="the edited picture's caption (repeatable)")
    p.add_argument("--mask", type=Path, help="inpainting: a picture whose white (bright) pixels are regenerated; "
                   "the rest stays the input's")
    p.add_argument("--strength", type=float, default=None,
                   help="fresh noise mixed into z, 0 to 1 (default 0; with --mask 1, inside the mask only)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale of the decoding (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --strength noise (and of a video's later frames)")
    p.add_argument("--target_length", type=int, help="video checkpoints: frames of the videos (default: trained)")
    p.add_argument("--output_dir", type=Path, default=Path("outputs/edit"), help="where the pictures go")
    p.add_argument("--shapes_eval", type=int, default=0, metavar="N", help="shapes checkpoints: the editing "
                   "figures on N images or first frames (same-caption PSNR, colour edits and inpainting read back)")
    p.add_argument("--picture", type=Path, help="a PNG of the input (and mask) beside the outputs (videos: their "
                   "frames in a row); with --shapes_eval: 6 inputs, reconstructions and colour edits")
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

    from utils.media import save_image, save_video
    from utils.pipeline import STARFlowPipeline

    pipe = STARFlowPipeline.from_pretrained(args.checkpoint, args.config, args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.shapes_eval:
        print(shapes_eval(pipe, args.shapes_eval, args.picture))
        return
    captions = [args.source_caption] + args.caption
    out = pipe.edit([args.input_image] * len(captions), args.source_caption, captions, args.strength, args.guidance,
                    args.mask, args.seed, num_frames=args.target_length)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem, suffix = args.input_image.stem, ".png" if out.frames is None else ".mp4"
    names = [f"{stem}-same{suffix}"] + [f"{stem}-edit-{k}{suffix}" for k in range(len(args.caption))]
    pixels = out.as_uint8()
    for name, x in zip(names, pixels):
        if out.frames is None:
            save_image(x, args.output_dir / name)
        else:
            save_video(x, args.output_dir / name, out.fps)
    seen = as_model_sees(pipe, args.input_image)
    if args.picture is not None:
        shown = [seen] if args.mask is None else [seen, as_model_sees(pipe, args.mask)]
        save_picture([shown + list(pixels)] if out.frames is None else [shown + [x] for x in pixels], args.picture)
    quality = psnr(pixels[0] if out.frames is None else pixels[0][0], seen)
    what = "the source caption with the mask regenerated" if args.mask is not None else "reconstruction (same caption)"
    print(f"{what}: {quality:.1f} dB PSNR to the input" + ("" if out.frames is None else " (first frame)"))
    print(f"wrote {', '.join(names)} to {args.output_dir}" + (f"; picture {args.picture}" if args.picture else ""))

if __name__ == "__main__":
    from utils.config import run_cli

    run_cli(main)
