"""scripts/likelihood.py and scripts/edit.py on the bundled image model: exact NLL equal to the training loss,
deterministic whatever the batch, per-token maps that add up to it, zero-shot ranking, files written, one-line
errors; inversion exact and colour edits that keep the rest."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

from dataset import render_shape
from scripts import likelihood

IMAGE_CKPT = "ckpts/starflow_shapes_t2i_32x32.safetensors"
SHAPES = [dict(color="red", shape="circle", size="large", position="left"),
          dict(color="blue", shape="square", size="small", position="right"),
          dict(color="yellow", shape="triangle", size="large", position="top")]
CAPTIONS = ["a large red circle on the left", "a small blue square on the right", "a large yellow triangle at the top"]


@pytest.fixture(scope="module")
def pipe():
    from utils.pipeline import STARFlowPipeline

    return STARFlowPipeline.from_pretrained(IMAGE_CKPT, device="cpu")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, attrs in enumerate(SHAPES):
        Image.fromarray(render_shape(**attrs)).save(folder / f"{i}.png")
    return folder


def test_nll_is_the_training_loss_and_does_not_depend_on_the_batch(pipe, images):
    scorer = likelihood.Scorer(pipe, draws=2, seed=3)
    files = sorted(images.glob("*.png"))
    pixels, _ = likelihood.load_pixels(files, pipe, np.random.default_rng(0))
    x = scorer.latents(pixels, [0, 1, 2])
    result = scorer.score(x, CAPTIONS, tokens=True)
    (_, _), ratio = pipe.image_size()
    _, fps, noise_std = pipe.resolve()
    y = pipe.encode_prompt(CAPTIONS, None, 0.0, ratio, fps, noise_std)
    losses = []
    for draw in x:  # Model.get_loss: per-dimension NLL without the Gaussian constant, averaged over the batch
        with torch.no_grad():
            z, _, _, logdets = pipe.model(draw, y)
        losses.append(pipe.model.get_loss(z, logdets)["loss"].item())
    per_dim = result["bits_per_dim"] * math.log(2) - 0.5 * math.log(2 * math.pi)
    assert per_dim.mean().item() == pytest.approx(np.mean(losses), abs=1e-5)
    assert torch.allclose(result["nll"], result["prior"] + result["blocks"].sum(1))
    assert torch.allclose(result["tokens"].flatten(1).sum(1), result["nll"], rtol=1e-5)  # the heatmap adds up
    # the same numbers one input at a time, with other inputs beside them, and again
    records = [likelihood.score_files(scorer, files, [0, 1, 2], CAPTIONS, None, batch, None, False)
               for batch in (3, 1, 3)]
    assert records[0] == records[2]
    for a, b in zip(records[0], records[1]):
        assert a["bits_per_dim"] == pytest.approx(b["bits_per_dim"], abs=1e-5)
    # the right caption explains an image better than another's
    crossed = scorer.score(x, CAPTIONS[1:] + CAPTIONS[:1])["bits_per_dim"]
    assert (result["bits_per_dim"] < crossed).all()


def test_cli_ranks_candidates_and_writes_scores_and_heatmaps(images, tmp_path):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(reversed(CAPTIONS)) + "\n")
    out, maps = tmp_path / "scores.jsonl", tmp_path / "maps"
    likelihood.main(["--checkpoint", IMAGE_CKPT, "--inputs", str(images), "--candidates", str(candidates),
                     "--draws", "1", "--heatmaps", str(maps), "--output", str(out), "--device", "cpu"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["best"] for r in records] == CAPTIONS
    assert all(len(r["blocks_nats"]) == 3 and r["draws"] == 1 for r in records)
    picture = Image.open(records[0]["heatmap"])
    assert picture.size == ((2 * 32 + 2) * 8, 32 * 8)  # the input beside its map, 8x
    left = np.asarray(picture)[:, : 32 * 8]
    assert (np.abs(left[::8, ::8].astype(int) - render_shape(**SHAPES[0])).max()) <= 1  # the input as scored


def test_bad_input_is_one_line(images, tmp_path):
    base = ["--checkpoint", IMAGE_CKPT, "--device", "cpu"]
    code, err = cli_error(likelihood.main, base + ["--inputs", str(tmp_path / "missing.png")])
    assert code == 2 and err.strip() == f"error: --inputs {tmp_path / 'missing.png'}: no such file or folder"
    captions = tmp_path / "two.txt"
    captions.write_text("a\nb\n")
    code, err = cli_error(likelihood.main, base + ["--inputs", str(images), "--captions", str(captions)])
    last = err.strip().splitlines()[-1]  # (after the text encoder's loading bar)
    assert code == 2 and last == f"error: --captions {captions}: 2 captions for 3 inputs" and "Traceback" not in err
    code, err = cli_error(likelihood.main, base + ["--inputs", str(images), "--draws", "0"])
    assert code == 2 and err.strip().splitlines()[-1] == "error: --draws 0: must be at least 1"


@pytest.mark.slow
def test_in_distribution_scores_lower_and_zero_shot_classification(pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = likelihood.shapes_eval(likelihood.Scorer(pipe, draws=1), 9, tmp_path / "eval", 9)
    below = int(report.split("below the OOD median: ")[1].split("/")[0])
    right = int(report.split("grammar captions): ")[1].split("/")[0])
    assert below == 9 and right >= 8, report


def test_inversion_is_exact_and_a_colour_edit_keeps_the_rest(pipe, images, tmp_path):
    """Editing (scripts/edit.py, STARFlowPipeline.invert): z of a real image decodes back to its latents exactly
    under the same caption; under a caption with another colour the shape and position stay."""
    from scripts import edit
    from scripts.eval_shapes import measure_image

    files = sorted(images.glob("*.png"))
    z = pipe.invert(files, CAPTIONS)
    back = pipe(CAPTIONS, latents=z, guidance_scale=0, jacobi=False, output_type="latent").latents
    pixels = torch.stack([likelihood.load_pixels([f], pipe, np.random.default_rng(0))[0][0] for f in files])
    with torch.no_grad():
        mean = pipe.vae.encode(pixels, sample=False)
    assert ((back - mean).norm() / mean.norm()).item() < 1e-4  # the flow's inverse, up to float rounding
    same = pipe.edit(files, CAPTIONS, CAPTIONS).as_uint8()
    assert min(edit.psnr(a, render_shape(**s)) for a, s in zip(same, SHAPES)) > 30
    targets = [c.replace("red", "green").replace("blue", "purple").replace("yellow", "orange") for c in CAPTIONS]
    for pixels, attrs, color in zip(pipe.edit(files, CAPTIONS, targets).as_uint8(), SHAPES, ("green", "purple", "orange")):
        found = measure_image(pixels)
        assert (found["color"], found["shape"], found["position"]) == (color, attrs["shape"], attrs["position"])
    code, err = cli_error(edit.main, ["--checkpoint", IMAGE_CKPT, "--input_image", str(tmp_path / "no.png"),
                                      "--source_caption", "a", "--caption", "b"])
    assert code == 2 and err.strip() == f"error: --input_image {tmp_path / 'no.png'}: no such file"
    code, err = cli_error(edit.main, ["--checkpoint", IMAGE_CKPT, "--shapes_eval", "3", "--strength", "2"])
    assert code == 2 and err.strip() == "error: --strength 2.0: must be in [0, 1]"


def test_inpainting_regenerates_the_mask_and_keeps_the_rest(pipe, images, tmp_path):
    """scripts/edit.py --mask: fresh noise at the latent tokens under the mask, the new caption drawn there, every
    pixel outside the mask the input's."""
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[4:28, 0:22] = 255  # the left part, where the red circle is
    Image.fromarray(mask).save(tmp_path / "mask.png")
    from scripts import edit

    edit.main(["--checkpoint", IMAGE_CKPT, "--input_image", str(images / "0.png"), "--source_caption", CAPTIONS[0],
               "--mask", str(tmp_path / "mask.png"), "--caption", "a large green triangle on the left",
               "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    from scripts.eval_shapes import measure_image

    painted = np.asarray(Image.open(tmp_path / "out" / "0-edit-0.png"))
    found = measure_image(painted)
    assert (found["color"], found["shape"], found["position"]) == ("green", "triangle", "left")
    outside = mask[..., 0] == 0
    assert (painted[outside] == render_shape(**SHAPES[0])[outside]).all()


def test_torchrun_splits_the_inputs_and_gives_one_processs_numbers(images, tmp_path):
    """scripts/likelihood.py under torchrun (2 processes on gloo): each scores its share of the inputs, and the
    JSONL has one process's lines in the inputs' order, with its numbers (each input's noise is its own)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = ["-m", "scripts.likelihood", "--checkpoint", IMAGE_CKPT, "--inputs", str(images), "--caption",
            CAPTIONS[0], "--draws", "1", "--device", "cpu", "--output"]
    for launcher, name in (([], "one.jsonl"), (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                "2"], "two.jsonl")):
        done = subprocess.run([sys.executable, *launcher, *argv, str(tmp_path / name)], cwd=root,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                for name in ("one.jsonl", "two.jsonl"))
    assert [r["input"] for r in two] == [str(images / f"{i}.png") for i in range(3)] == [r["input"] for r in one]
    for a, b in zip(one, two):
        assert b["bits_per_dim"] == pytest.approx(a["bits_per_dim"], rel=1e-6)


def box_mask(pixels: np.ndarray, margin: int = 3) -> np.ndarray:
    """(H, W) bool: the box around the shape's ink plus a margin."""
    ink = pixels.min(-1) < 200
    rows, columns = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    mask = np.zeros(pixels.shape[:2], bool)
    mask[max(rows[0] - margin, 0):rows[-1] + margin + 1, max(columns[0] - margin, 0):columns[-1] + margin + 1] = True
    return mask


def test_sample_py_inpaints_an_image(images, tmp_path):
    """sample.py --input_image --mask with an image model: the picture inverted under the caption, the tokens
    under the mask drawn anew; the masked box repainted as the caption says, every pixel outside kept."""
    import sample
    from scripts.eval_shapes import measure_image

    picture = render_shape(**SHAPES[0])
    mask = box_mask(picture)
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "caption.txt").write_text("a large green triangle on the left\n")
    sample.main(["--checkpoint_path", IMAGE_CKPT, "--input_image", str(images / "0.png"), "--mask",
                 str(tmp_path / "mask.png"), "--caption", str(tmp_path / "caption.txt"), "--save_folder", "1",
                 "--logdir", str(tmp_path / "logs"), "--device", "cpu"])
    (out,) = (tmp_path / "logs").rglob("*.png")
    painted = np.asarray(Image.open(out).convert("RGB"))
    found = measure_image(painted)
    assert (found["color"], found["shape"], found["position"]) == ("green", "triangle", "left")
    assert (painted[~mask] == picture[~mask]).all()
    image, mask, missing = str(images / "0.png"), str(tmp_path / "mask.png"), str(tmp_path / "no.png")
    for argv, message in ((["--mask", mask], "--mask needs --input_image (the picture to inpaint)"),
                          (["--input_image", image, "--mask", missing], f"--mask {missing}: no such file"),
                          (["--input_image", image], "--input_image needs a video model (--vid_size) or --mask "
                                                     "(inpainting)")):
        code, err = cli_error(sample.main, ["--checkpoint_path", IMAGE_CKPT, "--caption", "a red circle", *argv])
        assert code == 2 and err.strip() == f"error: {message}", err


def test_a_videos_first_frame_is_edited_and_inpainted_and_the_video_follows(tmp_path):
    """Video models (STARFlowPipeline.edit): the picture is the first frame; its z alone is inverted (the deep
    block is causal in time, the shallow blocks frame-local), so under its own caption the first frame comes back,
    under another colour the video keeps shape and motion; inpainting keeps the first frame outside the mask and
    the video moves the new shape the caption's way (also through sample.py --mask, as an MP4)."""
    import sample
    from scripts.edit import psnr
    from scripts.eval_shapes import measure_video, read_sample
    from utils.pipeline import STARFlowPipeline

    video = STARFlowPipeline.from_pretrained("ckpts/starflow-v_shapes_t2v_32x32.safetensors", device="cpu")
    video.set_progress_bar_config(disable=True)
    attrs = dict(color="red", shape="circle", size="large", direction="right", offset=(0.5, 0.5))
    first = render_shape(**attrs, frames=4)[0]
    Image.fromarray(first).save(tmp_path / "first.png")
    source = "a red circle moving right"
    z = video.invert(first, source)
    x = video.encode(torch.from_numpy(first).permute(2, 0, 1)[None].float() / 127.5 - 1)[:, None]
    with torch.no_grad():
        assert torch.allclose(video.model(torch.cat([x, x], 1), video.encode_prompt(
            [source], None, 0.0, None, *video.resolve(0.0)[1:]))[0][:, :1], z, atol=1e-5)  # frame 0 alone
    same, blue = video.edit([first, first], source, [source, "a blue circle moving right"]).as_uint8()
    assert same.shape == (4, 32, 32, 3) and psnr(same[0], first) > 30
    assert measure_video(blue) == dict(color="blue", shape="circle", direction="right")
    mask = box_mask(first)
    painted = video.edit(first, source, "a green square moving right", 1.0, 3.0, mask=mask).as_uint8()[0]
    assert (painted[0][~mask] == first[~mask]).all()
    assert measure_video(painted) == dict(color="green", shape="square", direction="right")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "caption.txt").write_text("a green square moving right\n")
    sample.main(["--checkpoint_path", "ckpts/starflow-v_shapes_t2v_32x32.safetensors", "--input_image",
                 str(tmp_path / "first.png"), "--mask", str(tmp_path / "mask.png"), "--caption",
                 str(tmp_path / "caption.txt"), "--save_folder", "1", "--logdir", str(tmp_path / "logs"),
                 "--device", "cpu"])
    (out,) = (tmp_path / "logs").rglob("*.mp4")
    assert measure_video(read_sample(out)) == dict(color="green", shape="square", direction="right")


