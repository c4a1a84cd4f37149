"""Debug-size model configurations shared by the tests."""
import pytest
import torch

from transformer_flow import Model
from utils.debug import randomize_weights

# Shaped like the official 3B text-to-image model: cond_top_only, SOS, softplus, final norm, soft clip, L2R.
IMAGE = dict(in_channels=4, img_size=8, patch_size=1, channels=64, num_blocks=3, layers_per_block=[1, 1, 2],
             head_dim=32, rope=1, sos=1, txt_size=6, txt_dim=16, cond_top_only=1, use_softplus=1, use_final_norm=1,
             soft_clip=4.0, seq_order="L2R")
# Shaped like the official 7B text-to-video model: a wider deep block, temporal causality, frame-local shallow
# blocks and a conditional learnable denoiser with a window.
VIDEO = dict(IMAGE, img_size=4, top_block_channels=96, temporal_causal=2, shallow_block_local=1,
             learnable_self_denoiser=1, conditional_denoiser=1, denoiser_window=2)


def tiny_model(seed=0, **kwargs) -> Model:
    torch.manual_seed(seed)
    return randomize_weights(Model(**kwargs), seed, scale=0.5).eval()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
