"""Generate images or videos from text (and optionally a first frame) with a STARFlow / STARFlow-V model.

    python sample.py --checkpoint_path logs/run/model.safetensors --caption "a small red circle left"
    python sample.py --model_config_path configs/starflow_3B_t2i_256x256.yaml \\
        --checkpoint_path ckpts/starflow_3B_t2i_256x256.pth --caption prompts.txt --save_folder 1
    torchrun --nproc_per_node N sample.py ...            # the captions are split across the processes

Our checkpoints (exported .safetensors, or training checkpoint folders) carry their model configuration and input
flags, so they need no --model_config_path; an official .pth needs its YAML.  --caption is a caption, a template
name, or a .txt file with one caption per line.  Outputs go to <logdir>/<checkpoint stem>/: a PNG grid (MP4 for
video) per batch, or, with a caption file and --save_folder 1, one file per line named by its line index.

Decoding uses the plan calibrated for the checkpoint on this device type (<checkpoint stem>.decoding.json beside it),
else the default plan; `--jacobi 0` decodes exactly (sequentially), any --jacobi_* flag runs that Jacobi iteration in
every block.  Each sample depends on its seed, caption and settings only, not on its batch or process.

    python sample.py --checkpoint_path X --caption caps.txt --calibrate_decoding 8   # calibrate and store a plan
"""
from pathlib import Path

from utils.config import SAMPLING_GROUPS, ConfigError, build_parser, parse_config, run_cli

GROUPS = SAMPLING_GROUPS


def main(argv=None):
    parser = build_parser(*GROUPS, description=__doc__)
    known, _ = parser.parse_known_args(argv)  # --help and flag errors answer before torch is imported
    if known.checkpoint_path is None:
        raise ConfigError("--checkpoint_path is required")
    if not Path(known.checkpoint_path).exists():
        raise FileNotFoundError(f"--checkpoint_path {known.checkpoint_path}: no such file or folder")
    from utils.model_setup import stored_metadata
    from utils.sampling import sample

    sample(parse_config(parser, argv, stored_metadata(known.checkpoint_path), known.checkpoint_path))


if __name__ == "__main__":
    run_cli(main)
