"""Wiring: the flow model, text encoder and VAE of a run configuration.

    python -m utils.model_setup --model_config_path configs/starflow_3B_t2i_256x256.yaml

builds the flow model on the meta device (nothing is downloaded) and reports its parameter counts; with
`--components 1` it also loads the text encoder and the VAE, which checks that they can be had on this machine.
"""
import itertools
import json
from pathlib import Path

import torch

from transformer_flow import Model, load_official_state_dict
from utils.config import (
    ConfigError,
    add_data_args,
    add_inspect_args,
    add_model_args,
    build_parser,
    model_options,
    parse_config,
    run_cli,
)
from utils.hub import PretrainedNotFound, resolve_pretrained

# Shapes of the pretrained components the official configurations name, for building without their weights.
KNOWN_TEXT_WIDTHS = {"google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096, "google/flan-t5-large": 1024,
                     "google/flan-t5-base": 768, "sentence-transformers/all-MiniLM-L6-v2": 384}
KNOWN_VAE_FACTORS = {"stabilityai/sd-vae-ft-ema": (8, 1), "stabilityai/sd-vae-ft-mse": (8, 1),
                     "stabilityai/sdxl-vae": (8, 1), "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (16, 4),
                     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": (8, 4), "Wan-AI/Wan2.1-T2V-14B-Diffusers": (8, 4)}


def _local_config(name: str, *subfolders: str) -> dict | None:
    """config.json of a pretrained component if it is on this machine (a local path or the Hub cache)."""
    try:
        root = resolve_pretrained(name, allow_patterns=["*.json", "*/*.json"], download=False)
    except PretrainedNotFound:
        return None
    for sub in subfolders + ("",):
        if (root / sub / "config.json").is_file():
            return json.loads((root / sub / "config.json").read_text())
    return None


def text_width(name: str) -> int:
    """Hidden size of a text encoder, from its local config or the known official ones (no download)."""
    config = _local_config(name)
    if config is not None:
        return config.get("d_model") or config["hidden_size"]
    if name in KNOWN_TEXT_WIDTHS:
        return KNOWN_TEXT_WIDTHS[name]
    raise ConfigError(f"--text {name}: its width is unknown without its files (provide them locally)")


def vae_downsample_factors(name: str) -> tuple[int, int]:
    """(spatial, temporal) downsampling of a VAE (the `:scale` suffix ignored), from its local config or the known
    ones, without loading it."""
    from utils.vae import downsample_factors, split_scale

    base, _ = split_scale(name)
    config = _local_config(base, "vae")
    if config is not None:
        return downsample_factors(config.get("_class_name"), config)
    if base in KNOWN_VAE_FACTORS:
        return KNOWN_VAE_FACTORS[base]
    raise ConfigError(f"--vae {name}: its downsampling factor is unknown without its files (provide them locally)")


def setup_transformer(args, txt_dim: int | None = None, downsample_factor: int | None = None) -> Model:
    """The flow model of a run configuration; the text width and VAE factor default to the named components'."""
    if txt_dim is None:
        txt_dim = text_width(args.text) if args.text else 0
    if downsample_factor is None:
        downsample_factor = vae_downsample_factors(args.vae)[0] if args.vae else 1
    return Model(**model_options(args, txt_dim, downsample_factor))


def stored_metadata(path) -> dict:
    """What a checkpoint of ours says about itself: {"config": ModelConfig fields, "run": sampling-relevant flags};
    {} for an official .pth, which says nothing."""
    path = Path(path)
    if path.is_dir():
        extra = path / "extra-rank00000.pt"
        if not extra.is_file():
            raise ValueError(f"checkpoint {path}: not a training checkpoint folder (no {extra.name})")
        stored = torch.load(extra, map_location="cpu", weights_only=False)
        return {k: stored[k] for k in ("config", "run") if k in stored}
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:
            raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
        return {k: json.loads(meta[k]) for k in ("config", "run") if k in meta}
    return {}


def load_weights(model: Model, path) -> None:
    """Load weights into `model` from an official .pth, an exported .safetensors, or a training checkpoint folder
    (its EMA weights when it has them).  Strict: a missing, unexpected or mis-shaped tensor is an error naming it.

    A model built on the meta device (`with torch.device("meta"): Model(...)`) is materialised from the file: the
    checkpoint's tensors become its weights, so loading holds one copy of them, not a random initialisation beside
    the checkpoint (a training checkpoint folder is loaded into memory allocated first)."""
    path = Path(path)
    meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if path.is_dir() and meta:
        model.to_empty(device="cpu")
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        from utils.training import quiet_dcp

        key = "ema" if any(k.startswith("ema.") for k in dcp.FileSystemReader(str(path)).read_metadata()
                           .state_dict_metadata) else "model"
        state = {key: {k: v.clone() for k, v in model.state_dict().items()}}
        try:
            with quiet_dcp():
                dcp.load(state, checkpoint_id=str(path))
        except Exception as err:
            raise ValueError(f"checkpoint {path} does not fit the model: {str(err).splitlines()[0][:500]}") from None
        model.load_state_dict(state[key])
        return
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder")
    # materialising: each tensor cast to the model's dtype as it is read (safetensors) or in place (a .pth), so the
    # source of a cast is freed before the next: one copy of the weights
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()} if meta else {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                state = {k: _cast(f.get_tensor(k), dtypes.get(k)) for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for k in state if isinstance(state, dict) and meta else ():
                state[k] = _cast(state[k], dtypes.get(k)) if torch.is_tensor(state[k]) else state[k]
    except Exception as err:  # truncated, or not a checkpoint at all
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    try:
        load_official_state_dict(model, state, assign=meta)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = build_parser(add_model_args, add_data_args, add_inspect_args, description=__doc__)
    args = parse_config(parser, argv)
    with torch.device("meta"):
        model = setup_transformer(args)
    print(f"flow model: {count_parameters(model):,} parameters")
    for i, block in enumerate(model.blocks):
        print(f"  blocks.{i}: {count_parameters(block):,}{'  (deep)' if i == len(model.blocks) - 1 else ''}")
    if args.learnable_self_denoiser:
        print(f"  learnable_self_denoiser: {count_parameters(model.learnable_self_denoiser):,}")
    if args.components:
        from utils.text import TextEncoder
        from utils.vae import setup_vae

        if args.text:
            text = TextEncoder.from_args(args)
            print(f"text encoder {args.text}: {count_parameters(text.encoder):,} parameters (frozen), width "
                  f"{text.width}")
        if args.vae:
            vae = setup_vae(args.vae, args.finetuned_vae)
            print(f"VAE {args.vae}: {vae.latent_channels} latent channels, {vae.downsample_factor}x spatial, "
                  f"{vae.temporal_downsample_factor}x temporal")


if __name__ == "__main__":
    run_cli(main)
