"""The one configuration rule (defaults < YAML < command line), the shipped official configurations, and the
one-line errors of bad configurations."""
from pathlib import Path

import pytest
import torch
from conftest import cli_error

from utils.config import GROUPS, ConfigError, build_parser, parse_config
from utils.model_setup import count_parameters, setup_transformer

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = {"configs/starflow_3B_t2i_256x256.yaml": 3_858_281_544,
            "configs/starflow-v_7B_t2v_caus_480p.yaml": 6_890_096_528}


def parse(*argv):
    return parse_config(build_parser(*GROUPS), list(argv))


@pytest.mark.parametrize("path,count", sorted(OFFICIAL.items()))
def test_official_configs_build_the_official_models(path, count):
    args = parse("--model_config_path", str(ROOT / path))
    assert args.layers_per_block == [2, 2, 2, 2, 2, 24] and args.channels == 3072 and args.text == "google/flan-t5-xl"
    with torch.device("meta"):
        model = setup_transformer(args)  # widths of flan-t5-xl and the VAEs are known without their files
    assert count_parameters(model) == count


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("arguments:\n- channels: 128\n- layers_per_block: 1 2 3\n- lr: 3e-4\n- vid_size: '9:8'\n- sos: true\n")
    args = parse("--model_config_path", str(cfg))
    assert (args.channels, args.layers_per_block, args.lr, args.vid_size, args.sos) == (128, [1, 2, 3], 3e-4, "9:8", 1)
    assert args.head_dim == 64  # untouched default
    args = parse("--channels", "64", "--model_config_path", str(cfg), "--layers_per_block", "4", "4", "--lr=1e-3")
    assert (args.channels, args.layers_per_block, args.lr) == (64, [4, 4], 1e-3)
    cfg.write_text("channels: 96\nseq_order: L2R\n")  # a plain mapping works too
    assert (parse("--model_config_path", str(cfg)).channels, parse("--model_config_path", str(cfg)).seq_order) == (
        96, "L2R")


