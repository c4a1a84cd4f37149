"""Run configuration for every entry point: the official flags and YAML format, merged by one rule.

    defaults  <  the YAML file given by --model_config_path  <  flags typed on the command line

The YAML format is the official one, a list of one-key mappings under `arguments:` whose values are written as on the
command line (`layers_per_block: 2 2 2 2 2 24`); a plain `key: value` mapping works too.  Every key must be a known
flag (an unknown one is an error naming it); official keys that have no effect here are accepted and reported once.
Flags keep the official names and meanings (`--img_size` in pixels, `--channel_size`, `--txt_size`, `--vae`, ...).
"""
import argparse
import math
import os
import sys
from pathlib import Path

import yaml

# Official keys that configure features that are unused, broken or gone in the official code.
INERT_KEYS = {"nvp", "adaln", "wds", "compile", "fp8", "use_8bit_adam", "vae_decoder_factor", "use_mm_attn",
              "noise_embed_denoiser", "use_pretrained_lm", "secondary_dataset", "secondary_img_size",
              "secondary_vid_size", "secondary_batch_size", "secondary_ratio", "caption_column", "vae_adapter"}
ASPECT_RATIOS = ["1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21"]


# Flags that fix what a model's inputs are; checkpoints store them so that sampling needs no flags.
RUN_KEYS = ("text", "txt_size", "vae", "finetuned_vae", "img_size", "vid_size", "channel_size", "patch_size",
            "noise_std", "fps_cond", "cond_noise_level", "mix_aspect", "cfg")


