"""The grid tools (scripts/extract_images.py, scripts/extract_image_from_video.py) and the example launch scripts.

Grids are written by utils.media, the tools run as subprocesses, and the tiles must come back as they went in.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from utils.media import grid_columns, save_image, save_video, tile, to_uint8

ROOT = Path(__file__).resolve().parents[1]
TILE_H, TILE_W = 16, 12  # not square, so a swapped -H/-W shows
FPS = 8


def run(script, *args):
    module = f"scripts.{script.removesuffix('.py')}"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(result, *names):
    """A non-zero exit with one line on stderr that names the problem, and no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------- PNG grids

@pytest.fixture
def png_grid(tmp_path):
    """A grid of 6 random 16x12 tiles (2 rows, 3 columns) and the uint8 tiles it was made from."""
    x = torch.rand(6, 3, TILE_H, TILE_W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_image(x, tmp_path / "grid.png")
    assert read_png(path).shape == (2 * (TILE_H + 2) + 2, 3 * (TILE_W + 2) + 2, 3)
    return path, to_uint8(x)


@pytest.mark.parametrize("size", [["-H", TILE_H, "-W", TILE_W], ["--n", 6], ["-H", TILE_H, "--n", 6]],
                         ids=["tile size", "count", "height and count"])
def test_extract_images_gives_back_every_tile(png_grid, tmp_path, size):
    path, tiles = png_grid
    result = run("extract_images.py", path, *size, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "out") in result.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"grid_{i}.png" for i in range(6))
    for i in range(6):
        np.testing.assert_array_equal(read_png(tmp_path / "out" / f"grid_{i}.png"), tiles[i], err_msg=f"tile {i}")


def test_extract_images_ids_pick_tiles_and_regrid(png_grid):
    path, tiles = png_grid
    result = run("extract_images.py", path, "-H", TILE_H, "-W", TILE_W, "--ids", 4, 1)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in path.parent.iterdir())  # default --out: beside the grid
    assert written == ["grid.png", "grid_1.png", "grid_4.png", "grid_extracted.png"]
    np.testing.assert_array_equal(read_png(path.parent / "grid_4.png"), tiles[4])
    np.testing.assert_array_equal(read_png(path.parent / "grid_1.png"), tiles[1])
    extracted = read_png(path.parent / "grid_extracted.png")
    assert extracted.shape == (TILE_H + 4, 2 * (TILE_W + 2) + 2, 3)  # one row of two, in the order asked for
    np.testing.assert_array_equal(extracted, tile(tiles[[4, 1]], grid_columns(2)))


@pytest.mark.parametrize("args, names", [
    (["missing.png", "-H", TILE_H, "-W", TILE_W], ["missing.png", "no such file"]),
    (["grid.png", "-H", TILE_H + 1, "-W", TILE_W], ["-H 17", "height"]),
    (["grid.png", "-H", TILE_H, "-W", TILE_H], ["-W 16", "width"]),
    (["grid.png", "--n", 4], ["--n 4"]),
    (["grid.png", "-H", TILE_H, "-W", TILE_W, "--n", 4], ["--n 4"]),
    (["grid.png", "-H", TILE_H], ["-W", "--n"]),
    (["grid.png", "-H", TILE_H, "-W", TILE_W, "--ids", 0, 6], ["--ids 6", "6 tiles"]),
    (["grid.png", "-H", TILE_H, "-W", TILE_W, "--ids", -1], ["--ids -1"]),
], ids=["missing file", "wrong height", "wrong width", "wrong count", "size and count disagree", "no width",
        "id too large", "negative id"])
def test_extract_images_bad_input_is_one_line(png_grid, args, names):
    path, _ = png_grid
    result = run("extract_images.py", *(path.parent / a if str(a).endswith(".png") else a for a in args))
    assert_one_line_error(result, *names)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # nothing half-written


def test_extract_images_rejects_a_non_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a png")
    assert_one_line_error(run("extract_images.py", tmp_path / "notes.png", "--n", 1), "notes.png")


# ---------------------------------------------------------------- MP4 grids

def solid_video(n, frames, h, w) -> torch.Tensor:
    """(n, frames, 3, h, w) in [-1, 1]: tile i is one solid colour that brightens frame by frame."""
    base = torch.tensor([[200, 60, 60], [60, 190, 70], [70, 80, 200], [190, 180, 60]], dtype=torch.float32)[:n]
    step = torch.arange(frames, dtype=torch.float32)[:, None] * 8  # later frames are lighter: order shows
    rgb = (base[:, None] - 24 + step) / 127.5 - 1                     # (n, frames, 3)
    return rgb[..., None, None].expand(n, frames, 3, h, w).contiguous()


def assert_close_colours(frames, expected, what):
    """H.264 with yuv420p is lossy: compare the mean colour inside each tile frame, away from its edges."""
    assert len(frames) == len(expected), (what, len(frames))
    for t, (frame, want) in enumerate(zip(frames, expected)):
        got = frame[2:-2, 2:-2].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(got - want).max() < 6, (what, t, got, want)