@pytest.mark.parametrize("text,message", [
    ("arguments:\n- channels: 128\n- colour: red\n", "unknown key.*colour"),
    ("arguments:\n- channels: wide\n", "channels: expected an integer, got 'wide'"),
    ("arguments:\n- channels: 0\n", "channels: must be an integer >= 1, got '0'"),
    ("arguments:\n- sos: maybe\n", "sos: expected 0/1 or true/false, got 'maybe'"),
    ("arguments:\n- seq_order: up\n", "seq_order: 'up' is not one of R2L, L2R"),
    ("arguments: [\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected 'arguments:'"),
])
def test_bad_config_is_named(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse("--model_config_path", str(cfg))


@pytest.mark.parametrize("argv,message", [
    (["--model_config_path", "nope.yaml"], "--model_config_path nope.yaml: no such file"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
    (["--text", "google/flan-t5-xl", "--components", "1", "--layers_per_block", "1", "--blocks", "2"],
     "text encoder 'google/flan-t5-xl' is not available offline"),
    (["--vae", "stabilityai/sd-vae-ft-ema", "--components", "1", "--layers_per_block", "1", "--blocks", "2"],
     "VAE 'stabilityai/sd-vae-ft-ema' is not available offline"),
])
def test_cli_errors_are_one_line(argv, message, monkeypatch):
    """`python -m utils.model_setup ARGV` (run in-process, from the repository root) stops in one line."""
    from utils.model_setup import main

    monkeypatch.chdir(ROOT)
    code, stderr = cli_error(main, argv)
    assert code != 0
    assert message in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error")]) == 1


def test_components_resolve_from_local_files(tmp_path, capsys):
    """Widths and factors come from local configs; --components 1 loads the text encoder and the VAE by path."""
    from diffusers import AutoencoderKL

    from utils.model_setup import main, text_width, vae_downsample_factors
    from utils.text import minilm_path

    vae_dir = tmp_path / "tiny-vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).save_pretrained(vae_dir)
    assert text_width(str(minilm_path())) == 384 and vae_downsample_factors(str(vae_dir)) == (2, 1)
    main(["--text", str(minilm_path()), "--vae", str(vae_dir), "--components", "1", "--txt_size", "8",
          "--channel_size", "4", "--img_size", "16", "--layers_per_block", "1", "1", "--channels", "64",
          "--cond_top_only", "1", "--sos", "1"])
    out = capsys.readouterr().out
    assert "flow model:" in out and "text encoder" in out and "VAE" in out and "4 latent channels, 2x spatial" in out
    with torch.device("meta"):
        model = setup_transformer(parse("--text", str(minilm_path()), "--vae", str(vae_dir), "--txt_size", "8",
                                        "--channel_size", "4", "--img_size", "16", "--layers_per_block", "1", "1",
                                        "--channels", "64", "--cond_top_only", "1"))
    assert model.blocks[-1].proj_txt.in_features == 384 and model.config.img_size == 8


# ---- the flag registry --------------------------------------------------------------------------------------------
def test_model_flags_declare_every_config_field_with_its_type():
    """MODEL_FLAGS and ModelConfig cannot drift: every field has one flag (or is derived), of the field's kind."""
    import dataclasses

    from transformer_flow import ModelConfig
    from utils.config import DERIVED_MODEL_FIELDS, MODEL_FLAGS, boolean

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(MODEL_FLAGS) | set(DERIVED_MODEL_FIELDS) == set(fields)
    assert not set(MODEL_FLAGS) & set(DERIVED_MODEL_FIELDS)
    for name, spec in MODEL_FLAGS.items():
        assert (spec.type is boolean) == (fields[name].type is bool), name
    args = parse("--hf_style_rope", "1", "--layers_per_block", "1", "2", "--channel_size", "4", "--patch_size", "2")
    options = model_options_of(args)
    assert set(options) == set(fields)
    config = ModelConfig(**options)
    assert config.hf_style_rope and config.layers_per_block == (1, 2) and config.in_channels == 4


def model_options_of(args):
    from utils.config import model_options

    return model_options(args, txt_dim=0, downsample_factor=1)


def every_parser():
    import finetune_decoder
    import sample
    import train
    from utils.config import add_data_args, add_inspect_args, add_model_args

    return {"train.py": build_parser(*train.GROUPS), "sample.py": build_parser(*sample.GROUPS),
            "finetune_decoder.py": build_parser(*finetune_decoder.GROUPS, defaults=finetune_decoder.DEFAULTS),
            "utils.model_setup": build_parser(add_model_args, add_data_args, add_inspect_args)}


def test_every_flag_of_every_entry_point_explains_itself():
    for name, parser in every_parser().items():
        silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
        assert not silent, f"{name}: flags without help: {silent}"


def test_entry_points_share_flags_and_keep_their_own_defaults():
    parsers = every_parser()
    train_args, tune_args = parsers["train.py"].parse_args([]), parsers["finetune_decoder.py"].parse_args([])
    assert (train_args.batch_size, train_args.warmup_steps) == (128, None)
    assert (tune_args.batch_size, tune_args.warmup_steps, tune_args.grad_clip) == (32, 100, 1.0)
    shared = {a.dest: a for a in parsers["train.py"]._actions}
    for a in parsers["finetune_decoder.py"]._actions:  # one declaration: the same type and help
        if a.dest in shared and a.dest != "help":
            kind = lambda action: getattr(action.type, "__name__", None)
            assert (kind(a), a.help) == (kind(shared[a.dest]), shared[a.dest].help), a.dest


@pytest.mark.parametrize("argv,value", [([], False), (["--fsdp"], True), (["--fsdp", "1"], True),
                                        (["--fsdp", "0"], False), (["--fsdp", "TRUE"], True),
                                        (["--fsdp=no"], False)])
def test_switches_are_booleans_that_take_the_official_zero_and_one(argv, value):
    assert parse(*argv).fsdp is value


@pytest.mark.parametrize("yaml_value,value", [("1", True), ("0", False), ("true", True), ("false", False)])
def test_yaml_switches(tmp_path, yaml_value, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"arguments:\n- use_softplus: {yaml_value}\n- temporal_causal: 2\n")
    args = parse("--model_config_path", str(cfg))
    assert args.use_softplus is value and args.temporal_causal == 2


def test_one_yaml_serves_every_entry_point(tmp_path, capsys):
    """Keys of other entry points are ignored with a note; this entry point's keys apply."""
    import sample

    cfg = tmp_path / "c.yaml"
    cfg.write_text("arguments:\n- max_steps: 10\n- batch_size: 8\n- hf_style_rope: 1\n- cfg: 2.5\n- nvp: 1\n")
    args = parse_config(build_parser(*sample.GROUPS), ["--model_config_path", str(cfg)])
    assert args.hf_style_rope is True and args.cfg == 2.5 and not hasattr(args, "max_steps")
    out = capsys.readouterr().out
    assert "ignoring keys of other entry points: batch_size, max_steps" in out
    assert "ignoring official keys that have no effect: nvp" in out


IMAGE_CKPT = ROOT / "ckpts/starflow_shapes_t2i_32x32.safetensors"
VIDEO_CKPT = ROOT / "ckpts/starflow-v_shapes_t2v_32x32.safetensors"


@pytest.mark.parametrize("ckpt,extra,needles", [
    (IMAGE_CKPT, ["--channels", "7", "--num_heads", "3"], ["--channels 7", "channels 192"]),
    (IMAGE_CKPT, ["--layers_per_block", "2", "2", "5"], ["--layers_per_block 2 2 5", "layers_per_block 2 2 6"]),
    (IMAGE_CKPT, ["--blocks", "2"], ["--blocks 2", "layers_per_block 2 2 6"]),
    (IMAGE_CKPT, ["--sos", "0"], ["--sos False", "sos True"]),
    (VIDEO_CKPT, ["--model_config_path", str(ROOT / "configs/starflow_shapes_t2i_32x32.yaml")],
     ["starflow_shapes_t2i_32x32.yaml: txt_size 24", "txt_size 32"]),
])
def test_a_checkpoint_is_authoritative_for_its_architecture(tmp_path, ckpt, extra, needles):
    """A flag or YAML key that contradicts the stored configuration is one line naming the key, both values and
    the checkpoint (exit 2), and nothing is written."""
    import sample

    argv = ["--checkpoint_path", str(ckpt), "--caption", "a red circle left", "--logdir", str(tmp_path / "out"),
            *extra]
    code, err = cli_error(sample.main, argv)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(n in err for n in needles) and str(ckpt) in err, err
    assert not (tmp_path / "out").exists()


def test_flags_that_agree_with_the_checkpoint_and_sampling_settings_pass():
    import sample
    from utils.model_setup import stored_metadata

    argv = ["--checkpoint_path", str(IMAGE_CKPT), "--channels", "192", "--layers_per_block", "2", "2", "6",
            "--sos", "1", "--gradient_checkpoint", "1", "--cfg", "1.5", "--img_size", "48", "--guide_top"]
    args = parse_config(build_parser(*sample.GROUPS), argv, stored_metadata(IMAGE_CKPT), str(IMAGE_CKPT))
    assert (args.cfg, args.img_size, args.guide_top, args.text) == (1.5, 48, True,
                                                                    "sentence-transformers/all-MiniLM-L6-v2")


# ---- every numeric flag has a range -----------------------------------------------------------------------------
def out_of_range(action) -> list[str] | None:
    """A value of `action` that its type or choices must refuse, or None for free text (paths, names)."""
    kind = action.type
    if getattr(kind, "__name__", "") == "0/1 or true/false":
        value = "maybe"
    elif getattr(kind, "__name__", "") == "frames:fps":
        value = "0:16"
    elif action.choices is not None:
        value = "bogus"
    elif hasattr(kind, "minimum"):
        integer = kind.__name__.startswith("an integer")
        for bound, outside in (("minimum", -1), ("above", 0), ("maximum", 1), ("below", 0)):
            if getattr(kind, bound) is not None:
                value = str(getattr(kind, bound) + outside * (1 if integer else 0.5))
                break
        else:
            value = "nan"
    else:
        return None
    return [value] * (1 if action.nargs in (None, "?") else 2)


def numeric_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "model_config_path")]


