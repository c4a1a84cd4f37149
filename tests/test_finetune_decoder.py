"""finetune_decoder.py and its losses (misc/losses.py, misc/discriminator.py) on debug-size models, CPU."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import finetune_decoder
from misc.discriminator import PatchDiscriminator, PatchDiscriminator3D
from misc.losses import (
    LPIPS,
    AutoencoderLoss,
    LeCam,
    haar3d,
    hinge_d_loss,
    hinge_g_loss,
    ihaar3d,
    l2_loss,
    wavelet_loss,
)
from utils.config import build_parser
from utils.vae import LatentVAE, setup_vae

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = ["--ae_channels", "8", "8", "8", "--ae_norm_groups", "4", "--img_size", "16"]
QUICK = ["--dataset", "shapes", "--epoch_length", "8", "--batch_size", "4", "--eval_images", "4",
         "--num_workers", "0", "--disc_channels", "8", "--warmup_steps", "0"]


def tiny_autoencoder(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """Random LPIPS weights (non-negative linear heads, as trained ones are) saved for LPIPS.from_file."""
    torch.manual_seed(0)
    model = LPIPS()
    for k in range(5):
        getattr(model, f"lin{k}").model[1].weight.data.abs_()
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


# ---- losses ---------------------------------------------------------------------------------------------------------

def test_lpips_loads_the_file_and_measures_distance(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    saved = load_file(lpips_file)
    assert set(saved) == set(lpips.state_dict())
    assert all(torch.equal(lpips.state_dict()[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # it trains the decoder through its input
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_file_with_missing_weights_names_the_path(lpips_file, tmp_path):
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(lpips_file).items() if not k.startswith("lin4")}, partial)
    with pytest.raises(ValueError, match="partial.safetensors"):
        LPIPS.from_file(partial)


def test_hinge_and_lecam_values():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1
    assert hinge_g_loss(torch.tensor([1.0, 3.0])) == -2

    lecam = LeCam(decay=0.5)
    assert lecam(torch.tensor([2.0]), torch.tensor([-1.0])) == 4 + 1  # relu(2 - 0)^2 + relu(0 - (-1))^2
    assert torch.allclose(lecam.ema_real, torch.tensor(1.0)) and torch.allclose(lecam.ema_fake, torch.tensor(-0.5))
    assert lecam(torch.tensor([-1.0]), torch.tensor([2.0])) == 0  # real below the fake EMA, fake above the real EMA


def test_haar3d_is_orthonormal_and_invertible():
    x = torch.randn(2, 3, 4, 6, 8)
    bands = haar3d(x)
    assert bands.shape == (8, 2, 3, 2, 3, 4)
    assert torch.allclose(bands.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)
    assert torch.allclose(ihaar3d(bands), x, atol=1e-5)
    constant = haar3d(torch.ones(1, 1, 2, 2, 2))  # all the energy in the low band, none in the details
    assert torch.allclose(constant[0], torch.full((1, 1, 1, 1, 1), 8 ** 0.5)) and constant[1:].abs().max() < 1e-6


def test_wavelet_loss_zero_only_for_identical_videos():
    video = torch.rand(2, 5, 3, 8, 8) * 2 - 1  # an odd frame count, as in Wan's 1 + 4k frames
    assert wavelet_loss(video, video) == 0
    other = video.clone()
    other[:, 2, :, 3, 3] += 0.5  # one pixel in one frame
    assert wavelet_loss(other, video) > 0 and torch.isfinite(wavelet_loss(other, video))


def test_generator_and_discriminator_losses_train_only_their_side():
    torch.manual_seed(0)
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    losses = AutoencoderLoss(None, disc_weight=0.1, disc_start=2, disc_channels=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = decoder(x)

    loss, parts = losses.generator_loss(x_hat, x, step=0)  # before disc_start: no GAN term
    assert "gan_g" not in parts and torch.allclose(loss, l2_loss(x_hat, x))
    loss, parts = losses.generator_loss(x_hat, x, step=2)
    assert "gan_g" in parts and torch.isfinite(loss)
    loss.backward()
    assert decoder.weight.grad is not None
    assert all(p.grad is None for p in losses.discriminator.parameters())
    assert all(p.requires_grad for p in losses.discriminator.parameters())  # unfrozen again for its own step

    decoder.zero_grad(set_to_none=True)
    loss_d, parts = losses.discriminator_loss(x_hat, x)
    loss_d.backward()
    assert torch.isfinite(loss_d) and set(parts) >= {"d_hinge", "d_lecam"}
    assert decoder.weight.grad is None
    assert all(p.grad is not None for p in losses.discriminator.parameters())


def test_video_generator_loss_has_the_wavelet_term():
    losses = AutoencoderLoss(None, disc_weight=0.1, video_disc=True, disc_channels=8)
    video = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    loss, parts = losses.generator_loss(video + 0.1, video, step=0)
    assert parts["wavelet"] > 0 and "gan_g" in parts and torch.isfinite(loss)


@pytest.mark.parametrize("norm", ["group", "spectral"])
def test_discriminator_shapes(norm):
    image, video = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 32, 32)
    disc = PatchDiscriminator(hidden=8, n_layers=3, norm=norm)
    assert disc(image).shape == (2, 1, 4, 4)
    assert disc(video).shape == (8, 1, 4, 4)  # frame by frame
    disc3d = PatchDiscriminator3D(hidden=8, n_layers=3, norm=norm)
    assert disc3d(video).shape == (2, 1, 1, 4, 4)  # time: 4 -> 4 -> 2 -> 1
    if norm == "spectral":  # no normalisation across positions: each logit sees a patch, not the whole image
        disc.eval()  # (no power iteration)
        changed = image.clone()
        changed[:, :, :4, :4] += 1
        assert torch.equal(disc(changed)[..., -1, -1], disc(image)[..., -1, -1])
        assert not torch.equal(disc(changed)[..., 0, 0], disc(image)[..., 0, 0])


# ---- finetune_decoder.py ---------------------------------------------------------------------------------------------

def test_only_the_decoder_gets_gradients():
    vae = LatentVAE(tiny_autoencoder())
    params = finetune_decoder.trainable_parameters(vae, from_scratch=False)
    names = {n for n, p in vae.vae.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("decoder.", "post_quant_conv.")) for n in names)
    assert len(params) == len(names)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    finetune_decoder.decode_with_grad(vae, z + 0.3 * torch.randn_like(z)).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in vae.vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))


def test_finetuned_decoder_round_trips_through_setup_vae(tmp_path, capsys):
    ae_dir = tmp_path / "ae"
    tiny_autoencoder().save_pretrained(ae_dir)
    before = {k: v.clone() for k, v in setup_vae(str(ae_dir)).vae.state_dict().items()}
    finetune_decoder.main(["--vae", str(ae_dir), "--logdir", str(tmp_path / "run"), "--max_steps", "2",
                           "--lr", "1e-2", "--lpips_weights", str(tmp_path / "none"), "--img_size", "16", *QUICK])
    out = capsys.readouterr().out
    path = tmp_path / "run" / "decoder.safetensors"
    assert str(path) in out.splitlines()[-1]
    saved = load_file(path)
    assert set(saved) == {k for k in before if k.startswith(("decoder.", "post_quant_conv."))}

    vae = setup_vae(str(ae_dir), finetuned=path)
    state = vae.vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert any(not torch.equal(v, before[k]) for k, v in saved.items())  # the decoder did train
    assert all(torch.equal(state[k], v) for k, v in before.items() if k.startswith(("encoder.", "quant_conv.")))
    assert (tmp_path / "run" / "recon-000.png").is_file() and (tmp_path / "run" / "recon-001.png").is_file()


def test_new_autoencoder_loads_with_setup_vae_and_has_unit_latents(tmp_path, capsys):
    logdir = tmp_path / "run"
    finetune_decoder.main(["--train_autoencoder", "1", "--logdir", str(logdir), "--max_steps", "2",
                           "--lr", "1e-3", "--lpips_weights", str(tmp_path / "none"), *TINY_AE, *QUICK])
    assert str(logdir / "vae") in capsys.readouterr().out.splitlines()[-1]
    vae = setup_vae(str(logdir / "vae"))
    assert vae.downsample_factor == 4 and vae.latent_channels == 4

    parser = build_parser(*finetune_decoder.GROUPS, defaults=finetune_decoder.DEFAULTS)
    x, held_out = finetune_decoder.held_out_batch(parser.parse_args(["--img_size", "16", "--epoch_length", "8"]), 4)
    assert held_out and x.shape == (4, 3, 16, 16)
    z = vae.encode(x, sample=False)  # the same images the scale was calibrated on
    assert z.shape == (4, 4, 4, 4)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4
    assert vae.decode(z).shape == x.shape


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("STARFLOW_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "finetune_decoder.py"), "--train_autoencoder", "1",
                           "--logdir", str(tmp_path / "run"), "--max_steps", "1", *TINY_AE, *QUICK, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_missing_lpips_weights_warn_once_and_train(tmp_path):
    result = _run(["--lpips_weights", str(tmp_path / "absent.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "LPIPS" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "absent.safetensors" in warnings[0]
    assert (tmp_path / "run" / "vae" / "config.json").is_file()


def test_corrupt_lpips_weights_are_one_error_line(tmp_path, monkeypatch):
    """`python finetune_decoder.py` (run in-process, from tmp_path) stops in one line naming the file."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STARFLOW_DEBUG", raising=False)
    code, stderr = cli_error(finetune_decoder.main, ["--train_autoencoder", "1", "--logdir", tmp_path / "run",
                                                     "--max_steps", "1", *TINY_AE, *QUICK, "--lpips_weights", corrupt])
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(corrupt) in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "vae").exists()