class ConfigError(ValueError):
    """A bad configuration file, key or value: reported as one line."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`error: ...`) and exit with status 2."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def number(kind: type = float, minimum: float | None = None, above: float | None = None):
    """An argparse type for a finite int or float, at least `minimum` or greater than `above`; a value out of range
    is refused in one line that names the flag and the allowed range (also from a YAML file)."""
    noun = "an integer" if kind is int else "a finite number"
    allowed = noun + (f" >= {minimum:g}" if minimum is not None else "") + \
        (f" > {above:g}" if above is not None else "")

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed
    return parse


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--channel_size", type=int, default=3, help="latent channels: 4 for SD-VAE, 48 for Wan2.2")
    g.add_argument("--patch_size", type=int, default=4)
    g.add_argument("--channels", type=int, default=512, help="transformer width")
    g.add_argument("--top_block_channels", type=int, default=None, help="a wider deep block")
    g.add_argument("--blocks", type=int, default=4, help="flow blocks, when layers_per_block has one entry")
    g.add_argument("--layers_per_block", type=int, nargs="+", default=[8], help="shallow blocks first, deep last")
    g.add_argument("--rope", type=int, default=1)
    g.add_argument("--pt_seq_len", type=int, default=None, help="RoPE reference grid (default: latent size / patch)")
    g.add_argument("--sos", type=int, default=0)
    g.add_argument("--seq_order", choices=["R2L", "L2R"], default="R2L")
    g.add_argument("--use_softplus", type=int, default=0)
    g.add_argument("--cond_top_only", type=int, default=0, help="only the deep block sees the text")
    g.add_argument("--head_dim", type=int, default=64)
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--num_kv_heads", type=int, default=None)
    g.add_argument("--use_swiglu", type=int, default=0)
    g.add_argument("--use_qk_norm", type=int, default=0)
    g.add_argument("--use_post_norm", type=int, default=0)
    g.add_argument("--use_final_norm", type=int, default=0)
    g.add_argument("--use_bias", type=int, default=1)
    g.add_argument("--norm_type", choices=["layer_norm", "rms_norm", "none"], default="layer_norm")
    g.add_argument("--soft_clip", type=float, default=0, help="clip the affine parameters to c*tanh(./c)")
    g.add_argument("--learnable_self_denoiser", type=int, default=0)
    g.add_argument("--conditional_denoiser", type=int, default=0)
    g.add_argument("--temporal_causal", type=int, default=0)
    g.add_argument("--shallow_block_local", type=int, default=0, help="shallow blocks see each frame on its own")
    g.add_argument("--denoiser_window", type=int, default=None, help="frames the video denoiser attends to")
    g.add_argument("--local_attn_window", type=int, default=None, help="latent frames the deep block attends to")
    g.add_argument("--gradient_checkpoint", type=int, default=0, help="checkpoint attention every k layers")
    g.add_argument("--gradient_checkpoint_mlp", type=int, default=None, help="MLPs (default: as attention)")


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data, VAE and text encoder")
    g.add_argument("--data", type=Path, default=Path("data"), help="dataset location")
    g.add_argument("--dataset", type=str, default="shapes", help="dataset kind or name")
    g.add_argument("--logdir", type=Path, default=Path("logs"), help="outputs: checkpoints, samples")
    g.add_argument("--img_size", type=int, default=32, help="image side in pixels (the area is img_size^2)")
    g.add_argument("--vid_size", type=str, default=None, help="'frames:fps' for video, e.g. 81:16")
    g.add_argument("--fps_cond", type=int, default=0, help="put the fps into the prompt")
    g.add_argument("--mix_aspect", type=int, default=0, help="aspect-ratio buckets; the ratio goes into the prompt")
    g.add_argument("--no_flip", type=int, default=0, help="no random horizontal flips")
    g.add_argument("--vae", type=str, default=None, help="VAE: Hub name or local directory, with :scale for Wan2.2")
    g.add_argument("--finetuned_vae", type=str, default="none", help="local file of fine-tuned decoder weights")
    g.add_argument("--text", type=str, default=None, help="text encoder: Hub name or local directory")
    g.add_argument("--txt_size", type=int, default=0, help="text tokens (padded or truncated to exactly this)")
    g.add_argument("--noise_std", type=float, default=0.3, help="latent noise augmentation")
    g.add_argument("--noise_type", choices=["gaussian", "uniform"], default="gaussian")
    g.add_argument("--cond_noise_level", type=int, default=0, help="put the noise level into the prompt")


def add_training_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--train_seed", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=128, help="global batch size")
    g.add_argument("--acc", type=int, default=1, help="gradient-accumulation steps")
    g.add_argument("--epochs", type=int, default=1000)
    g.add_argument("--epoch_length", type=int, default=50000, help="samples per epoch")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_steps", type=int, default=None, help="default: one epoch")
    g.add_argument("--drop_label", type=float, default=0, help="caption dropout for guidance")
    g.add_argument("--drop_image", type=float, default=0, help="video: drop the first latent frame")
    g.add_argument("--resume_path", type=str, default=None)
    g.add_argument("--fsdp", type=int, default=0)
    g.add_argument("--fsdp_text_encoder", type=int, default=0)
    g.add_argument("--latent_norm_regularization", type=float, default=0)
    g.add_argument("--loss_scaling", type=int, default=1, help="gradient scaling (fp16 only)")
    g.add_argument("--grad_clip", type=float, default=0)
    g.add_argument("--grad_skip", type=int, default=0, help="skip steps whose gradient norm exceeds grad_clip")
    g.add_argument("--dry_run", type=int, default=0)
    g.add_argument("--wandb_name", type=str, default=None)
    g.add_argument("--save_every", type=int, default=20)
    g.add_argument("--sample_freq", type=int, default=1)


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--checkpoint_path", type=str, default=None)
    g.add_argument("--caption", type=str, default=None, help="a caption, or a .txt file with one per line")
    g.add_argument("--input_image", type=str, default=None, help="first frame for image-to-video")
    g.add_argument("--aspect_ratio", choices=["random"] + ASPECT_RATIOS, default="1:1")
    g.add_argument("--out_fps", type=int, default=None,
                   help="frame rate of the videos (and of the prompt with --fps_cond); default: that of --vid_size, else 8")
    g.add_argument("--seed", type=int, default=191)
    g.add_argument("--sample_batch_size", type=number(int, minimum=1), default=16)
    g.add_argument("--cfg", type=number(minimum=0), default=5, help="guidance scale (0: no guidance)")
    g.add_argument("--guide_top", type=int, default=None)
    g.add_argument("--jacobi", type=int, choices=[0, 1], default=1,
                   help="0: exact sequential decoding; 1: the checkpoint's calibrated decoding plan (see "
                        "--calibrate_decoding), else the default plan, unless a --jacobi_* flag is given")
    g.add_argument("--jacobi_th", type=number(minimum=0), default=None,
                   help="with any --jacobi_* flag, Jacobi iteration in every block (official defaults 0.005, 64, 32)")
    g.add_argument("--jacobi_block_size", type=number(int, minimum=1), default=None)
    g.add_argument("--jacobi_max_iter", type=number(int, minimum=1), default=None)
    g.add_argument("--attn_temp", type=number(above=0), default=1)
    g.add_argument("--denoising_batch_size", type=number(int, minimum=1), default=1)
    g.add_argument("--disable_learnable_denoiser", type=int, default=0)
    g.add_argument("--target_noise_std", type=float, default=None)
    g.add_argument("--target_length", type=number(int, minimum=1), default=None,
                   help="video frames, beyond the training length")
    g.add_argument("--context_length", type=number(int, minimum=1), default=None,
                   help="latent frames of context for long videos")
    g.add_argument("--save_folder", type=int, default=0)
    g.add_argument("--return_sequence", type=int, default=0)


GROUPS = (add_model_args, add_data_args, add_training_args, add_sampling_args)


def build_parser(*groups, description: str | None = None) -> Parser:
    p = Parser(description=description)
    p.add_argument("--model_config_path", type=Path, default=None, help="YAML configuration (official format)")
    for add in groups:
        add(p)
    return p


def read_yaml(path: Path) -> dict:
    """The key/value pairs of a configuration file, in the official `arguments:` list form or as a mapping."""
    if not path.is_file():
        raise ConfigError(f"--model_config_path {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("arguments"), list) and len(data) == 1:
        pairs = [item for item in data["arguments"] if isinstance(item, dict) and len(item) == 1]
        if len(pairs) != len(data["arguments"]):
            raise ConfigError(f"{path}: each entry under 'arguments:' must be one 'key: value'")
        return {k: v for item in pairs for k, v in item.items()}
    if isinstance(data, dict):
        return data
    raise ConfigError(f"{path}: expected 'arguments:' with a list of 'key: value' entries, or a mapping")


def convert(action: argparse.Action, value, where: str):
    """A YAML value as the flag `action` would have parsed it from the command line."""
    if value is None:
        return None
    if isinstance(value, bool):
        value = int(value)
    words = [str(v) for v in value] if isinstance(value, list) else str(value).split()
    if action.nargs is None and len(words) != 1:
        words = [str(value)]
    try:
        parsed = [action.type(w) if action.type else w for w in words]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid {action.type.__name__} value {value!r}") from None
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"{where}: {err}") from None
    for v in parsed:
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return parsed if action.nargs else parsed[0]


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                 stored: dict | None = None) -> argparse.Namespace:
    """Parse the command line and merge: defaults < `stored` (the flags a checkpoint was trained with) < YAML
    (--model_config_path) < flags typed on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    typed = {a.dest for a in parser._actions for opt in a.option_strings
             if any(w == opt or w.startswith(opt + "=") for w in argv)}
    for key, value in (stored or {}).items():
        if key not in typed:
            setattr(args, key, value)
    if args.model_config_path is None:
        return args
    # Keys of every entry point are valid (one YAML serves training and sampling), and so are this parser's own.
    actions = {a.dest: a for a in build_parser(*GROUPS)._actions} | {a.dest: a for a in parser._actions}
    values = read_yaml(args.model_config_path)
    unknown = sorted(k for k in values if k not in actions and k not in INERT_KEYS)
    if unknown:
        raise ConfigError(f"{args.model_config_path}: unknown key(s): {', '.join(unknown)}")
    ignored = sorted(k for k in values if k in INERT_KEYS)
    if ignored:
        print(f"note: {args.model_config_path}: ignoring official keys that have no effect: {', '.join(ignored)}")
    for key, value in values.items():
        if key in actions and key not in typed and key != "model_config_path":
            setattr(args, key, convert(actions[key], value, f"{args.model_config_path}: {key}"))
    return args


def run_cli(main):
    """Run an entry point: a configuration or input error is one line on stderr and exit status 2, no traceback
    (set STARFLOW_DEBUG=1 for the traceback)."""
    from utils.hub import PretrainedNotFound

    try:
        main()
    except (ConfigError, PretrainedNotFound, FileNotFoundError, ValueError) as err:
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        sys.exit(f"error: {err}")
