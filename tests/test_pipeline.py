"""The pipeline (utils.pipeline) on the bundled trained models: it gives sample.py's samples bit for bit (images,
videos, with and without guidance, image-to-video), a sample does not depend on the rest of its call, weights load
once, training previews are its output, and settings the model cannot make are one line."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sample
import train
from scripts.eval_shapes import measure_image, read_sample
from utils.config import ConfigError
from utils.media import grid_columns, save_video, tile, to_uint8
from utils.pipeline import STARFlowPipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "ckpts" / "starflow_shapes_t2i_32x32.safetensors"
VIDEO = ROOT / "ckpts" / "starflow-v_shapes_t2v_32x32.safetensors"
FIRST_FRAME = ROOT / "tests" / "data" / "cases" / "png16bit" / "circle8.png"
CAPTIONS = {"image": ["a large red circle center", "a small blue square top", "a large green triangle left"],
            "video": ["a blue square moving right", "a red circle moving down"]}


@pytest.fixture(scope="module")
def pipes():
    return {"image": STARFlowPipeline.from_pretrained(IMAGE, device="cpu"),
            "video": STARFlowPipeline.from_pretrained(VIDEO, device="cpu")}


@pytest.mark.parametrize("kind, flags, options", [
    ("image", [], {}),
    ("image", ["--cfg", "0"], {"guidance_scale": 0}),
    pytest.param("video", [], {}, marks=pytest.mark.slow),
    pytest.param("video", ["--input_image", str(FIRST_FRAME)], {"image": FIRST_FRAME}, marks=pytest.mark.slow),
    pytest.param("video", ["--target_length", "8", "--rolling_kv_cache"], {"num_frames": 8, "rolling_kv_cache": True},
                 marks=pytest.mark.slow),
], ids=["image", "image-unguided", "video", "image-to-video", "long-video-rolling-kv-cache"])
def test_pipeline_gives_sample_py_samples_bit_for_bit(tmp_path, pipes, kind, flags, options):
    checkpoint, captions = (IMAGE, CAPTIONS[kind]) if kind == "image" else (VIDEO, CAPTIONS[kind])
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    sample.main([str(a) for a in ["--checkpoint_path", checkpoint, "--caption", tmp_path / "captions.txt", "--seed",
                                  "7", "--save_folder", "1", "--save_latents", "1", "--logdir", tmp_path, *flags]])
    folder = tmp_path / checkpoint.stem / "captions"
    out = pipes[kind](captions, seed=7, **options)
    if options.get("rolling_kv_cache"):  # the flag reaches the model: the first window (4 frames) is the same,
        # later frames are not
        reencoded = pipes[kind](captions, seed=7, num_frames=8).latents
        assert torch.equal(reencoded[:, :4], out.latents[:, :4]) and not torch.allclose(reencoded, out.latents)
    for i in range(len(captions)):
        assert torch.equal(load_file(folder / f"{i:05d}.safetensors")["latents"], out.latents[i].cpu()), i
        if kind == "image":
            assert (read_sample(folder / f"{i:05d}.png") == np.asarray(out.images[i])).all(), i
        else:  # the same frames through the same encoder give the same file's frames
            ours = save_video(out.as_uint8()[i], tmp_path / f"pipe-{i}.mp4", out.fps)
            assert (read_sample(folder / f"{i:05d}.mp4") == read_sample(ours)).all(), i


def test_a_sample_does_not_depend_on_the_rest_of_its_call(pipes):
    """Sample j draws its noise from (seed, j): what else the call holds (other prompts, their number) changes
    nothing; `indices` places a sample at another index; an empty negative prompt is the default unconditional row,
    another one changes the sample."""
    pipe = pipes["image"]
    # Latents, equal to float rounding: the batch's size changes the kernels' summation order (1e-6 here), which can
    # flip a pixel's rounding at one thread; a sample drawn from other noise or guidance differs by O(1).
    latents = lambda *args, **kwargs: pipe(*args, output_type="latent", **kwargs).images
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-4)
    both = latents(["a large red circle center", "a small blue square top"], seed=3)
    assert same(latents(["a large red circle center", "a large green triangle left", "a small red circle right"],
                        seed=3)[0], both[0])
    assert same(latents("a small blue square top", seed=3, indices=[1])[0], both[1])
    alone = latents(["a large red circle center"], seed=3)
    assert same(latents(["a large red circle center"], negative_prompt="", seed=3), alone)
    assert not same(latents(["a large red circle center"], negative_prompt="a red circle", seed=3), alone)
    repeated = latents("a large red circle center", num_images_per_prompt=2, seed=3)
    assert same(repeated[0], both[0]) and not same(repeated[1], both[0])
    # one negative prompt for every prompt and image, or one per prompt: the same rows
    shared = latents(["a large red circle center", "a small blue square top"], negative_prompt="a red circle",
                     num_images_per_prompt=2, seed=3)
    each = latents(["a large red circle center", "a small blue square top"], num_images_per_prompt=2, seed=3,
                   negative_prompt=["a red circle", "a red circle"])
    assert shared.shape[0] == 4 and same(shared, each)


@pytest.mark.slow
def test_output_types_memory_options_and_one_load(pipes, monkeypatch):
    """np and pt are the pil pixels in [0, 1]; latent is what the VAE decodes; CPU offload changes nothing, VAE
    slicing a few pixels by a level (float rounding); calling twice loads nothing again; bf16 draws what fp32 draws."""
    import utils.pipeline
    from utils.model_setup import load_weights

    loads = []
    monkeypatch.setattr(utils.pipeline, "load_weights", lambda *a: loads.append(a) or load_weights(*a))
    pipe = STARFlowPipeline.from_pretrained(IMAGE, device="cpu")
    pil = pipe(CAPTIONS["image"], seed=1).as_uint8()
    as_np = pipe(CAPTIONS["image"], seed=1, output_type="np").images
    as_pt = pipe(CAPTIONS["image"], seed=1, output_type="pt").images
    latent = pipe(CAPTIONS["image"], seed=1, output_type="latent").images
    assert as_np.shape == (3, 32, 32, 3) and as_np.min() >= 0 and as_np.max() <= 1
    assert np.abs(np.round(as_np * 255) - pil).max() <= 1
    assert torch.equal(as_pt.movedim(1, -1), torch.from_numpy(as_np))
    assert latent.shape == (3, 4, 8, 8) and (to_uint8(pipe.decode(latent)) == pil).all()
    pipe.enable_model_cpu_offload()
    assert (pipe(CAPTIONS["image"], seed=1).as_uint8() == pil).all()
    pipe.enable_vae_slicing()  # the decoder's convolutions over one sample at a time: float rounding, a level at most
    sliced = pipe(CAPTIONS["image"], seed=1).as_uint8().astype(int)
    assert np.abs(sliced - pil).max() <= 1 and (sliced != pil).sum() <= 4
    assert len(loads) == 1
    half = STARFlowPipeline.from_pretrained(IMAGE, device="cpu", dtype=torch.bfloat16)  # autocast, bf16 encoders
    attributes = lambda images: [(m["color"], m["shape"], m["position"]) for m in map(measure_image, images)]
    assert attributes(half(CAPTIONS["image"], seed=1).as_uint8()) == attributes(pil)


def test_the_model_is_built_on_meta_and_materialised_from_the_checkpoint(monkeypatch):
    """Loading holds one copy of the weights: the flow is built on the meta device (no random initialisation) and
    the checkpoint's tensors, cast to fp32 one at a time, become its weights; nothing is left on meta."""
    import utils.pipeline

    built = []
    real = utils.pipeline.load_weights
    monkeypatch.setattr(utils.pipeline, "load_weights", lambda model, path: built.append(
        all(t.is_meta for t in model.state_dict().values())) or real(model, path))
    pipe = STARFlowPipeline.from_pretrained(IMAGE, device="cpu")
    assert built == [True]
    stored, loaded = load_file(IMAGE), pipe.model.state_dict()
    assert stored.keys() == loaded.keys() and {v.dtype for v in stored.values()} == {torch.float16}
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in stored.items())


