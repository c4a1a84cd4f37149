"""Cut a PNG sample grid (as utils.media.save_image writes it) back into its tiles.

    python -m scripts.extract_images samples.png -H 256 -W 256              # every tile: samples_0.png, ...
    python -m scripts.extract_images samples.png -H 256 -W 256 --ids 0 3 5  # those tiles, and samples_extracted.png
    python -m scripts.extract_images samples.png --n 8                      # tile size from the number of tiles

A grid has a 2-pixel white border around and between its tiles and grid_columns(n) columns, so a side of S pixels
holds k tiles of T pixels exactly when S = k * (T + 2) + 2, and the lines between tiles are white.  Tiles are
numbered row by row from 0.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from utils.media import grid_columns, tile

PAD = 2  # the border utils.media.tile draws


class GridError(ValueError):
    """A tile size or tile count that does not fit the grid; the message names the flag."""


def _side(side: int, size: int | None, count: int | None, flag: str, name: str, n: int | None,
          odd_padded: bool) -> tuple[int, int]:
    """(tiles, tile size) along one grid side of `side` pixels, from the tile size, the tile count, or both.

    odd_padded: the grid went through save_video, which pads an odd side by one pixel, so an even side may hold
    a grid one pixel smaller.  A tile size settles which; from the count alone, a single row (or column) of odd
    tiles also reads as unpadded tiles one pixel larger, and the unpadded reading wins (samples have even sides).
    """
    fitted = None
    for s in (side, side - 1) if odd_padded and side % 2 == 0 else (side,):
        if size is not None:
            tiles, rest = divmod(s - PAD, size + PAD)
            if rest == 0 and tiles >= 1:
                fitted = tiles
                if count in (None, tiles):
                    return tiles, size
        else:
            step, rest = divmod(s - PAD, count)
            if rest == 0 and step > PAD:
                return count, step - PAD
    rule = f"a {name} of k tiles of T pixels is k x (T + {PAD}) + {PAD}"
    if size is None:
        raise GridError(f"--n {n} needs {count} tiles along the {name} of {side} pixels, which does not fit ({rule})")
    if fitted is None:
        raise GridError(f"{flag} {size} does not fit the {name} of {side} pixels ({rule})")
    raise GridError(f"{flag} {size} gives {fitted} tiles along the {name}, but --n {n} needs {count}")


def layout(grid: np.ndarray, tile_h: int | None, tile_w: int | None, n: int | None, odd_padded: bool = False,
           tolerance: float = 0) -> tuple[int, int, int, int]:
    """(rows, columns, tile height, tile width) of a (height, width, C) grid image.

    Each tile side comes from its flag when given, otherwise from n (rows and columns as in utils.media); with
    both, they must agree.  Sizes alone can fit by chance (4 tiles fit a 2x3 grid's size), so the 2-pixel lines
    between the tiles must also be white: each line's mean within `tolerance` of 255 (lossy video needs some).
    """
    if n is not None and n < 1:
        raise GridError(f"--n {n} must be at least 1")
    if (tile_h is None or tile_w is None) and n is None:
        raise GridError("give the tile size (-H and -W) or the number of tiles (--n)")
    for flag, size in (("-H", tile_h), ("-W", tile_w)):
        if size is not None and size < 1:
            raise GridError(f"{flag} {size} must be at least 1")
    flags = " ".join(f"{flag} {v}" for flag, v in (("-H", tile_h), ("-W", tile_w), ("--n", n)) if v is not None)
    columns = grid_columns(n) if n is not None else None
    rows = n // columns if n is not None else None
    rows, tile_h = _side(grid.shape[0], tile_h, rows, "-H", "height", n, odd_padded)
    columns, tile_w = _side(grid.shape[1], tile_w, columns, "-W", "width", n, odd_padded)

    height, width = rows * (tile_h + PAD) + PAD, columns * (tile_w + PAD) + PAD
    lines = [grid[y:y + PAD, :width] for y in range(0, height, tile_h + PAD)]
    lines += [grid[:height, x:x + PAD] for x in range(0, width, tile_w + PAD)]
    if any(line.mean() < 255 - tolerance for line in lines):
        raise GridError(f"{flags} makes {rows}x{columns} tiles of {tile_h}x{tile_w}, but the {PAD}-pixel lines "
                        f"between them are not white: is the tile size or count right?")
    return rows, columns, tile_h, tile_w


def cut(grid: np.ndarray, rows: int, columns: int, tile_h: int, tile_w: int) -> np.ndarray:
    """([T,] height, width, C) grid -> (rows * columns, [T,] tile_h, tile_w, C) tiles, row by row."""
    tiles = []
    for r in range(rows):
        for c in range(columns):
            y, x = PAD + r * (tile_h + PAD), PAD + c * (tile_w + PAD)
            tiles.append(grid[..., y:y + tile_h, x:x + tile_w, :])
    return np.stack(tiles)


def grid_parser(description: str, name: str, kind: str) -> argparse.ArgumentParser:
    """The arguments of both grid tools: the grid file and its tile layout."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(name, type=Path, help=f"{kind} grid written by sample.py")
    p.add_argument("-H", dest="tile_h", type=int, default=None, help="tile height in pixels")
    p.add_argument("-W", dest="tile_w", type=int, default=None, help="tile width in pixels")
    p.add_argument("--n", type=int, default=None, help="number of tiles (infers -H/-W when they are not given)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = grid_parser(__doc__, "grid", "PNG")
    p.add_argument("--ids", type=int, nargs="+", default=None,
                   help="tiles to extract (default: all); also writes a grid of just these")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the grid)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.grid.is_file():
        sys.exit(f"error: {args.grid}: no such file")
    try:
        with Image.open(args.grid) as im:
            grid = np.asarray(im.convert("RGB"))
    except OSError as e:  # PIL.UnidentifiedImageError included
        sys.exit(f"error: {args.grid}: cannot read it as an image ({e})")
    try:
        rows, columns, tile_h, tile_w = layout(grid, args.tile_h, args.tile_w, args.n)
    except GridError as e:
        sys.exit(f"error: {args.grid} ({grid.shape[0]}x{grid.shape[1]}): {e}")
    tiles = cut(grid, rows, columns, tile_h, tile_w)
    ids = args.ids if args.ids is not None else range(len(tiles))
    for i in ids:
        if not 0 <= i < len(tiles):
            sys.exit(f"error: --ids {i} is out of range: {args.grid} has {len(tiles)} tiles (0 to {len(tiles) - 1})")

    out = args.out if args.out is not None else args.grid.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.grid.stem
    for i in ids:
        Image.fromarray(tiles[i]).save(out / f"{stem}_{i}.png")
    print(f"{args.grid}: {rows}x{columns} grid of {tile_h}x{tile_w} tiles; "
          f"wrote {len(ids)} tiles to {out}/{stem}_<id>.png")
    if args.ids is not None:
        picked = tiles[list(ids)]
        path = out / f"{stem}_extracted.png"
        Image.fromarray(tile(picked, grid_columns(len(picked)), PAD)).save(path)
        print(f"wrote {path} (tiles {' '.join(map(str, ids))})")


if __name__ == "__main__":
    main()