def test_no_numeric_flag_is_unbounded():
    for name, parser in every_parser().items():
        unbounded = [a.option_strings[0] for a in numeric_actions(parser) if a.type in (int, float)]
        assert not unbounded, f"{name}: numeric flags without a range: {unbounded}"


@pytest.mark.parametrize("entry", ["sample", "train", "finetune_decoder"])
def test_every_flag_refuses_a_value_out_of_its_range_in_one_line(entry, tmp_path):
    """The bad-input sweep: every flag with a type or choices, at a value outside them, is one line naming the flag,
    exit status 2, no traceback, nothing written."""
    import importlib

    module = importlib.import_module(entry)
    parser = every_parser()[f"{entry}.py"]
    swept = 0
    for action in numeric_actions(parser):
        value = out_of_range(action)
        if value is None:
            continue
        flag = action.option_strings[0]
        code, err = cli_error(module.main, [flag, *value, "--logdir", str(tmp_path / "out")])
        errors = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(errors) == 1 and flag in errors[0] and "Traceback" not in err, (flag, value, err)
        swept += 1
    assert swept > 20 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,needle", [(["--img_size", "30"], "--img_size 30 is not a multiple of 4"),
                                          (["--aspect_ratio", "16:9"], "--aspect_ratio 16:9: this model was trained "
                                                                          "on square images only")])
