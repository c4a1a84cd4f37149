"""LatentVAE on tiny random diffusers autoencoders, saved to disk and loaded through setup_vae like real names: latent
layouts, the official normalisations, the Wan2.2 temporal scale and noise, and strict loading of fine-tuned decoders."""
import re
import time

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import save_file

import utils.vae
from utils.hub import PretrainedNotFound
from utils.vae import setup_vae

KL = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
          block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.18215)
# Statistics far from (0, 1) so that a normalisation applied wrongly, or to the wrong tensor, shows.
WAN22 = dict(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
             temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
             scale_factor_temporal=4, in_channels=12, out_channels=12,
             latents_mean=[-0.6, 0.3, 1.2, -1.5, 0.05, 0.8, -0.2, 2.0],
             latents_std=[0.4, 2.5, 0.7, 3.0, 1.6, 0.5, 2.2, 0.3])
WAN21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, latents_mean=[0.7, -1.1, 0.2, 1.9],
             latents_std=[2.0, 0.4, 3.1, 0.6])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directories holding the tiny VAEs in the layouts of real repositories."""
    root = tmp_path_factory.mktemp("vaes")
    torch.manual_seed(0)
    dirs = {"kl": root / "sd:vae",  # a ':' not followed by a number is part of the path, not a scale suffix
            "kl_shift": root / "flux-vae", "wan22": root / "wan22-pipe", "wan21": root / "wan21"}
    AutoencoderKL(**KL).save_pretrained(dirs["kl"])
    AutoencoderKL(**KL, shift_factor=0.1159).save_pretrained(dirs["kl_shift"])
    AutoencoderKLWan(**WAN22).save_pretrained(dirs["wan22"] / "vae")  # a pipeline keeps its VAE under vae/
    AutoencoderKLWan(**WAN21).save_pretrained(dirs["wan21"])
    return {k: str(v) for k, v in dirs.items()}


def pixels(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def per_channel(values):
    return torch.tensor(values).view(-1, 1, 1)  # broadcasts over (B, t, c, h, w)


def raw_posterior(vae, x):
    """The diffusers posterior of x, as (mean, std) in our layout (B, [t,] c, h, w)."""
    if not vae.is_video:
        posterior = vae.vae.encode(x).latent_dist
        return posterior.mean, posterior.std
    posterior = vae.vae.encode(x.transpose(1, 2)).latent_dist
    return posterior.mean.transpose(1, 2), posterior.std.transpose(1, 2)


def raw_decode(vae, latents):
    if not vae.is_video:
        return vae.vae.decode(latents).sample
    return vae.vae.decode(latents.transpose(1, 2)).sample.transpose(1, 2)


@pytest.mark.parametrize("key,factor,temporal,channels", [("kl", 2, 1, 4), ("wan22", 16, 4, 8), ("wan21", 8, 4, 4)])
def test_latent_shapes(saved, key, factor, temporal, channels):
    vae = setup_vae(saved[key])
    assert (vae.downsample_factor, vae.temporal_downsample_factor, vae.latent_channels) == (factor, temporal, channels)
    assert vae.is_video == (key != "kl")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    image, video = pixels(2, 3, 32, 32), pixels(2, 9, 3, 32, 32)
    h = 32 // factor
    z_image, z_video = vae.encode(image, sample=False), vae.encode(video, sample=False)
    assert z_image.shape == (2, channels, h, h) and z_image.dtype == torch.float32
    assert z_video.shape == (2, 1 + (9 - 1) // temporal, channels, h, h)
    assert vae.decode(z_image).shape == image.shape and vae.decode(z_video).shape == video.shape
    if vae.is_video:  # an image is a one-frame video
        torch.testing.assert_close(z_image, vae.encode(image.unsqueeze(1), sample=False)[:, 0])
    else:  # an image VAE encodes a video frame by frame
        torch.testing.assert_close(z_video[:, 4], vae.encode(video[:, 4], sample=False))


@pytest.mark.parametrize("key", ["kl", "kl_shift", "wan22", "wan21"])
def test_normalisation_of_the_posterior_mean_round_trips(saved, key):
    vae = setup_vae(saved[key])
    x = pixels(2, 3, 32, 32) if key.startswith("kl") else pixels(1, 5, 3, 32, 32)
    mean, _ = raw_posterior(vae, x)
    if vae.is_video:
        config = WAN22 if key == "wan22" else WAN21
        expected = (mean - per_channel(config["latents_mean"])) / per_channel(config["latents_std"])
    else:
        expected = (mean - (0.1159 if key == "kl_shift" else 0.0)) * KL["scaling_factor"]
    z = vae.encode(x, sample=False)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(vae.decode(z), raw_decode(vae, mean))


@pytest.mark.parametrize("key", ["kl", "wan22", "wan21"])
def test_posterior_noise_has_the_official_scale(saved, key):
    vae = setup_vae(saved[key])
    x = pixels(4, 3, 32, 32) if key == "kl" else pixels(1, 9, 3, 64, 64)
    _, std = raw_posterior(vae, x)
    if key == "kl":
        std = std * KL["scaling_factor"]
    elif key == "wan21":  # Wan2.1 normalises the whole sample
        std = std / per_channel(WAN21["latents_std"])
    # Wan2.2 adds the posterior noise unnormalised (the official convention), so std stays as it is.
    eps = (vae.encode(x) - vae.encode(x, sample=False)) / std
    assert eps.numel() >= 300 and abs(eps.mean()) < 0.2 and 0.85 < eps.std() < 1.15


def test_temporal_scale_suffix(saved):
    vae, scaled = setup_vae(saved["wan22"]), setup_vae(saved["wan22"] + ":0.6")
    assert scaled.temporal_scale == 0.6
    x = pixels(1, 9, 3, 32, 32)
    z, z_scaled = vae.encode(x, sample=False), scaled.encode(x, sample=False)
    torch.testing.assert_close(z_scaled[:, :1], z[:, :1])  # the first frame is left alone
    torch.testing.assert_close(z_scaled[:, 1:], 0.6 * z[:, 1:])
    kept = z_scaled.clone()
    torch.testing.assert_close(scaled.decode(z_scaled), vae.decode(z))
    assert torch.equal(z_scaled, kept)  # decode undoes the scale on a copy


def test_scale_suffix_is_only_for_video_vaes(saved):
    with pytest.raises(ValueError, match="only applies to video"):
        setup_vae(saved["kl"] + ":0.6")


def decoder_state(vae, prefix=""):
    """A perturbed copy of the decoder-side weights, as a fine-tuning run would save them."""
    return {prefix + k: v + 0.05 * torch.randn_like(v) for k, v in vae.vae.state_dict().items()
            if k.startswith(("decoder.", "post_quant_conv."))}


@pytest.mark.parametrize("suffix,prefix", [(".safetensors", ""), (".pth", ""), (".safetensors", "vae.")])
def test_finetuned_decoder_weights_load(saved, tmp_path, suffix, prefix):
    base = setup_vae(saved["kl"])
    state = decoder_state(base, prefix)
    path = tmp_path / f"decoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = setup_vae(saved["kl"], finetuned=str(path)).vae.state_dict()
    for k, v in base.vae.state_dict().items():
        torch.testing.assert_close(loaded[k], state.get(prefix + k, v), rtol=0, atol=0)
    assert any(k.startswith("encoder.") for k in loaded)  # the encoder was compared against the untouched base


def test_finetuned_none_changes_nothing(saved):
    base, none = setup_vae(saved["kl"]).vae.state_dict(), setup_vae(saved["kl"], finetuned="none").vae.state_dict()
    assert all(torch.equal(v, none[k]) for k, v in base.items())


@pytest.mark.parametrize("bad", ["unknown", "shape"])
def test_finetuned_weights_that_do_not_fit_are_rejected_untouched(saved, tmp_path, bad):
    vae = setup_vae(saved["kl"])
    before = {k: v.clone() for k, v in vae.vae.state_dict().items()}
    state = decoder_state(vae)  # valid keys too, so a partial load would show
    if bad == "unknown":
        key, state["decoder.extra.weight"] = "decoder.extra.weight", torch.zeros(3)
    else:
        key, state["decoder.conv_in.weight"] = "decoder.conv_in.weight", torch.zeros(1, 2, 3)
    path = tmp_path / "decoder.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=re.escape(key)):
        vae.load_finetuned(path)
    assert all(torch.equal(v, before[k]) for k, v in vae.vae.state_dict().items())
    with pytest.raises(ValueError, match=re.escape(key)):
        setup_vae(saved["kl"], finetuned=str(path))


def test_finetuned_file_missing_or_corrupt(saved, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        setup_vae(saved["kl"], finetuned=str(missing))
    for name in ("corrupt.safetensors", "corrupt.pth"):
        path = tmp_path / name
        path.write_bytes(b"\x00not a checkpoint" * 10)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            setup_vae(saved["kl"], finetuned=str(path))


def test_reduced_precision_returns_fp32(saved):
    vae = setup_vae(saved["kl"], dtype=torch.bfloat16)
    assert next(vae.vae.parameters()).dtype == torch.bfloat16
    x = pixels(1, 3, 32, 32).requires_grad_()
    z = vae.encode(x)
    assert z.dtype == torch.float32 and not z.requires_grad and vae.decode(z).dtype == torch.float32


def test_unsupported_or_missing_config(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        setup_vae(str(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="no config.json"):
        setup_vae(str(tmp_path))


def test_unknown_hub_name_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an unreachable Hub looks like, on any machine
    start = time.time()
    with pytest.raises(PretrainedNotFound, match="'starflow-tests/no-such-vae' is not available offline"):
        setup_vae("starflow-tests/no-such-vae:0.6")
    assert time.time() - start < 3


def test_downloads_only_the_vae_files(monkeypatch):
    asked = {}

    def fake_resolve(name, what, allow_patterns=None):
        asked.update(name=name, patterns=allow_patterns)
        raise PretrainedNotFound("stop here")

    monkeypatch.setattr(utils.vae, "resolve_pretrained", fake_resolve)
    with pytest.raises(PretrainedNotFound):
        setup_vae("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6")
    assert asked["name"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    pipeline = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors", "tokenizer/tokenizer.json"]
    vae_repo = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "README.md"]
    assert set(filter_repo_objects(pipeline, allow_patterns=asked["patterns"])) == set(pipeline[1:3])
    assert set(filter_repo_objects(vae_repo, allow_patterns=asked["patterns"])) == set(vae_repo[:2])
