"""Cut an MP4 sample grid (as utils.media.save_video writes it) into one video per tile, or into PNG frames.

    python -m scripts.extract_image_from_video samples.mp4 -H 480 -W 832            # samples_0.mp4, samples_1.mp4, ...
    python -m scripts.extract_image_from_video samples.mp4 --n 4 --frames           # samples_0/frame_000000.png, ...
    python -m scripts.extract_image_from_video samples.mp4 --n 1 --strip 16         # samples_0_strip.png: 16 a row

Every frame has the layout of scripts/extract_images.py (2-pixel white borders, grid_columns(n) columns); an odd
grid side was padded by one pixel at the bottom/right for yuv420p, which is allowed for here.  Tiles are
numbered row by row from 0; the tile videos keep the grid's frame rate.
"""
import argparse
import itertools
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

from scripts.extract_images import GridError, cut, grid_parser, layout
from utils.media import save_image

BORDER_TOLERANCE = 24  # H.264 leaves the white lines between tiles at 240-255 on average


def parse_args(argv=None) -> argparse.Namespace:
    p = grid_parser(__doc__, "video", "MP4")
    p.add_argument("--frames", action="store_true", help="write each tile as a folder of PNG frames, not an MP4")
    p.add_argument("--strip", type=int, default=0, metavar="PER_ROW",
                   help="write each tile's frames side by side as one PNG, PER_ROW frames a row (a frames strip)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the video)")
    return p.parse_args(argv)


def open_writer(path: Path, fps: float):
    """An H.264 writer with utils.media.save_video's settings.

    Tiles are streamed frame by frame rather than passed to save_video, which needs the whole clip as a float
    tensor (gigabytes for a long 480p grid).
    """
    return imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                              pixelformat="yuv420p", ffmpeg_params=["-crf", "18"])


def even(frame: np.ndarray) -> np.ndarray:
    """Pad an odd side by repeating the bottom/right edge, as save_video does: yuv420p needs even sides."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def main(argv=None):
    args = parse_args(argv)
    if not args.video.is_file():
        sys.exit(f"error: {args.video}: no such file")
    try:
        reader = imageio.get_reader(args.video, "ffmpeg")
        fps = reader.get_meta_data()["fps"]
        frames = reader.iter_data()
        first = next(frames, None)
    except (OSError, RuntimeError) as e:  # what imageio raises for a file ffmpeg cannot open
        reason = str(e).partition("\n")[0]
        sys.exit(f"error: {args.video}: cannot read it as a video ({reason})")
    if first is None:
        sys.exit(f"error: {args.video}: the video has no frames")
    try:
        rows, columns, tile_h, tile_w = layout(first, args.tile_h, args.tile_w, args.n, odd_padded=True,
                                               tolerance=BORDER_TOLERANCE)
    except GridError as e:
        reader.close()
        sys.exit(f"error: {args.video} ({first.shape[0]}x{first.shape[1]}): {e}")

    out = args.out if args.out is not None else args.video.parent
    stem, n = args.video.stem, rows * columns
    if args.strip < 0:
        sys.exit(f"error: --strip {args.strip}: frames per row must be positive")
    strips = [[] for _ in range(n)]
    if args.strip:
        out.mkdir(parents=True, exist_ok=True)
    elif args.frames:
        folders = [out / f"{stem}_{i}" for i in range(n)]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        writers = [open_writer(out / f"{stem}_{i}.mp4", fps) for i in range(n)]
    with reader:
        for t, frame in enumerate(itertools.chain([first], frames)):
            for i, tile in enumerate(cut(frame, rows, columns, tile_h, tile_w)):
                if args.strip:
                    strips[i].append(tile)
                elif args.frames:
                    Image.fromarray(tile).save(folders[i] / f"frame_{t:06d}.png")
                else:
                    writers[i].append_data(even(tile))
    if args.strip:
        for i, tiles in enumerate(strips):
            save_image(np.stack(tiles), out / f"{stem}_{i}_strip.png", columns=args.strip)
    elif not args.frames:
        for writer in writers:
            writer.close()
    where = f"{out}/{stem}_<id>_strip.png" if args.strip else \
        f"{out}/{stem}_<id>/frame_<t>.png" if args.frames else f"{out}/{stem}_<id>.mp4"
    print(f"{args.video}: {rows}x{columns} grid of {tile_h}x{tile_w} tiles, {t + 1} frames at {fps:g} fps; "
          f"wrote {n} tiles to {where}")


if __name__ == "__main__":
    main()
