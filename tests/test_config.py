"""The one configuration rule (defaults < YAML < command line), the shipped official configurations, and the
one-line errors of bad configurations."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.config import ConfigError, GROUPS, build_parser, parse_config
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
    ("arguments:\n- channels: wide\n", "channels: invalid int value 'wide'"),
    ("arguments:\n- seq_order: up\n", "seq_order: 'up' is not one of R2L, L2R"),
    ("arguments: [\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected 'arguments:'"),
])
def test_bad_config_is_named(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse("--model_config_path", str(cfg))


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "utils.model_setup", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv,message", [
    (["--model_config_path", "nope.yaml"], "--model_config_path nope.yaml: no such file"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
    (["--text", "google/flan-t5-xl", "--components", "1", "--layers_per_block", "1", "--blocks", "2"],
     "text encoder 'google/flan-t5-xl' is not available offline"),
    (["--vae", "stabilityai/sd-vae-ft-ema", "--components", "1", "--layers_per_block", "1", "--blocks", "2"],
     "VAE 'stabilityai/sd-vae-ft-ema' is not available offline"),
])
def test_cli_errors_are_one_line(argv, message):
    out = run_cli(*argv)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error")]) == 1


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
