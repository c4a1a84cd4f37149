#!/usr/bin/env bash
# Sample the official 3B text-to-image model (256x256) with Jacobi decoding.
#   bash scripts/test_sample_image.sh [caption] [input_image|none]      NGPUS=4 bash scripts/test_sample_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ckpt=ckpts/starflow_3B_t2i_256x256.pth
cap=${1:-"a film still of a cat playing piano"}
input_image=${2:-none}
ngpus=${NGPUS:-1}

if [[ ! -f "$ckpt" ]]; then
    echo "error: $ckpt not found: put the official checkpoint there (from the Hugging Face Hub: apple/starflow)" >&2
    exit 1
fi

echo "caption=$cap"
echo "input_image=$input_image"
echo "gpus=$ngpus"

extra=()
if [[ "$input_image" != none ]]; then
    extra=(--input_image "$input_image")
fi

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
torchrun --standalone --nproc_per_node "$ngpus" sample.py \
    --model_config_path configs/starflow_3B_t2i_256x256.yaml \
    --checkpoint_path "$ckpt" \
    --caption "$cap" --sample_batch_size 8 --cfg 3.6 --aspect_ratio 1:1 \
    --seed 999 --save_folder 1 \
    --finetuned_vae none --jacobi 1 --jacobi_th 0.001 --jacobi_block_size 16 \
    ${extra[@]+"${extra[@]}"}  # empty-array form that bash 3.2 (macOS) accepts under set -u
