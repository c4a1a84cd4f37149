"""Run configuration for every entry point: one registry of flags, the official YAML format, merged by one rule.

    defaults  <  what a checkpoint stores  <  the YAML file given by --model_config_path  <  flags typed

Every flag of every entry point is declared here once, in groups (`GROUPS`); an entry point picks its groups and may
change defaults (`finetune_decoder.py` trains with its own batch size and schedule).  The model options are declared
once too (`MODEL_FLAGS`, one entry per `transformer_flow.ModelConfig` field), and `model_options` turns them into
the model's keyword arguments.  The YAML format is the official one, a list of one-key mappings under `arguments:`
whose values are written as on the command line (`layers_per_block: 2 2 2 2 2 24`); a plain `key: value` mapping
works too.  One YAML serves every entry point: keys of other entry points are ignored with a note, official keys
that have no effect here are accepted with a note, an unknown key is an error naming it.  Flags keep the official
names and meanings (`--img_size` in pixels, `--channel_size`, `--txt_size`, `--vae`, ...); on/off flags are
booleans that also take the official 0/1 (`--fsdp`, `--fsdp 1`, `--fsdp true`, `--fsdp 0`).

A checkpoint that stores its model configuration is authoritative for the architecture: a flag or YAML key that
contradicts it is an error naming the key, both values and the checkpoint.  Its stored input flags (`RUN_KEYS`) are
defaults that flags and YAML keys override, as are all sampling settings.

This module imports no torch, so that `--help` and flag errors answer at once.
"""
import argparse
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

# Official keys that configure features that are unused, broken or gone in the official code.
INERT_KEYS = {"nvp", "adaln", "wds", "compile", "fp8", "use_8bit_adam", "vae_decoder_factor", "use_mm_attn",
              "noise_embed_denoiser", "use_pretrained_lm", "secondary_dataset", "secondary_img_size",
              "secondary_vid_size", "secondary_batch_size", "secondary_ratio", "caption_column", "vae_adapter"}
SELF_DENOISE = ("auto", "on", "off")
ASPECT_RATIOS = ["1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21"]

# Flags that fix what a model's inputs are; checkpoints store them so that sampling needs no flags.
RUN_KEYS = ("text", "txt_size", "vae", "finetuned_vae", "img_size", "vid_size", "channel_size", "patch_size",
            "noise_std", "fps_cond", "cond_noise_level", "mix_aspect", "cfg", "self_denoise")


class ConfigError(ValueError):
    """A bad configuration file, key or value: reported as one line."""


