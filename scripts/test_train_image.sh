#!/usr/bin/env bash
# A dry run of training from the official 3B text-to-image weights: --dry_run 1 takes one step, samples, saves nothing.
#   bash scripts/test_train_image.sh [epochs] [global_batch_size] [config]      NGPUS=1 bash scripts/...
set -euo pipefail
cd "$(dirname "$0")/.."

ckpt=ckpts/starflow_3B_t2i_256x256.pth
epochs=${1:-10}
batch_size=${2:-16}
config_path=${3:-configs/starflow_3B_t2i_256x256.yaml}
ngpus=${NGPUS:-8}

if [[ ! -f "$ckpt" ]]; then
    echo "error: $ckpt not found: put the official checkpoint there (from the Hugging Face Hub: apple/starflow)" >&2
    exit 1
fi

echo "config=$config_path"
echo "epochs=$epochs"
echo "global_batch_size=$batch_size"
echo "gpus=$ngpus"

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
torchrun --standalone --nproc_per_node "$ngpus" train.py \
    --model_config_path "$config_path" \
    --resume_path "$ckpt" \
    --epochs "$epochs" \
    --batch_size "$batch_size" \
    --epoch_length 100000 \
    --dry_run 1 \
    --wandb_name test_run
