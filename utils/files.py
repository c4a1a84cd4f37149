"""Reading the files users bring: pictures as a viewer shows them, text in the encoding it was saved in, caption
tables with the headers people write.

One decoder serves the training loader (folders and tar shards) and `sample.py --input_image`, so a picture reaches
the model the same way wherever it comes from.  Every refusal is a ValueError naming the file.
"""
import codecs
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from utils.config import ConfigError, one_line

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".avif", ".tif", ".tiff", ".bmp", ".gif")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, the background of the shapes data
_SRGB = ImageCms.createProfile("sRGB")
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit greyscale (PNG, TIFF); "I" as Pillow opens them
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def plain_mode(path: str | Path) -> None:
    """Give a written file the permissions open() gives (0666 less the umask): safetensors writes its files 0600,
    which colleagues on a shared cluster cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_image(source, where: str | Path | None = None) -> np.ndarray:
    """A picture (path or file object) -> (H, W, 3) uint8 sRGB, as an image viewer shows it.

    The first frame of an animation; turned upright by its EXIF orientation (`ImageOps.exif_transpose`); 16-bit
    greyscale scaled to 8 bits (65535 -> 255) and float greyscale read as [0, 1]; converted to sRGB by its embedded
    ICC profile (CMYK included; without a profile, Pillow's conversion); palette and greyscale expanded to RGB;
    transparency composited on white (`BACKGROUND`).  Raises ValueError naming `where` (default: the source) when
    the file is not a picture Pillow reads (any format it opens: PNG, JPEG, WebP, AVIF, TIFF, BMP, GIF, ...).
    """
    try:
        with Image.open(source) as img:
            return np.asarray(displayed(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{where or source}: not a readable image ({one_line(err)})") from None


def displayed(img: Image.Image) -> Image.Image:
    """The RGB image a viewer shows for `img` (see read_image)."""
    icc = img.info.get("icc_profile")
    transparent = img.mode in _ALPHA or "transparency" in img.info
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_DEPTH:
        img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif img.mode == "F":
        img = img.point(lambda v: v * 255).convert("L")
    if img.mode not in ("RGB", "CMYK") or transparent:
        img = img.convert("RGBA" if transparent else "RGB")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            img = ImageCms.profileToProfile(img, source, _SRGB, outputMode="RGBA" if img.mode == "RGBA" else "RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken or unsupported profile: show the pixels as they are, as most viewers do
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), img)
    return img.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientations 5-8 swap the sides), from the header alone."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({one_line(err)})") from None


# ---- text ---------------------------------------------------------------------------------------------------------
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, where: str | Path) -> str:
    """Bytes of a text file -> str with "\\n" line ends.  UTF-8 with or without a BOM, UTF-16/32 with a BOM, else
    Windows-1252 (what spreadsheet programs save as "CSV" on Western systems) when the bytes are not UTF-8 but are
    valid there; otherwise a ValueError naming `where` and asking for UTF-8."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    candidates = [encoding] if encoding else ["utf-8", "cp1252"]
    for name in candidates:
        try:
            text = data.decode(name)
        except UnicodeDecodeError:
            continue
        return text.replace("\r\n", "\n").replace("\r", "\n")
    raise ValueError(f"{where}: not UTF-8 text (nor UTF-16/32 with a byte-order mark, nor Windows-1252); "
                     f"save it as UTF-8")


def read_text(path: str | Path) -> str:
    """A text file in any encoding decode_text reads; a missing file is FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return decode_text(path.read_bytes(), path)


def read_lines(path: str | Path, flag: str) -> list[str]:
    """The non-empty lines of a text file (any encoding decode_text reads), stripped, such as a caption file: blank
    lines are skipped, never read as the empty caption.  FileNotFoundError or ConfigError (one line naming `flag`)
    when the file is missing or holds no lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    lines = [line.strip() for line in read_text(path).split("\n") if line.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path}: the file holds no captions")
    return lines


# ---- caption tables -----------------------------------------------------------------------------------------------
# Column (CSV header) and key (JSON Lines) names accepted for the file and its caption, in order of preference.
FILE_NAMES = ("file", "file_name", "filename", "path", "image", "video", "media")
CAPTION_NAMES = ("caption", "text", "prompt", "description")


def _pick(names: list[str], accepted: tuple[str, ...]) -> str | None:
    lowered = {n.strip().lower(): n for n in names if isinstance(n, str)}
    return next((lowered[a] for a in accepted if a in lowered), None)


def read_caption_table(path: Path) -> list[tuple[int, str, str]]:
    """(line number, file named, caption) of every entry of a captions.csv (a header row naming the columns; comma,
    semicolon, tab or '|' separated) or captions.jsonl (one JSON object per line) file.  Accepted names, any case: FILE_NAMES for the file,
    CAPTION_NAMES for the caption (e.g. Hugging Face's `file_name,text`); blank lines are skipped.  An unknown header
    is a ValueError naming the columns found and the names accepted; a bad line names its number."""
    text = read_text(path)
    accepted = f"accepted: {'/'.join(FILE_NAMES)} and {'/'.join(CAPTION_NAMES)}"
    if path.suffix == ".csv":
        first = text.split("\n", 1)[0]
        try:  # spreadsheets in many locales separate with ';' (or tabs)
            dialect = csv.Sniffer().sniff(first, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
        rows = csv.reader(io.StringIO(text), delimiter=dialect.delimiter)
        header = next(rows, None)
        file_col, caption_col = (_pick(header, FILE_NAMES), _pick(header, CAPTION_NAMES)) if header else (None, None)
        if file_col is None or caption_col is None:
            raise ValueError(f"{path}: the header names no file and caption columns (found: "
                             f"{', '.join(header or []) or 'nothing'}; {accepted})")
        i, j = header.index(file_col), header.index(caption_col)
        entries = []
        for n, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(i, j):
                raise ValueError(f"{path}:{n}: expected {len(header)} columns, found {len(row)}")
            entries.append((n, row[i], row[j]))
        return entries
    entries = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        keys = list(entry) if isinstance(entry, dict) else []
        file_key, caption_key = _pick(keys, FILE_NAMES), _pick(keys, CAPTION_NAMES)
        if file_key is None or caption_key is None or not isinstance(entry[caption_key], str):
            raise ValueError(f"{path}:{n}: no file and caption keys (found: {', '.join(keys) or 'none'}; {accepted})")
        entries.append((n, str(entry[file_key]), entry[caption_key]))
    return entries