def test_self_denoising_is_one_tweedie_step_before_the_decoder(pipes):
    """self_denoise "on" decodes x - noise_std^2 grad NLL(x | caption) of the flow's own samples (the Tweedie step,
    utils.inference) with whichever decoder is set; "off" decodes the samples as they are; "auto" is the official
    rule (off with a fine-tuned decoder).  The shipped image model stores "on": its default."""
    from utils.inference import flow_score_step

    pipe = pipes["image"]
    assert pipe.args.finetuned_vae not in (None, "none") and pipe.args.self_denoise == "on"
    on = pipe(CAPTIONS["image"], seed=2, output_type="pt")
    off = pipe(CAPTIONS["image"], seed=2, output_type="pt", self_denoise=False)
    assert torch.equal(pipe(CAPTIONS["image"], seed=2, output_type="pt", self_denoise="auto").images, off.images)
    y = pipe.encode_prompt(CAPTIONS["image"], None, 0, None, 8, pipe.args.noise_std)
    denoised = flow_score_step(pipe.model, on.latents, y, pipe.args.noise_std)
    assert torch.allclose(on.images, (pipe.decode(denoised).clamp(-1, 1) + 1) / 2, atol=1e-5)
    assert torch.allclose(off.images, (pipe.decode(on.latents).clamp(-1, 1) + 1) / 2, atol=1e-5)
    assert (on.images - off.images).abs().max() > 0.05  # the step does something


