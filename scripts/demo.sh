#!/usr/bin/env bash
# The first minutes with STARFlow: set up .venv (if missing), then sample the two small models bundled in ckpts/
# (text -> MiniLM -> flow -> shapes autoencoder's decoder): a grid of images and a video, both from captions.
#
#   bash scripts/demo.sh [OUTDIR]      # default: outputs/ in the repository
#
# Nothing is downloaded but the Python packages of the first run; the models, the autoencoder and the text encoder
# (all-MiniLM-L6-v2, a PyPI package) are local.
set -euo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/../outputs}")
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
mkdir -p "$out"

cat > "$out/image_captions.txt" <<'EOF'
a big red circle in the middle
a small blue square on the left
there is a large green triangle at the top
a little yellow ball on the right
a big purple box near the bottom
a small orange triangle in the center
a large blue dot to the left
top: a small red square
a big golden wedge on the right-hand side
a little green circle at the bottom
an orange block in the middle, large
a small purple triangle on the left
EOF
cat > "$out/video_captions.txt" <<'EOF'
a red ball moving to the right
a blue square falling
there is a green triangle heading to the left
a yellow circle going up
EOF

echo "== text to image: 12 captions, one grid"
python sample.py --checkpoint_path ckpts/starflow_shapes_t2i_32x32.safetensors \
    --caption "$out/image_captions.txt" --sample_batch_size 12 --logdir "$out"
echo "== text to video: 4 captions, one video of a 2x2 grid (4 frames at 4 fps)"
# --seed 0: the model shipped before 2026-12-08 drew the yellow circle's first frame orange at the default seed (191);
# about 5% of this model's videos have a frame off their colour or shape (seeds 0 and 191 draw all four right)
python sample.py --checkpoint_path ckpts/starflow-v_shapes_t2v_32x32.safetensors \
    --caption "$out/video_captions.txt" --sample_batch_size 4 --seed 0 --logdir "$out"

echo
echo "demo outputs (captions in reading order, left to right, top to bottom):"
echo "  images:  $out/starflow_shapes_t2i_32x32/image_captions-00000.png   ($out/image_captions.txt)"
echo "  video:   $out/starflow-v_shapes_t2v_32x32/video_captions-00000.mp4   ($out/video_captions.txt)"
echo "in a browser: .venv/bin/python -m scripts.web_demo   (then open http://127.0.0.1:7860)"
