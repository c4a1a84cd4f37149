"""STARFlow-V end to end through a Wan2.2-layout VAE (16x spatial, 4x temporal, the official ':scale' suffix): train.py
with the official video flags, then sample.py writes MP4s with the pixel frame count."""

import imageio.v3 as iio
import numpy as np
import torch
from conftest import in_process

import sample
import train


def test_wan22_video_trains_and_samples(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae_dir = tmp_path / "tiny-wan" / "vae"  # the pipeline layout of Wan-AI/Wan2.2-TI2V-5B-Diffusers
    AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                     temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                     scale_factor_temporal=4, in_channels=12, out_channels=12, latents_mean=[0.1] * 8,
                     latents_std=[0.5] * 8).save_pretrained(vae_dir)
    model = ["--vae", f"{vae_dir.parent}:0.6", "--channel_size", "8", "--img_size", "32", "--vid_size", "9:8",
             "--fps_cond", "1", "--cond_noise_level", "1", "--noise_std", "0.5", "--patch_size", "1",
             "--channels", "32", "--head_dim", "32", "--layers_per_block", "1", "1", "--sos", "1", "--seq_order", "L2R",
             "--use_softplus", "1", "--cond_top_only", "1", "--temporal_causal", "2", "--shallow_block_local", "1",
             "--learnable_self_denoiser", "1", "--conditional_denoiser", "1", "--denoiser_window", "2",
             "--text", "sentence-transformers/all-MiniLM-L6-v2", "--txt_size", "8"]
    out = in_process(train.main, ["--dataset", "shapes", *model, "--batch_size", "2", "--epoch_length", "4",
                                  "--max_steps", "2", "--num_workers", "0", "--sample_freq", "1", "--drop_image", "0.5",
                                  "--logdir", tmp_path / "run"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "run" / "samples").glob("*.mp4"))  # training-time samples, decoded by the VAE
    out = in_process(sample.main, ["--checkpoint_path", tmp_path / "run" / "model.safetensors", "--caption",
                                   "a red circle moving right", "--sample_batch_size", "1", "--out_fps", "8",
                                   "--logdir", tmp_path / "samples"])
    assert out.returncode == 0, out.stderr[-3000:]
    frames = np.stack(list(iio.imiter(next((tmp_path / "samples" / "model").glob("*.mp4")), plugin="FFMPEG")))
    assert frames.shape == (9, 36, 36, 3)  # 3 latent frames -> 9 pixel frames; a one-tile grid with its 2-px border