def test_settings_the_model_cannot_make_are_one_line(pipes):
    image, video = pipes["image"], pipes["video"]
    cases = [
        (lambda: image("a red circle", aspect_ratio="16:9"), "trained on square images only"),
        (lambda: image("a red circle", height=32, width=48), "this model makes 32x32"),
        (lambda: image("a red circle", image=FIRST_FRAME), "needs a video model"),
        (lambda: image("a red circle", output_type="jpg"), "one of pil, np, pt, latent"),
        (lambda: image("a red circle", self_denoise="yes"), "True, False or one of auto, on, off"),
        (lambda: image(["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
        (lambda: video("a blue square moving right", num_frames=8, context_length=4),
         "--context_length must be below the trained length of 4 latent frames"),
        (lambda: video("a blue square moving right", num_frames=8, target_length=12), "give one"),
        (lambda: STARFlowPipeline.from_pretrained(IMAGE, colour="red"), "unknown option(s): colour"),
        (lambda: STARFlowPipeline.from_pretrained(IMAGE, channels=64), "channels"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        STARFlowPipeline.from_pretrained("no-such.safetensors")


def test_training_preview_is_the_pipelines_output(tmp_path):
    """train.py's preview grid (captions and seed beside it) equals the pipeline's self-denoised samples of the
    exported weights (no EMA, so that the preview's weights are the exported ones)."""
    from test_train import TINY

    train.main([*TINY, "--logdir", str(tmp_path), "--max_steps", "1", "--sample_freq", "1", "--ema_decay", "0",
                "--seed", "5", "--cfg", "2"])
    preview = next((tmp_path / "samples").glob("step-*.png"))
    seed_line, *captions = preview.with_suffix(".txt").read_text().splitlines()
    assert seed_line == "seed 5" and captions
    pipe = STARFlowPipeline.from_pretrained(tmp_path / "model.safetensors", device="cpu")
    samples = pipe(captions, seed=5).as_uint8()
    assert pipe.resolve()[0] == 2  # the run's guidance scale, stored with the weights
    assert (read_sample(preview) == tile(samples, grid_columns(len(samples)))).all()
