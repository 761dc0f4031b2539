#!/usr/bin/env bash
# Weighted k-NN (k = 10, 20, 100, 200) on the frozen teacher backbone of a pretraining checkpoint:
#
#   DATA_PATH=imagenet CKPT_PATH=output/swin_tiny/checkpoint.pth OUT_PATH=output/swin_tiny/knn \
#       bash scripts/eval_knn.sh
#
# DATA_PATH holds train/ (the bank) and val/. ARCH / CFG as in scripts/pretrain.sh (default: the checkpoint's
# model); GPUS processes (default: every GPU; GPUS=1 on a CPU). The features are saved under OUT_PATH/features;
# further arguments go to eval_knn.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
require_eval_inputs
set -x
torchrun --standalone --nproc_per_node="${GPUS:-gpu}" eval_knn.py "${MODEL_ARGS[@]}" --data_path "$DATA_PATH" \
    --pretrained_weights "$CKPT_PATH" --checkpoint_key teacher --batch_size_per_gpu 256 \
    --dump_features "$OUT_PATH/features" --output_dir "$OUT_PATH" "$@" MODEL.NUM_CLASSES 0
