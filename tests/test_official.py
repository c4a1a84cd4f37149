"""Drop-in compatibility with the official release: parameter names and shapes of both official checkpoints, and
strict loading of official state dicts (dead buffers dropped by name, anything else reported)."""
import json
from pathlib import Path

import pytest
import torch
from conftest import IMAGE, tiny_model

from transformer_flow import OFFICIAL_DEAD_BUFFERS, Model, load_official_state_dict

DATA = Path(__file__).parent / "data"
OFFICIAL = {  # the official YAML configurations as the official setup_transformer passes them to Model
    "starflow_3B_t2i_256x256": dict(
        in_channels=4, img_size=32, patch_size=1, channels=3072, num_blocks=6, layers_per_block=[2, 2, 2, 2, 2, 24],
        rope=1, pt_seq_len=None, head_dim=64, num_heads=None, num_kv_heads=None, use_swiglu=0, use_bias=1,
        use_qk_norm=0, use_post_norm=0, norm_type="layer_norm", txt_size=128, txt_dim=2048, sos=1, cond_top_only=1,
        use_softplus=1, use_pretrained_lm=None, use_mm_attn=0, use_final_norm=1, soft_clip=4.0, seq_order="L2R",
        learnable_self_denoiser=0, conditional_denoiser=0, noise_embed_denoiser=0, temporal_causal=0,
        shallow_block_local=0, denoiser_window=None, local_attn_window=None, top_block_channels=None),
}
OFFICIAL["starflow-v_7B_t2v_caus_480p"] = dict(
    OFFICIAL["starflow_3B_t2i_256x256"], in_channels=48, img_size=40, pt_seq_len=32, txt_size=256,
    top_block_channels=4096, learnable_self_denoiser=1, conditional_denoiser=1, temporal_causal=2,
    shallow_block_local=1, denoiser_window=10, use_checkpoint=1, use_checkpoint_mlp=1)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameters_match_official_manifest(name):
    manifest = json.loads((DATA / f"{name}.manifest.json").read_text())
    with torch.device("meta"):
        model = Model(**OFFICIAL[name])
    ours = {k: list(p.shape) for k, p in model.named_parameters()}
    assert ours == manifest["parameters"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert not list(model.buffers())  # the official buffers are dead weight; all are dropped by the loader
    dead = lambda k: k in OFFICIAL_DEAD_BUFFERS or k.endswith(".attn_mask")
    assert all(dead(k) for k in manifest["buffers"])


def official_style_state_dict(model):
    """Our weights laid out as an official checkpoint: plus the dead buffers, with RoPE's two sharing one tensor."""
    sd = dict(model.state_dict())
    rope = torch.zeros(8, 32)
    sd.update({"var": torch.ones(64, 4), "feat_rope.freqs_cos": rope, "feat_rope.freqs_sin": rope})
    sd.update({f"blocks.{i}.attn_mask": torch.ones(70, 70).tril() for i in range(len(model.blocks))})
    return sd


def test_official_state_dict_loads_strictly():
    source, target = tiny_model(seed=1, **IMAGE), Model(**IMAGE)
    load_official_state_dict(target, official_style_state_dict(source))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("blocks.2.proj_txt.weight"), "missing: blocks.2.proj_txt.weight"),
    (lambda sd: sd.__setitem__("blocks.9.proj_in.weight", torch.zeros(1)), "unexpected: blocks.9.proj_in.weight"),
    (lambda sd: sd.__setitem__("blocks.0.proj_in.weight", torch.zeros(64, 5)), r"shape of blocks.0.proj_in.weight"),
])
def test_official_state_dict_mismatch_is_reported_and_leaves_model_untouched(edit, message):
    target = Model(**IMAGE)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sd = official_style_state_dict(tiny_model(seed=1, **IMAGE))
    edit(sd)
    with pytest.raises(ValueError, match=message):
        load_official_state_dict(target, sd)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("case", ["image", "video"])
def test_matches_official_numbers(case):
    """Outputs the official code computed on these weights (scripts/compare_official.py --golden wrote them)."""
    from safetensors import safe_open

    from scripts.compare_official import TOLERANCE, compare

    with safe_open(str(DATA / f"official_{case}.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["kwargs"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = Model(**kwargs).eval()
    load_official_state_dict(model, {k[7:]: v for k, v in tensors.items() if k.startswith("weight.")})
    diffs = compare(model, {k[3:]: v for k, v in tensors.items() if k.startswith("io.")})
    assert set(diffs) >= {"forward_z", "logdets", "reverse_guided", "jacobi_vs_exact"}
    for name, diff in diffs.items():
        assert diff <= TOLERANCE[name], (name, diff)