def test_sizes_the_model_cannot_make_are_refused(tmp_path, flags, needle):
    """The bundled image model (4x autoencoder, patch 1, no --mix_aspect) makes 32x32 and other multiples of 4,
    square: anything else is one line, exit 2, nothing written, never a silently different size."""
    import sample

    code, err = cli_error(sample.main, ["--checkpoint_path", IMAGE_CKPT, "--caption", "a red circle left",
                                        "--logdir", tmp_path / "out", *flags])
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
@pytest.mark.parametrize("entry", ["sample", "train", "finetune_decoder", "scripts.benchmark", "scripts.web_demo"])
def test_a_device_this_machine_lacks_is_one_line(entry, tmp_path):
    """--device cuda without CUDA (and a misspelt device) stops at parsing in one line, in every entry point: the
    benchmark used to end in PyTorch's "Torch not compiled with CUDA enabled" traceback."""
    import importlib

    module = importlib.import_module(entry)
    for device, needle in (("cuda", "cuda: CUDA is not available here"), ("gpu", "'gpu' is not a device")):
        code, stderr = cli_error(module.main, ["--device", device])
        assert code == 2 and needle in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_length_under_one_is_one_line():
    """benchmark --lengths 0 stops at parsing in one line (it times each length max/k times: 0 ended in a
    ZeroDivisionError traceback)."""
    from scripts import benchmark

    for length in ("0", "-2"):
        code, stderr = cli_error(benchmark.main, ["--checkpoint", str(ROOT / "ckpts" / "starflow-v_shapes_t2v_32x32"
                                                                      ".safetensors"), "--lengths", length, "4"])
        assert code == 2 and f"--lengths: must be an integer >= 1, got '{length}'" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr


def test_an_official_checkout_missing_a_requirement_is_one_line(tmp_path):
    """benchmark --official: a checkout whose code imports a module this environment lacks (einops, on a fresh
    machine) stops in one line naming the module, where it used to end in the import's traceback."""
    from scripts import benchmark

    (tmp_path / "transformer_flow.py").write_text("import a_module_nobody_installed\n")
    code, stderr = cli_error(benchmark.main, ["--official", str(tmp_path), "--calibrate"])
    assert "'a_module_nobody_installed'" in stderr and "pip install" in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