def test_shipped_shapes_autoencoder(tmp_path):
    """ckpts/shapes_ae: the autoencoder we trained (finetune_decoder.py --train_autoencoder 1) and its decoder
    fine-tuned on latents with noise 0.3; a broken file fails here."""
    from dataset import ShapesDataset
    from utils.vae import setup_vae

    root = Path(__file__).resolve().parents[1] / "ckpts" / "shapes_ae"
    data = ShapesDataset(8200, img_size=32)
    x = torch.stack([torch.from_numpy(data.load(i, np.random.default_rng(0))[0].copy()).permute(2, 0, 1)
                     for i in range(8192, 8200)]).float() / 127.5 - 1  # held out from training
    plain = setup_vae(str(root / "vae"))
    tuned = setup_vae(str(root / "vae"), finetuned=root / "decoder_noise0.3.safetensors")
    z = plain.encode(x, sample=False)
    assert z.shape == (8, 4, 8, 8) and abs(z.std().item() - 1) < 0.3  # normalised latents
    noisy = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    psnr = lambda a: (10 * torch.log10(4 / (a - x).pow(2).mean())).item()
    assert psnr(plain.decode(z)) > 35
    assert psnr(tuned.decode(noisy)) > psnr(plain.decode(noisy)) + 3


def test_lpips_weights_from_a_repository_folder(tmp_path):
    """A Hub name resolves to a snapshot folder; the weights file inside it is the one used."""
    from misc.losses import LPIPS

    folder = tmp_path / "lpips-repo"
    folder.mkdir()
    save_file(LPIPS().state_dict(), str(folder / "weights.safetensors"))
    assert finetune_decoder.lpips_weights_file(folder) == folder / "weights.safetensors"
    assert finetune_decoder.lpips_weights_file(tmp_path / "empty-missing") is None


def test_the_default_local_lpips_path_is_not_taken_for_a_hub_name(capsys, monkeypatch, tmp_path):
    """Without ckpts/lpips_vgg16.safetensors the warning says the file is missing; it does not suggest
    `hf download ckpts/lpips_vgg16.safetensors` (a local path read as a Hub name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    assert finetune_decoder.lpips_weights_file("ckpts/lpips_vgg16.safetensors") is None
    warning = capsys.readouterr().out
    assert "no such file" in warning and "hf download" not in warning, warning