def test_shard_samples_are_scored_under_their_own_captions(pipe, images, tmp_path):
    """WebDataset shards as inputs: each sample under its .txt caption, with the same numbers as its picture scored
    as a file under that caption and the same noise draws."""
    import io
    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, caption in enumerate(CAPTIONS[:2]):
            for name, data in ((f"s{i}.png", (images / f"{i}.png").read_bytes()), (f"s{i}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shard.jsonl"
    likelihood.main(["--checkpoint", IMAGE_CKPT, "--inputs", str(shard), "--draws", "1", "--output", str(out),
                     "--device", "cpu"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["input"], r["caption"]) for r in records] == [(f"{shard}:s0", CAPTIONS[0]), (f"{shard}:s1", CAPTIONS[1])]
    samples = likelihood.read_shard(shard, video=False)
    files = [images / "0.png", images / "1.png"]
    again = likelihood.score_files(likelihood.Scorer(pipe, draws=1), files, [likelihood.noise_id(x) for x in samples],
                                   CAPTIONS[:2], None, 16, None, False)
    assert [r["bits_per_dim"] for r in records] == [r["bits_per_dim"] for r in again]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar file")
    code, err = cli_error(likelihood.main, ["--checkpoint", IMAGE_CKPT, "--inputs", str(broken), "--device", "cpu"])
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: --inputs {broken}: not a readable tar shard")


def test_video_token_maps_add_up_to_the_nll(tmp_path):
    """A video model's per-token map (frame-local shallow blocks brought back per frame, the deep block over the
    clip) sums to its NLL, and its heatmap shows the frames above their maps."""
    from utils.pipeline import STARFlowPipeline

    pipe = STARFlowPipeline.from_pretrained("ckpts/starflow-v_shapes_t2v_32x32.safetensors", device="cpu")
    video = render_shape("green", "circle", "small", direction="right", frames=pipe.trained_frames)
    pixels = torch.from_numpy(video).permute(0, 3, 1, 2).float()[None] / 127.5 - 1  # (1, T, 3, H, W)
    scorer = likelihood.Scorer(pipe, draws=1)
    result = scorer.score(scorer.latents(pixels, [0]), ["a green circle moving right"], tokens=True)
    assert result["tokens"].shape == (1, pipe.trained_frames, 8, 8)
    assert torch.allclose(result["tokens"].flatten(1).sum(1), result["nll"], rtol=1e-5)
    likelihood.heatmap_png(video, result["tokens"][0].numpy(), tmp_path / "v.png", 0.0, 10.0)
    assert Image.open(tmp_path / "v.png").size == ((4 * 34 - 2) * 8, 66 * 8)