def one_line(err: BaseException) -> str:
    """An exception as one short line for an error message: its type and the first line of its text (ffmpeg, DCP and
    others put whole reports on the lines after)."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`error: ...`) and exit with status 2; --help shows defaults."""

    def __init__(self, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ---- value types --------------------------------------------------------------------------------------------------
def number(kind: type = float, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, below: float | None = None):
    """An argparse type for a finite int or float within bounds (minimum <= x, above < x, x <= maximum, x < below);
    a value out of range is refused in one line that names the flag and the allowed range (also from a YAML file).
    The bounds stay readable as attributes of the returned function (tests sweep them)."""
    noun = "an integer" if kind is int else "a finite number"
    bounds = [(">=", minimum), (">", above), ("<=", maximum), ("<", below)]
    allowed = " and ".join([noun] + [f"{op} {v:g}" for op, v in bounds if v is not None]).replace(" and ", " ", 1)

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (above is not None and value <= above) or (maximum is not None and value > maximum) or \
                (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed
    parse.minimum, parse.above, parse.maximum, parse.below = minimum, above, maximum, below
    return parse


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(text) -> bool:
    """On/off flag values: 1/true/yes/on and 0/false/no/off (any case); the official scripts write 0/1."""
    word = str(text).strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


boolean.__name__ = "0/1 or true/false"


def denoise_mode(text) -> str:
    """--self_denoise: auto, or an on/off value (1/true/on, 0/false/off: YAML reads a bare `on` as true)."""
    word = str(text).strip().lower()
    if word == "auto":
        return word
    if word in TRUE or word in FALSE:
        return "on" if word in TRUE else "off"
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


denoise_mode.__name__ = "auto, on or off"
POSITIVE, COUNT, PROBABILITY = number(int, minimum=1), number(int, minimum=0), number(minimum=0, maximum=1)


def video_size(text) -> str:
    """--vid_size: 'frames:fps' (e.g. 81:16) or 'frames' (the source frame rate), frames and fps >= 1."""
    frames, colon, fps = str(text).partition(":")
    try:
        ok = int(frames) >= 1 and (not colon or int(fps) >= 1)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected 'frames:fps' with frames and fps >= 1 (e.g. 81:16), got {text!r}")
    return str(text)


video_size.__name__ = "frames:fps"


def switch(g, name: str, default: bool, help: str):
    """An on/off flag: `--name` alone turns it on, `--name 0|1|true|false` sets it."""
    g.add_argument(f"--{name}", type=boolean, nargs="?", const=True, default=default, metavar="0|1", help=help)


# ---- model options ------------------------------------------------------------------------------------------------
class ModelFlag(NamedTuple):
    """The flag of one ModelConfig field: its official name, type, default and help."""
    flag: str
    type: object
    default: object
    help: str
    nargs: str | None = None
    choices: tuple | None = None


# One entry per transformer_flow.ModelConfig field, in its order (tests/test_config.py checks that they agree),
# except img_size (from --img_size in pixels and the VAE's factor) and txt_dim (the text encoder's width).
MODEL_FLAGS = {
    "in_channels": ModelFlag("channel_size", POSITIVE, 3, "latent channels: 4 for SD-VAE, 48 for Wan2.2, 3 for pixels"),
    "patch_size": ModelFlag("patch_size", POSITIVE, 4, "side of the square of latents that forms one token"),
    "channels": ModelFlag("channels", POSITIVE, 512, "transformer width of every block (the deep block: see "
                          "--top_block_channels)"),
    "num_blocks": ModelFlag("blocks", POSITIVE, 4, "flow blocks, when --layers_per_block has one entry"),
    "layers_per_block": ModelFlag("layers_per_block", COUNT, [8], "transformer layers of each flow block, shallow "
                                  "blocks first and the deep block last; one entry: the same for all --blocks",
                                  nargs="+"),
    "head_dim": ModelFlag("head_dim", POSITIVE, 64, "channels per attention head"),
    "num_heads": ModelFlag("num_heads", POSITIVE, None, "attention heads (default: width / head_dim)"),
    "num_kv_heads": ModelFlag("num_kv_heads", POSITIVE, None, "key/value heads, for grouped-query attention "
                              "(default: as many as query heads)"),
    "rope": ModelFlag("rope", boolean, True, "rotary position embeddings (the only kind supported)"),
    "pt_seq_len": ModelFlag("pt_seq_len", POSITIVE, None, "RoPE reference grid side, in tokens (default: latent "
                            "size / patch size); other resolutions are rescaled to it"),
    "sos": ModelFlag("sos", boolean, False, "a learned start token, so that the first token is transformed too"),
    "txt_size": ModelFlag("txt_size", COUNT, 0, "text tokens per caption (padded or cut to exactly this; 0: no text)"),
    "cond_top_only": ModelFlag("cond_top_only", boolean, False, "only the deep block reads the text"),
    "use_softplus": ModelFlag("use_softplus", boolean, False, "scales from a softplus (else exp)"),
    "use_swiglu": ModelFlag("use_swiglu", boolean, False, "gated (SwiGLU-style) MLPs"),
    "use_bias": ModelFlag("use_bias", boolean, True, "biases in the attention and MLP projections"),
    "use_qk_norm": ModelFlag("use_qk_norm", boolean, False, "RMS-normalise queries and keys"),
    "use_post_norm": ModelFlag("use_post_norm", boolean, False, "RMS-normalise the output of every sublayer"),
    "use_final_norm": ModelFlag("use_final_norm", boolean, False, "RMS-normalise the last hidden states of a block"),
    "hf_style_rope": ModelFlag("hf_style_rope", boolean, False, "rotate channel halves (Hugging Face layout) "
                               "instead of adjacent pairs"),
    "norm_type": ModelFlag("norm_type", str, "layer_norm", "normalisation before each sublayer",
                           choices=("layer_norm", "rms_norm", "none")),
    "use_checkpoint": ModelFlag("gradient_checkpoint", COUNT, 0, "training: recompute the attention of every k-th "
                                "layer in the backward pass, to save memory (0: never)"),
    "use_checkpoint_mlp": ModelFlag("gradient_checkpoint_mlp", COUNT, None, "the same for MLPs (default: as "
                                    "--gradient_checkpoint)"),
    "soft_clip": ModelFlag("soft_clip", number(minimum=0), 0.0, "bound the affine parameters to c * tanh(./c) "
                           "(0: unbounded)"),
    "seq_order": ModelFlag("seq_order", str, "R2L", "token order of the deep block: R2L reversed, L2R raster "
                           "(the shallow blocks alternate)", choices=("R2L", "L2R")),
    "learnable_self_denoiser": ModelFlag("learnable_self_denoiser", boolean, False, "train a non-causal head that "
                                         "predicts the score of the noisy latents, used to denoise samples"),
    "conditional_denoiser": ModelFlag("conditional_denoiser", boolean, False, "the denoiser reads the text too"),
    "temporal_causal": ModelFlag("temporal_causal", COUNT, 0, "video: shallow blocks flip within each frame, so "
                                 "frames stay in causal order (0: off; the official configs write 1 or 2)"),
    "top_block_channels": ModelFlag("top_block_channels", POSITIVE, None, "width of the deep block (default: "
                                    "--channels)"),
    "shallow_block_local": ModelFlag("shallow_block_local", boolean, False, "video: shallow blocks see each "
                                     "latent frame on its own"),
    "denoiser_window": ModelFlag("denoiser_window", POSITIVE, None, "video: latent frames the denoiser attends to"),
    "local_attn_window": ModelFlag("local_attn_window", POSITIVE, None, "video: latent frames the deep block "
                                   "attends to (sliding window)"),
}
DERIVED_MODEL_FIELDS = ("img_size", "txt_dim")
TRAINING_ONLY_FIELDS = ("use_checkpoint", "use_checkpoint_mlp")  # memory, not architecture


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model (a checkpoint that stores its configuration needs none of these)")
    for spec in MODEL_FLAGS.values():
        if spec.type is boolean:
            switch(g, spec.flag, spec.default, spec.help)
        else:
            g.add_argument(f"--{spec.flag}", type=spec.type, default=spec.default, nargs=spec.nargs,
                           choices=spec.choices, help=spec.help)


def model_options(args: argparse.Namespace, txt_dim: int, downsample_factor: int) -> dict:
    """The ModelConfig keyword arguments of a run configuration: --img_size is in pixels, the model takes latents of
    img_size / downsample_factor; txt_dim is the text encoder's width (0 without text)."""
    options = {field: getattr(args, spec.flag) for field, spec in MODEL_FLAGS.items()}
    layers = list(options["layers_per_block"])
    options.update(layers_per_block=layers, num_blocks=len(layers) if len(layers) > 1 else args.blocks,
                   img_size=args.img_size // downsample_factor, txt_dim=txt_dim)
    return options


def check_image_size(args: argparse.Namespace, downsample_factor: int):
    """--img_size must be a whole number of tokens: a multiple of the VAE's downsampling times --patch_size (the model
    cannot make other sizes exactly, and a silent change would surprise)."""
    multiple = downsample_factor * args.patch_size
    if args.img_size % multiple:
        nearest = max(multiple, round(args.img_size / multiple) * multiple)
        raise ConfigError(f"--img_size {args.img_size} is not a multiple of {multiple} (the VAE's {downsample_factor}x "
                          f"downsampling times --patch_size {args.patch_size}); the nearest size is {nearest}")


def check_against_checkpoint(args: argparse.Namespace, given: dict[str, str], stored: dict, checkpoint: str):
    """Raise a ConfigError if a model flag or YAML key in `given` (key -> where it was given) contradicts the model
    configuration `stored` in `checkpoint` (architecture only: gradient checkpointing is free, and so is
    --img_size, the sampling size)."""
    def refuse(key, mine, field, theirs):
        show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        raise ConfigError(f"{given[key]} {show(mine)} contradicts checkpoint {checkpoint}, which stores {field} "
                          f"{show(theirs)} (the checkpoint's architecture is used: drop the flag or YAML key)")

    for field, spec in MODEL_FLAGS.items():
        if field in TRAINING_ONLY_FIELDS or field not in stored or field == "num_blocks":
            continue
        if field == "layers_per_block":  # one entry means that many layers in each of --blocks blocks
            layers, theirs = list(args.layers_per_block), list(stored[field])
            blocks = args.blocks if "blocks" in given else len(theirs)
            if "layers_per_block" in given and (layers if len(layers) > 1 else layers * blocks) != theirs:
                refuse("layers_per_block", layers, field, theirs)
            if "blocks" in given and len(layers) == 1 and args.blocks != len(theirs):
                refuse("blocks", args.blocks, field, theirs)
            continue
        mine, theirs = getattr(args, spec.flag), stored[field]
        if spec.flag not in given or mine is None:  # None: derived from the other options, as the model does
            continue
        if spec.type is boolean:
            mine, theirs = bool(mine), bool(theirs)
        if mine != theirs:
            refuse(spec.flag, mine, field, theirs)


# ---- the other groups ---------------------------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data, VAE and text encoder")
    g.add_argument("--data", type=Path, default=Path("data"),
                   help="dataset location: a folder of images/videos, or WebDataset shards (a pattern or list)")
    g.add_argument("--dataset", type=str, default="shapes", help="shapes (generated), folder, or webdataset")
    g.add_argument("--shapes_phrasing", choices=["train", "grammar"], default="train",
                   help="shapes captions: drawn from many phrasings of the attributes (train; utils.phrasing), or "
                        "the strict grammar 'a small red circle left' (grammar)")
    g.add_argument("--shapes_motion", choices=["cross", "wrap", "bounce"], default="cross",
                   help="shapes videos: the shape crosses the frame once per clip (cross), or moves 3 px per frame "
                        "(at 32 px) and wraps around the frame (wrap) or bounces off its borders (bounce), a clip being a "
                        "window of an endless motion")
    g.add_argument("--shapes_continuation", type=PROBABILITY, default=0.0,
                   help="bouncing shapes videos: the share of clips cut 1-24 frames into their caption's motion, "
                        "whose last frame alone is scored given the others (what a sliding window samples after its "
                        "first window); needs --shapes_motion bounce and a temporally causal model")
    g.add_argument("--shapes_from_to", type=PROBABILITY, default=None,
                   help="shapes videos with --shapes_phrasing train: the share of captions whose direction names "
                        "where the motion starts and ends ('from the bottom to the top', said only by the order of "
                        "its words), each such clip starting near where its caption says; default: as often as any "
                        "other wording of a direction, 2 in 10, and clips starting anywhere)")
    g.add_argument("--logdir", type=Path, default=Path("logs"), help="where outputs go: checkpoints, samples")
    g.add_argument("--img_size", type=POSITIVE, default=32, help="image side in pixels (the area is img_size^2)")
    g.add_argument("--vid_size", type=video_size, default=None,
                   help="video: 'frames:fps', e.g. 81:16 (default: images)")
    switch(g, "fps_cond", False, "put the frame rate into the prompt")
    switch(g, "mix_aspect", False, "aspect-ratio buckets; the ratio goes into the prompt")
    switch(g, "no_flip", False, "no random horizontal flips")
    g.add_argument("--vae", type=str, default=None,
                   help="VAE: Hub name or local directory, with :scale for Wan2.2 (default: none, pixels)")
    g.add_argument("--finetuned_vae", type=str, default="none",
                   help="local file of decoder weights fine-tuned on noisy latents (finetune_decoder.py)")
    g.add_argument("--text", type=str, default=None, help="text encoder: Hub name or local directory")
    g.add_argument("--noise_std", type=number(minimum=0), default=0.3,
                   help="std of the Gaussian noise added to the latents in training (latent units)")
    g.add_argument("--noise_type", choices=["gaussian", "uniform"], default="gaussian",
                   help="gaussian latent noise, or uniform dequantisation noise of 8-bit pixels")
    switch(g, "cond_noise_level", False, "put the noise level into the prompt")
    g.add_argument("--num_workers", type=COUNT, default=2, help="data-loading processes per rank")


def add_optimization_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("optimisation (train.py and finetune_decoder.py)")
    g.add_argument("--train_seed", type=COUNT, default=None, help="seed of the initial weights, data order and noise")
    g.add_argument("--batch_size", type=POSITIVE, default=128, help="global batch size, in samples")
    g.add_argument("--epochs", type=POSITIVE, default=1000, help="epochs to train")
    g.add_argument("--epoch_length", type=POSITIVE, default=50000, help="samples per epoch (shapes and shards)")
    g.add_argument("--max_steps", type=COUNT, default=0, help="stop after this many optimizer steps (0: --epochs)")
    g.add_argument("--lr", type=number(minimum=0), default=1e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=number(minimum=0), default=1e-6, help="learning rate at the end of the cosine")
    g.add_argument("--warmup_steps", type=COUNT, default=None,
                   help="optimizer steps of linear warm-up (train.py default: one epoch)")
    g.add_argument("--grad_clip", type=number(minimum=0), default=0,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--log_every", type=POSITIVE, default=10, help="print one line of metrics every N steps")


def add_training_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training (train.py)")
    g.add_argument("--acc", type=POSITIVE, default=1, help="gradient-accumulation micro-batches per step")
    g.add_argument("--drop_label", type=PROBABILITY, default=0,
                   help="probability of an empty caption, for classifier-free guidance")
    g.add_argument("--drop_image", type=PROBABILITY, default=0,
                   help="video: probability of dropping the first latent frame (learns to extend clips)")
    g.add_argument("--resume_path", type=str, default=None,
                   help="a checkpoint folder to continue, or weights (.pth, .safetensors) to start from; a run under "
                        "way in --logdir continues by itself")
    switch(g, "fsdp", False, "shard the model with FSDP2 across the processes (else DDP)")
    switch(g, "fsdp_text_encoder", False, "with --fsdp, shard the frozen text encoder too")
    g.add_argument("--fsdp_replicate", type=POSITIVE, default=1,
                   help="HSDP with --fsdp: N replicas of the sharded model (usually one per node), each sharded over "
                        "world size / N consecutive ranks; N must divide the processes (1: shard over all)")
    g.add_argument("--latent_norm_regularization", type=number(minimum=0), default=0,
                   help="weight of the mean square of the blocks' intermediate latents in the loss")
    switch(g, "loss_scaling", True, "dynamic loss scaling with --precision fp16")
    switch(g, "grad_skip", False, "skip steps whose gradient norm exceeds --grad_clip (after step 100)")
    switch(g, "dry_run", False, "one step, one sample grid, no checkpoint: checks a configuration")
    switch(g, "wandb", False, "log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb_name", type=str, default=None, help="Weights & Biases run name")
    g.add_argument("--save_every", type=POSITIVE, default=20, help="checkpoint every N epochs")
    g.add_argument("--save_every_steps", type=COUNT, default=0, help="also checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=COUNT, default=3, help="newest checkpoints kept (0: all)")
    g.add_argument("--time_limit", type=number(minimum=0), default=0,
                   help="wall-clock seconds after which the run checkpoints and stops, to be continued by the same "
                        "command (0: none); SIGTERM and SIGUSR1 do the same")
    g.add_argument("--sample_freq", type=COUNT, default=1, help="sample a preview grid every N epochs (0: never)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute precision (auto: bf16 on GPU, fp32 on CPU); fp16 uses loss scaling")
    g.add_argument("--ema_decay", type=number(minimum=0, below=1), default=0.9999,
                   help="decay of the exponential moving average of the weights, per step (0: none)")
    g.add_argument("--denoiser_lr", type=number(minimum=0), default=1e-4,
                   help="peak learning rate of the learnable self-denoiser")
    g.add_argument("--export_name", type=str, default="model.safetensors",
                   help="consolidated weights in the logdir: .safetensors (with the config) or .pth (official)")
    g.add_argument("--export_dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of the exported weights (fp16: half the size; loading casts back)")


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (sample.py; train.py's previews use --cfg and the decoding flags)")
    g.add_argument("--checkpoint_path", type=str, default=None,
                   help="an exported .safetensors, a training checkpoint folder, or an official .pth (with its YAML)")
    g.add_argument("--caption", type=str, default=None, help="a caption, a template name, or a .txt file with one "
                   "caption per line")
    g.add_argument("--input_image", type=str, default=None, help="video: an image file as the first frame; with "
                   "--mask, the picture to inpaint")
    g.add_argument("--mask", type=str, default=None, help="inpainting --input_image: a picture whose white (bright) "
                   "pixels are regenerated under the caption, the rest kept (video models: the first frame, and the "
                   "video continues from it)")
    switch(g, "overwrite", False, "replace earlier samples of the same name (default: keep them and write these "
           "under a new name, said in a note)")
    g.add_argument("--aspect_ratio", choices=["random"] + ASPECT_RATIOS, default="1:1",
                   help="width:height of the samples, with --mix_aspect models")
    g.add_argument("--out_fps", type=POSITIVE, default=None,
                   help="frame rate of the videos (and of the prompt with --fps_cond); default: that of --vid_size, "
                        "else 8")
    g.add_argument("--seed", type=COUNT, default=191, help="the noise of caption i comes from (seed, i) alone")
    g.add_argument("--sample_batch_size", type=POSITIVE, default=16, help="samples per batch and process")
    g.add_argument("--cfg", type=number(minimum=0), default=5, help="guidance scale (0: no guidance)")
    switch(g, "guide_top", False, "guide the deep block only (models trained with text in every block)")
    switch(g, "jacobi", True, "0: exact sequential decoding; 1: the checkpoint's calibrated decoding plan (see "
           "--calibrate_decoding), else the default plan, unless a --jacobi_* flag is given")
    g.add_argument("--jacobi_th", type=number(minimum=0), default=None,
                   help="with any --jacobi_* flag, Jacobi iteration in every block: settling threshold on the squared "
                        "change relative to the window's mean square (official default 0.005)")
    g.add_argument("--jacobi_block_size", type=POSITIVE, default=None,
                   help="tokens solved together per Jacobi window (official default 64)")
    g.add_argument("--jacobi_max_iter", type=POSITIVE, default=None,
                   help="Jacobi iterations after which a token is final (official default 32)")
    g.add_argument("--attn_temp", type=number(above=0), default=1, help="attention temperature of the deep block")
    g.add_argument("--self_denoise", type=denoise_mode, choices=SELF_DENOISE, default="auto",
                   help="Tweedie denoising of the samples before decoding (the flow's score or its learnable "
                        "denoiser): auto = as the official sampler, on unless --finetuned_vae gives a noisy-latent "
                        "decoder; on = always, then whichever decoder is set; off = never")
    g.add_argument("--denoising_batch_size", type=POSITIVE, default=1,
                   help="samples per self-denoising pass (memory; the result is the same)")
    switch(g, "disable_learnable_denoiser", False, "self-denoise with the flow's score even when the model has a "
           "learnable denoiser")
    g.add_argument("--target_noise_std", type=number(minimum=0), default=None,
                   help="noise level to denoise from (default: --noise_std)")
    g.add_argument("--target_length", type=POSITIVE, default=None,
                   help="video frames to generate, beyond the training length (sliding window)")
    g.add_argument("--context_length", type=POSITIVE, default=None,
                   help="latent frames of context kept when the window slides (default: window - 1)")
    switch(g, "rolling_kv_cache", False, "long videos: keep the context's keys and values when the window slides "
           "(a rolling KV cache: no re-encoding pass, faster; not the official sampler's numbers) instead of "
           "re-encoding the context within the window as the official sampler does")
    switch(g, "save_folder", False, "with a caption file, one output per caption, named by its line index")
    switch(g, "return_sequence", False, "save every flow block's output side by side")
    switch(g, "verbose", False, "progress bars for each flow block")
    switch(g, "save_latents", False, "also write each output's latents (the flow's samples, before "
           "self-denoising) as .safetensors")
    g.add_argument("--calibrate_decoding", type=COUNT, default=0,
                   help="calibrate a decoding plan for this checkpoint on this device at batch N (the first N "
                        "captions) and store it beside the checkpoint; sampling uses the plan calibrated nearest "
                        "its batch size (writes no samples)")
    g.add_argument("--calibration_tolerance", type=number(above=0), default=1e-2,
                   help="largest relative L2 distance of the calibrated plan's latents to the exact inverse")


def device_name(text: str) -> str:
    """--device: a torch device this machine has (cpu, cuda, cuda:N, mps); one error line otherwise."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (no GPU, or a CPU build of PyTorch); "
                                         f"use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here")
    return text


device_name.__name__ = "device"


def add_device_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("device")
    g.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")


def add_finetune_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("decoder fine-tuning (finetune_decoder.py)")
    switch(g, "train_autoencoder", False, "train a small AutoencoderKL from scratch instead")
    g.add_argument("--ae_channels", type=POSITIVE, nargs="+", default=[16, 32, 32],
                   help="new autoencoder: block widths; each block after the first halves the resolution")
    g.add_argument("--ae_layers_per_block", type=POSITIVE, default=1, help="new autoencoder: layers per block")
    g.add_argument("--ae_norm_groups", type=POSITIVE, default=8, help="new autoencoder: GroupNorm groups")
    g.add_argument("--ae_latent_channels", type=POSITIVE, default=4, help="new autoencoder: latent channels")
    g.add_argument("--kl_weight", type=number(minimum=0), default=1e-6,
                   help="new autoencoder: KL weight relative to the reconstruction error summed over pixels (LDM)")
    g.add_argument("--lpips_weights", type=str, default="ckpts/lpips_vgg16.safetensors",
                   help="VGG16 features + LPIPS linear layers (see misc.losses.LPIPS); absent: no LPIPS term")
    g.add_argument("--lpips_weight", type=number(minimum=0), default=1.1, help="weight of the LPIPS loss")
    g.add_argument("--disc_weight", type=number(minimum=0), default=0.1, help="GAN loss weight (0: no discriminator)")
    g.add_argument("--disc_start", type=COUNT, default=0, help="steps before the GAN loss starts")
    g.add_argument("--disc_channels", type=POSITIVE, default=64, help="width of the PatchGAN discriminator")
    g.add_argument("--lecam_weight", type=number(minimum=0), default=0.001, help="LeCam regularisation weight")
    g.add_argument("--wavelet_weight", type=number(minimum=0), default=0.5, help="3-D Haar wavelet loss (video only)")
    switch(g, "use_3d_disc", False, "video: a 3-D discriminator instead of one per frame")
    g.add_argument("--inception_weights", type=Path, default=Path("ckpts/inception-2015-12-05.pt"),
                   help="TorchScript Inception-v3 feature extractor for rFID; absent: no rFID")
    g.add_argument("--eval_images", type=POSITIVE, default=64, help="held-out images for the evaluation")


def add_inspect_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("inspection (python -m utils.model_setup)")
    switch(g, "components", False, "also load the text encoder and the VAE")


SAMPLING_GROUPS = (add_model_args, add_data_args, add_sampling_args, add_device_args)  # sample.py, the pipeline
GROUPS = (add_model_args, add_data_args, add_optimization_args, add_training_args, add_sampling_args,
          add_device_args, add_finetune_args, add_inspect_args)


def build_parser(*groups, description: str | None = None, defaults: dict | None = None) -> Parser:
    """A parser with --model_config_path and the given groups of flags; `defaults` overrides some defaults."""
    p = Parser(description=description)
    p.add_argument("--model_config_path", type=Path, default=None, help="YAML configuration (official format)")
    for add in groups:
        add(p)
    if defaults:
        p.set_defaults(**defaults)
    return p


def read_yaml(path: Path) -> dict:
    """The key/value pairs of a configuration file, in the official `arguments:` list form or as a mapping."""
    if not path.is_file():
        raise ConfigError(f"--model_config_path {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
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
    single = action.nargs in (None, "?")
    if single and len(words) != 1:
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
    return parsed[0] if single else parsed


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None, stored: dict | None = None,
                 checkpoint: str | None = None) -> argparse.Namespace:
    """Parse the command line and merge: defaults < stored["run"] (the input flags a checkpoint was trained with) <
    YAML (--model_config_path) < flags typed on the command line.  A model flag or YAML key that contradicts
    stored["config"] (the checkpoint's model configuration) is a ConfigError naming `checkpoint`."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    typed = {a.dest for a in parser._actions for opt in a.option_strings
             if any(w == opt or w.startswith(opt + "=") for w in argv)}
    for key, value in (stored or {}).get("run", {}).items():
        if key not in typed:
            setattr(args, key, value)
    given = {key: f"--{key}" for key in typed}
    if args.model_config_path is not None:
        given |= {key: f"{args.model_config_path}: {key}" for key in apply_yaml(parser, args, typed)}
    if (stored or {}).get("config"):
        check_against_checkpoint(args, given, stored["config"], checkpoint)
    return args


def apply_yaml(parser: argparse.ArgumentParser, args: argparse.Namespace, typed: set[str]) -> set[str]:
    """Set the YAML's keys that were not typed; returns the keys that apply to this parser."""
    path = args.model_config_path
    mine = {a.dest: a for a in parser._actions}
    everyone = {a.dest for a in build_parser(*GROUPS)._actions}
    values = read_yaml(path)
    unknown = sorted(k for k in values if k not in mine and k not in everyone and k not in INERT_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s): {', '.join(unknown)}")
    for kind, keys in (("official keys that have no effect", [k for k in values if k in INERT_KEYS]),
                       ("keys of other entry points", [k for k in values if k in everyone and k not in mine])):
        if keys:
            print(f"note: {path}: ignoring {kind}: {', '.join(sorted(keys))}")
    for key, value in values.items():
        if key in mine and key not in typed and key != "model_config_path":
            setattr(args, key, convert(mine[key], value, f"{path}: {key}"))
    return {k for k in values if k in mine and k not in typed}


def run_cli(main):
    """Run an entry point: a configuration or input error is one line on stderr and exit status 2, no traceback
    (set STARFLOW_DEBUG=1 for the traceback)."""
    from utils.hub import PretrainedNotFound

    try:
        main()
    except (ConfigError, PretrainedNotFound, FileNotFoundError, ValueError) as err:
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
