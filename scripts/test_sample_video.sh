#!/usr/bin/env bash
# Sample the official 7B text-to-video model (480p, 16 fps) with Jacobi decoding; an input image makes it
# image-to-video.
#   bash scripts/test_sample_video.sh [caption] [input_image|none] [target_length]      NGPUS=1 bash scripts/...
# target_length: frames, 81 by default (about 5 s at 16 fps); longer ones such as 161, 241 or 481 also work.
set -euo pipefail
cd "$(dirname "$0")/.."

ckpt=ckpts/starflow-v_7B_t2v_caus_480p_v3.pth
cap=${1:-"a corgi dog looks at the camera"}
input_image=${2:-none}
target_length=${3:-81}
ngpus=${NGPUS:-8}

if [[ ! -f "$ckpt" ]]; then
    echo "error: $ckpt not found: put the official checkpoint there (from the Hugging Face Hub: apple/starflow)" >&2
    exit 1
fi

echo "caption=$cap"
echo "input_image=$input_image"
echo "target_length=$target_length"
echo "gpus=$ngpus"

extra=()
if [[ "$input_image" != none ]]; then
    extra=(--input_image "$input_image")
fi

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
torchrun --standalone --nproc_per_node "$ngpus" sample.py \
    --model_config_path configs/starflow-v_7B_t2v_caus_480p.yaml \
    --checkpoint_path "$ckpt" \
    --caption "$cap" --sample_batch_size 1 --cfg 3.5 --aspect_ratio 16:9 --seed 99 --out_fps 16 \
    --save_folder 1 --jacobi 1 --jacobi_th 0.001 \
    --finetuned_vae none --disable_learnable_denoiser 0 \
    --jacobi_block_size 32 \
    --target_length "$target_length" \
    ${extra[@]+"${extra[@]}"}  # empty-array form that bash 3.2 (macOS) accepts under set -u
