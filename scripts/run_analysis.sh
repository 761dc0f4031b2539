#!/usr/bin/env bash
# Analysis of a pretrained backbone (the teacher of CKPT_PATH):
#   IMG_PATH set:  attention maps and view-to-view correspondences of that image,
#   DATA_PATH set: the correspondence score over the images of that folder;
#
#   IMG_PATH=dog.jpg CKPT_PATH=output/swin_tiny/checkpoint.pth OUT_PATH=output/analysis bash scripts/run_analysis.sh
#   DATA_PATH=imagewoof/val CKPT_PATH=... OUT_PATH=... bash scripts/run_analysis.sh
#
# ARCH / CFG as in scripts/pretrain.sh (default: the checkpoint's model); SEED (default 8) draws the random views.
# Further arguments go to run_analysis.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CKPT_PATH:?set CKPT_PATH to the pretraining checkpoint}"
: "${OUT_PATH:?set OUT_PATH to the output folder}"
if [ -z "${IMG_PATH:-}" ] && [ -z "${DATA_PATH:-}" ]; then
    echo "set IMG_PATH (an image to draw) and/or DATA_PATH (images to score)" >&2
    exit 2
fi
source scripts/common.sh
COMMON=("${MODEL_ARGS[@]}" --pretrained_weights "$CKPT_PATH" --output_dir "$OUT_PATH" --learning ssl
        --seed "${SEED:-8}")
set -x
if [ -n "${IMG_PATH:-}" ]; then
    python run_analysis.py "${COMMON[@]}" --image_path "$IMG_PATH" --vis_attention True --vis_correspondence True \
        "$@" MODEL.NUM_CLASSES 0
fi
if [ -n "${DATA_PATH:-}" ]; then
    python run_analysis.py "${COMMON[@]}" --data_path "$DATA_PATH" --measure_correspondence True \
        "$@" MODEL.NUM_CLASSES 0
fi
