"""Files as users bring them (issue 15): pictures in every mode reach the model as a viewer shows them, caption
files in the encodings and layouts people save, and loading errors as one line naming the file with any number of
DataLoader workers.  The shared cases of ../shared/cases are copied under tests/data/cases."""
import argparse
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageCms

from dataset import FolderDataset, build_loader
from utils.files import BACKGROUND, decode_text, image_size, read_caption_table, read_image

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "cases"


def config(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(data=Path("unused"), dataset="folder", img_size=16, vid_size=None,
                                        mix_aspect=0, no_flip=1, batch_size=2, epoch_length=4, train_seed=0),
                                 **overrides})


def saved(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


# ---- pictures ---------------------------------------------------------------------------------------------------
def test_sixteen_bit_pictures_arrive_as_their_eight_bit_selves(tmp_path):
    """png16bit/: a 16-bit grey PNG is the same picture as its 8-bit version (it used to be almost white); so is a
    16-bit TIFF, and a float TIFF in [0, 1]."""
    assert np.array_equal(read_image(CASES / "png16bit/circle16.png"), read_image(CASES / "png16bit/circle8.png"))
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)[None].repeat(8, 0)
    tiff = saved(Image.fromarray(ramp), tmp_path / "ramp16.tif")
    expected = np.round(ramp / 257).astype(np.uint8)
    for path in (tiff, saved(Image.fromarray(ramp.astype(np.float32) / 65535), tmp_path / "ramp.tif")):
        pixels = read_image(path)
        assert pixels.shape == (8, 64, 3) and np.abs(pixels[..., 1].astype(int) - expected).max() <= 1, path


def test_the_sixteen_bit_gradient_reaches_the_training_batch_as_a_gradient():
    """png16bit/folder through the folder loader: dark on the left, light on the right (it was mean 247/255)."""
    source = FolderDataset(CASES / "png16bit/folder")
    pixels, caption, _ = source.load(source.files.index(CASES / "png16bit/folder/grad16.png"),
                                     np.random.default_rng(0))
    columns = pixels[..., 0].mean(0)
    assert columns[0] < 10 and columns[-1] > 245 and np.all(np.diff(columns) >= 0)
    x, captions, _ = next(iter(build_loader(config(data=CASES / "png16bit/folder", img_size=32, batch_size=2))))
    grad = x[captions.index(caption)]
    assert grad[:, :, :4].mean() < -0.8 and grad[:, :, -4:].mean() > 0.8