@pytest.fixture(scope="module")
def mp4_grid(tmp_path_factory):
    """A 2x2 grid of 16x12 tiles, 5 frames at 8 fps, and the uint8 colour of each tile at each frame."""
    x = solid_video(4, 5, TILE_H, TILE_W)
    path = save_video(x, tmp_path_factory.mktemp("video") / "grid.mp4", fps=FPS)
    return path, to_uint8(x)[:, :, 0, 0]  # (4, 5, 3)


@pytest.mark.parametrize("size", [["-H", TILE_H, "-W", TILE_W], ["--n", 4]], ids=["tile size", "count"])
def test_extract_video_gives_one_mp4_per_tile(mp4_grid, tmp_path, size):
    path, colours = mp4_grid
    result = run("extract_image_from_video.py", path, *size, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"grid_{i}.mp4" for i in range(4)]
    for i in range(4):
        with imageio.get_reader(tmp_path / f"grid_{i}.mp4", "ffmpeg") as reader:
            assert reader.get_meta_data()["fps"] == FPS
            frames = list(reader.iter_data())
        assert frames[0].shape == (TILE_H, TILE_W, 3)
        assert_close_colours(frames, colours[i], f"tile {i}")


def test_extract_video_frames_of_odd_tiles(tmp_path):
    """Odd tiles make an odd grid that save_video padded by a pixel; the PNG frames must still be the tiles."""
    x = solid_video(3, 5, 9, 7)  # one row of three: 13 x 29 pixels, padded to 14 x 30
    path = save_video(x, tmp_path / "odd.mp4", fps=FPS)
    result = run("extract_image_from_video.py", path, "-H", 9, "-W", 7, "--frames", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    colours = to_uint8(x)[:, :, 0, 0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["odd_0", "odd_1", "odd_2"]
    for i in range(3):
        files = sorted((tmp_path / "out" / f"odd_{i}").iterdir())
        assert [f.name for f in files] == [f"frame_{t:06d}.png" for t in range(5)]
        frames = [read_png(f) for f in files]
        assert frames[0].shape == (9, 7, 3)
        assert_close_colours(frames, colours[i], f"tile {i}")


def test_extract_video_strips_lay_each_tiles_frames_side_by_side(mp4_grid, tmp_path):
    """--strip 2: one PNG per tile with its 5 frames in rows of 2 (the layout of a sample grid), in time order."""
    path, colours = mp4_grid
    result = run("extract_image_from_video.py", path, "--n", 4, "--strip", 2, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"grid_{i}_strip.png" for i in range(4)]
    for i in range(4):
        strip = read_png(tmp_path / f"grid_{i}_strip.png")
        assert strip.shape == (3 * (TILE_H + 2) + 2, 2 * (TILE_W + 2) + 2, 3)
        frames = [strip[2 + r * (TILE_H + 2):r * (TILE_H + 2) + TILE_H + 2, 2 + c * (TILE_W + 2):c * (TILE_W + 2) + TILE_W + 2]
                  for r, c in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]]
        assert_close_colours(frames, colours[i], f"tile {i}")


@pytest.mark.parametrize("args, names", [
    (["-H", TILE_H + 2, "-W", TILE_W], ["-H 18", "height"]),
    (["--n", 3], ["--n 3"]),
], ids=["wrong height", "wrong count"])
def test_extract_video_bad_tile_size_is_one_line(mp4_grid, tmp_path, args, names):
    path, _ = mp4_grid
    result = run("extract_image_from_video.py", path, *args, "--out", tmp_path / "out")
    assert_one_line_error(result, "grid.mp4", *names)
    assert not (tmp_path / "out").exists()


def test_extract_video_bad_file_is_one_line(tmp_path):
    assert_one_line_error(run("extract_image_from_video.py", tmp_path / "gone.mp4", "--n", 1), "gone.mp4",
                          "no such file")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert_one_line_error(run("extract_image_from_video.py", tmp_path / "broken.mp4", "--n", 1), "broken.mp4")


# ---------------------------------------------------------------- example launch scripts

CAT = "a film still of a cat playing piano"
CORGI = "a corgi dog looks at the camera"
SCRIPTS = {
    "test_sample_image.sh": ("starflow_3B_t2i_256x256.pth", 1, [
        "sample.py", "--model_config_path", "configs/starflow_3B_t2i_256x256.yaml",
        "--checkpoint_path", "ckpts/starflow_3B_t2i_256x256.pth", "--caption", CAT, "--sample_batch_size", "8",
        "--cfg", "3.6", "--aspect_ratio", "1:1", "--seed", "999", "--save_folder", "1", "--finetuned_vae", "none",
        "--jacobi", "1", "--jacobi_th", "0.001", "--jacobi_block_size", "16"]),
    "test_sample_video.sh": ("starflow-v_7B_t2v_caus_480p_v3.pth", 8, [
        "sample.py", "--model_config_path", "configs/starflow-v_7B_t2v_caus_480p.yaml",
        "--checkpoint_path", "ckpts/starflow-v_7B_t2v_caus_480p_v3.pth", "--caption", CORGI,
        "--sample_batch_size", "1", "--cfg", "3.5", "--aspect_ratio", "16:9", "--seed", "99", "--out_fps", "16",
        "--save_folder", "1", "--jacobi", "1", "--jacobi_th", "0.001", "--finetuned_vae", "none",
        "--disable_learnable_denoiser", "0", "--jacobi_block_size", "32", "--target_length", "81"]),
    "test_train_image.sh": ("starflow_3B_t2i_256x256.pth", 8, [
        "train.py", "--model_config_path", "configs/starflow_3B_t2i_256x256.yaml",
        "--resume_path", "ckpts/starflow_3B_t2i_256x256.pth", "--epochs", "10", "--batch_size", "16",
        "--epoch_length", "100000", "--dry_run", "1", "--wandb_name", "test_run"]),
    "test_train_video.sh": ("starflow-v_7B_t2v_caus_480p_v3.pth", 8, [
        "train.py", "--model_config_path", "configs/starflow-v_7B_t2v_caus_480p.yaml",
        "--resume_path", "ckpts/starflow-v_7B_t2v_caus_480p_v3.pth", "--epochs", "10", "--batch_size", "8",
        "--epoch_length", "100000", "--dry_run", "1", "--wandb_name", "test_run"]),
}


@pytest.fixture
def sandbox(tmp_path):
    """A copy of scripts/*.sh in an empty checkout, with a fake torchrun on PATH that records its arguments.

    The scripts cd to their parent folder, so they see this sandbox's (empty) ckpts/, whatever the real one holds.
    """
    (tmp_path / "scripts").mkdir()
    for name in SCRIPTS:
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$TORCHRUN_ARGS"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               TORCHRUN_ARGS=str(tmp_path / "torchrun_args"))
    env.pop("NGPUS", None)

    def launch(name, *args, **extra_env):
        result = subprocess.run(["bash", str(tmp_path / "scripts" / name), *args], capture_output=True, text=True,
                                env=dict(env, **extra_env), timeout=60)
        recorded = tmp_path / "torchrun_args"
        return result, recorded.read_text().splitlines() if recorded.exists() else None

    launch.root = tmp_path
    return launch


@pytest.mark.parametrize("name", SCRIPTS)
def test_launch_script_syntax(name):
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_launch_script_without_checkpoint_stops_with_one_line(sandbox, name):
    ckpt = SCRIPTS[name][0]
    result, torchrun_args = sandbox(name)
    assert result.returncode == 1
    assert torchrun_args is None, "launched torchrun without a checkpoint"
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"ckpts/{ckpt}" in lines[0] and "apple/starflow" in lines[0], lines[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_launch_script_passes_the_official_command(sandbox, name):
    ckpt, ngpus, command = SCRIPTS[name]
    (sandbox.root / "ckpts").mkdir()
    (sandbox.root / "ckpts" / ckpt).touch()
    result, torchrun_args = sandbox(name)
    assert result.returncode == 0, result.stderr
    assert torchrun_args == ["--standalone", "--nproc_per_node", str(ngpus), *command]
    _, torchrun_args = sandbox(name, NGPUS="2")
    assert torchrun_args[:3] == ["--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize("name", ["test_sample_image.sh", "test_sample_video.sh"])
def test_sample_scripts_pass_caption_and_input_image(sandbox, name):
    ckpt = SCRIPTS[name][0]
    (sandbox.root / "ckpts").mkdir()
    (sandbox.root / "ckpts" / ckpt).touch()
    caption = "two cats, one 'quoted' and one *starred*"
    args = [caption, "inputs/my cat.png", "161"][:3 if "video" in name else 2]
    result, torchrun_args = sandbox(name, *args)
    assert result.returncode == 0, result.stderr
    assert torchrun_args[torchrun_args.index("--caption") + 1] == caption
    assert torchrun_args[torchrun_args.index("--input_image") + 1] == "inputs/my cat.png"
    if "video" in name:
        assert torchrun_args[torchrun_args.index("--target_length") + 1] == "161"


@pytest.mark.parametrize("name", ["test_train_image.sh", "test_train_video.sh"])
def test_train_scripts_pass_epochs_batch_and_config(sandbox, name):
    ckpt = SCRIPTS[name][0]
    (sandbox.root / "ckpts").mkdir()
    (sandbox.root / "ckpts" / ckpt).touch()
    result, torchrun_args = sandbox(name, "3", "4", "configs/my config.yaml")
    assert result.returncode == 0, result.stderr
    assert torchrun_args[torchrun_args.index("--epochs") + 1] == "3"
    assert torchrun_args[torchrun_args.index("--batch_size") + 1] == "4"
    assert torchrun_args[torchrun_args.index("--model_config_path") + 1] == "configs/my config.yaml"