def test_input_image_reads_sixteen_bits_like_the_training_data():
    """sample.py --input_image png16bit/circle16.png: the same first frame as circle8.png (it was blank white)."""
    from utils.pipeline import load_first_frame

    first = load_first_frame(str(CASES / "png16bit/circle16.png"), (32, 32))
    assert (first == load_first_frame(str(CASES / "png16bit/circle8.png"), (32, 32))).all() and first.min() < 0


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    rgba[0, 0, 3] = 0  # one fully transparent pixel
    half = read_image(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert tuple(half[0, 0]) == BACKGROUND and np.abs(half[1, 1].astype(int) - [255, 127, 127]).max() <= 1
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    shown = read_image(saved(palette, tmp_path / "palette.png", transparency=0))  # index 0 transparent
    assert tuple(shown[0, 0]) == BACKGROUND and tuple(shown[1, 1]) == (0, 255, 0)
    grey_alpha = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert tuple(read_image(saved(grey_alpha, tmp_path / "la.png"))[0, 0]) == BACKGROUND


def test_phone_photos_arrive_upright(tmp_path):
    """EXIF orientation 6 (rotate 90 degrees clockwise to display): the stored left half is the displayed top."""
    stored = np.zeros((4, 8, 3), np.uint8)
    stored[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(Image.fromarray(stored), tmp_path / "phone.png", exif=exif)
    shown = read_image(path)
    assert shown.shape == (8, 4, 3) and image_size(path) == (4, 8)
    assert (shown[:4, :, 0] == 255).all() and (shown[4:, :, 0] == 0).all()


def test_modes_formats_and_animations(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :, 2] = 200
    rgb[:4] = (30, 160, 90)
    for name, options, tolerance in (("p.webp", {"lossless": True}, 0), ("p.bmp", {}, 0), ("p.tiff", {}, 0),
                                     ("p.avif", {"quality": 100, "subsampling": "4:4:4"}, 3)):  # AVIF is lossy
        error = np.abs(read_image(saved(Image.fromarray(rgb), tmp_path / name, **options)).astype(int) - rgb)
        assert error.mean() <= tolerance, (name, error.mean())
    grey = read_image(saved(Image.fromarray(rgb[..., 1]), tmp_path / "grey.png"))
    assert (grey == rgb[..., 1:2]).all()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(read_image(saved(cmyk, tmp_path / "cmyk.jpg", quality=100)).astype(int)
                  - np.asarray(cmyk.convert("RGB"))).max() <= 8
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert tuple(read_image(gif)[4, 4]) == (255, 0, 0)  # the first frame


def linear_rgb_profile() -> bytes:
    """A minimal ICC v2 display profile (ICC.1:2001-04): sRGB primaries and white, gamma 1 (linear light)."""
    fixed = lambda v: struct.pack(">i", round(v * 65536))  # s15Fixed16Number
    xyz = lambda x, y, z: b"XYZ " + b"\0" * 4 + fixed(x) + fixed(y) + fixed(z)
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 256)  # one entry: gamma 1.0 as u8Fixed8
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 7) + b"linear\0" + b"\0" * 78
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acspAPPL" + b"\0" * 24 + fixed(0.9642) + fixed(1.0) + fixed(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def test_an_embedded_icc_profile_is_applied(tmp_path):
    """Pixels tagged with a profile are shown in sRGB, as a colour-managed viewer shows them: sRGB to sRGB changes
    nothing, and 64/255 in linear light is 137/255 in sRGB."""
    rgb = np.full((4, 4, 3), 64, np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert np.abs(read_image(saved(Image.fromarray(rgb), tmp_path / "srgb.png", icc_profile=srgb)).astype(int)
                  - 64).max() <= 1
    linear = read_image(saved(Image.fromarray(rgb), tmp_path / "linear.jpg", icc_profile=linear_rgb_profile(),
                              quality=100))
    assert np.abs(linear.astype(int) - 137).max() <= 1


def test_unreadable_pictures_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes.png: not a readable image") as err:
        read_image(bad)
    assert "\n" not in str(err.value)


# ---- caption files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["csv", "jsonl"])
def test_caption_index_saved_with_a_bom_and_crlf(case):
    """caption-index-bom/: a spreadsheet's "UTF-8 with BOM" CSV with CRLF ends (was KeyError: 'file') and a JSON
    Lines file with a BOM (was 'expected {"file": ...}' about a valid line) both read."""
    source = FolderDataset(CASES / "caption-index-bom" / case)
    assert sorted(source.captions) == ["a blue square", "a red square"]


@pytest.mark.parametrize("header,row", [("file_name,text", "a.png,a cat"), ("Image, Prompt", "a.png, a cat"),
                                        ("path;caption", "a.png;a cat"), ("File\tDescription", "a.png\ta cat"),
                                        ("name,label", None)])
def test_csv_headers_people_write(tmp_path, header, row):
    """Other column names, and the ';' or tab separators of spreadsheets in other locales; an unknown header is one
    line naming the columns found."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text(f"{header}\n{row or 'a.png,a cat'}\n")
    if row is None:
        with pytest.raises(ValueError, match=r"captions.csv: the header names no file and caption columns "
                                             r"\(found: name, label; accepted: file/"):
            FolderDataset(tmp_path)
    else:
        assert FolderDataset(tmp_path).captions == ["a cat"]


def test_encodings_people_save_in(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "captions.csv").write_bytes("file,caption\r\na.png,un caf\u00e9 cr\u00e8me\r\n".encode("cp1252"))
    (tmp_path / "b.txt").write_bytes("\u00fcber-gr\u00fcn \u2013 a sign".encode("utf-16"))
    assert FolderDataset(tmp_path).captions == ["un caf\u00e9 cr\u00e8me", "\u00fcber-gr\u00fcn \u2013 a sign"]
    assert decode_text(b"\xef\xbb\xbfa\r\nb\rc\n", "x") == "a\nb\nc\n"
    with pytest.raises(ValueError, match="bad.txt: not UTF-8 text"):
        decode_text(b"\x81\x8d\x8f\x90\x9d", "bad.txt")  # undefined in Windows-1252 too


def test_jsonl_keys_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"file_name": "a.png", "text": "a cat"}\n\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:3: no file and caption keys \(found: file;"):
        read_caption_table(path)
    path.write_text('{"file_name": "a.png", "text": "a cat"}\n')
    assert read_caption_table(path) == [(1, "a.png", "a cat")]


def test_sampling_caption_files_skip_blank_lines_and_read_any_encoding(tmp_path):
    from utils.sampling import read_captions

    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeffa red circle\r\n\r\n  \r\na blue square\r\n\r\n".encode("utf-8"))
    captions, name = read_captions(argparse.Namespace(caption=str(path)), None)
    assert captions == ["a red circle", "a blue square"] and name == "captions"


# ---- errors in DataLoader workers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_picture_is_one_line_with_any_number_of_workers(workers):
    """worker-error/: img2.jpg is truncated; with workers the error used to arrive inside 24 lines of traceback."""
    loader = build_loader(config(data=CASES / "worker-error/folder", batch_size=2, epoch_length=4),
                          num_workers=workers)
    with pytest.raises(ValueError) as err:
        list(loader)
    assert "img2.jpg: not a readable image" in str(err.value) and "\n" not in str(err.value)


def write_shard(path: Path, samples: list[dict]):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value,) * 3).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_members_follow_the_webdataset_convention(tmp_path, workers):
    """The key is the path up to the first dot of the base name: `k.main.png` and `k.main.txt` are one sample's
    members; a sample without its caption names the shard, the key and what is missing, in one line."""
    good = [{"__key__": f"s{k}", "main.png": png_bytes(40 * k), "main.txt": f"grey {k}"} for k in range(4)]
    write_shard(tmp_path / "good.tar", good)
    x, captions, _ = next(iter(build_loader(config(dataset="webdataset", data=tmp_path / "good.tar",
                                                   epoch_length=2), num_workers=workers)))
    assert len(captions) == 2 and all(c.startswith("grey ") for c in captions)
    for xi, caption in zip(x, captions):
        assert abs((xi.mean().item() + 1) * 127.5 - 40 * int(caption.split()[1])) < 1
    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "bad.tar", [{"__key__": "s0", "png": png_bytes(0)}])
    with pytest.raises(ValueError) as err:
        list(build_loader(config(dataset="webdataset", data=tmp_path / "bad", epoch_length=2), num_workers=workers))
    assert f"{tmp_path / 'bad' / 'bad.tar'}: sample s0: no caption" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_train_with_workers_reports_the_truncated_picture_in_one_line(tmp_path):
    """The shared case as a user runs it: train.py with the default --num_workers 2."""
    out = subprocess.run([sys.executable, "train.py", "--dataset", "folder", "--data",
                          str(CASES / "worker-error/folder"), "--batch_size", "2", "--img_size", "16",
                          "--patch_size", "4", "--channels", "32", "--layers_per_block", "1", "1", "--head_dim", "16",
                          "--max_steps", "2", "--sample_freq", "0", "--logdir", str(tmp_path / "run"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and "img2.jpg: not a readable image" in errors[0], out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sidecar_json_in_shards_is_read_in_its_encoding(tmp_path):
    sample = {"__key__": "a", "png": png_bytes(0), "json": json.dumps({"caption": "caf\u00e9"}).encode("utf-16")}
    write_shard(tmp_path / "s.tar", [sample, {**sample, "__key__": "b"}])
    _, captions, _ = next(iter(build_loader(config(dataset="webdataset", data=tmp_path / "s.tar", epoch_length=2))))
    assert captions == ["caf\u00e9", "caf\u00e9"]


# ---- videos -------------------------------------------------------------------------------------------------------
def ffmpeg(*args):
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", *map(str, args)], check=True)


def counter_clip(path: Path, n: int, fps: int = 8, size: tuple[int, int] = (32, 32)) -> Path:
    """Frame k is grey level 10 * k (constant rate), for reading the frames back by their value."""
    import imageio

    h, w = size
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=10, macro_block_size=1,
                            ffmpeg_params=["-pix_fmt", "yuv444p"]) as writer:
        for k in range(n):
            writer.append_data(np.full((h, w, 3), 10 * k, np.uint8))
    return path


def frame_numbers(video: np.ndarray) -> list[int]:
    return [round(f.mean() / 10) for f in video]


def test_a_variable_frame_rate_clip_is_read_by_time(tmp_path):
    """Frames 0-7 last 1/8 s, frames 8-23 last 1/4 s: at 4 fps the frames are those showing at 0, 1/4, 1/2, ... s
    (0, 2, 4, 6, 8, 9, 10, ...), not every n-th frame by index."""
    from dataset import read_video

    cfr = counter_clip(tmp_path / "cfr.mp4", 24)
    vfr = tmp_path / "vfr.mp4"
    ffmpeg("-i", cfr, "-vf", "setpts='if(lt(N,8),N/8,1+(N-8)/4)/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
           "-pix_fmt", "yuv444p", "-qp", "0", vfr)
    video, fps = read_video(vfr, 8, 4, np.random.default_rng(0))
    numbers = frame_numbers(video)
    times = [n / 8 if n < 8 else 1 + (n - 8) / 4 for n in numbers]
    assert fps == 4 and np.allclose(np.diff(times), 0.25), numbers


@pytest.mark.parametrize("kind", ["odd size with audio", "one frame", "short"])
def test_videos_of_any_size_and_length(tmp_path, kind):
    """Odd sizes and audio tracks are read as they are; a clip shorter than --vid_size is padded with its last
    frame (a one-frame clip is that frame repeated)."""
    from dataset import read_video

    n, size = {"odd size with audio": (16, (17, 33)), "one frame": (1, (32, 32)), "short": (3, (32, 32))}[kind]
    path = counter_clip(tmp_path / "clip.mp4", n, size=size)
    if kind == "odd size with audio":
        with_audio = tmp_path / "audio.mp4"
        ffmpeg("-i", path, "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:v", "copy", "-c:a", "aac",
               "-shortest", with_audio)
        path = with_audio
    video, fps = read_video(path, 6, 8, np.random.default_rng(1))
    assert video.shape == (6, *size, 3) and fps == 8
    numbers = frame_numbers(video)
    if n < 6:
        assert numbers == list(range(n)) + [n - 1] * (6 - n)
    else:
        assert numbers == list(range(numbers[0], numbers[0] + 6))


def test_a_table_written_on_windows_names_files_with_backslashes(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "a.png")
    (tmp_path / "captions.csv").write_bytes(b"\xef\xbb\xbfFile;Caption\r\nsub\\a.png;a cat\r\n")
    assert FolderDataset(tmp_path).captions == ["a cat"]


def test_a_video_length_the_vae_cannot_make_is_refused():
    """--target_length with a 4x temporal VAE: 1 + 4k frames, or one line naming the nearest lengths."""
    from transformer_flow import Model
    from utils.config import ConfigError
    from utils.pipeline import STARFlowPipeline

    model = Model(in_channels=4, img_size=16, patch_size=1, channels=32, layers_per_block=[1, 1], num_blocks=2,
                  head_dim=16)
    args = argparse.Namespace(vid_size="9:8", vae="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    pipe = STARFlowPipeline(model, None, None, args, "cpu")
    with pytest.raises(ConfigError, match=r"--target_length 10: the VAE makes 1 \+ 4k frames .* nearest are 9 and 13"):
        pipe.video_length(10)
    assert pipe.video_length(13) == (13, 2)  # a window of the trained 3 latent frames keeps 2
    assert pipe.prepare_latents(2, 16, 16, 13, seed=0).shape == (2, 4, 4, 2, 2)


def test_a_broken_video_is_one_line_naming_it(tmp_path):
    from dataset import decode

    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"broken.mp4: not a readable video") as err:
        decode(path, True, 4, 8, np.random.default_rng(0), path)
    assert "\n" not in str(err.value)
