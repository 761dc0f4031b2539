#!/usr/bin/env bash
# Linear probe on the frozen teacher backbone (features of the last 4 blocks, 100 epochs, 1000 classes):
#
#   DATA_PATH=imagenet CKPT_PATH=output/swin_tiny/checkpoint.pth OUT_PATH=output/swin_tiny/lincls \
#       bash scripts/eval_linear.sh
#
# DATA_PATH holds train/ and val/. ARCH / CFG as in scripts/pretrain.sh (default: the checkpoint's model); GPUS
# processes (default: every GPU; GPUS=1 on a CPU); NUM_LABELS classes (default 1000). Rerunning resumes; further
# arguments go to eval_linear.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
require_eval_inputs
set -x
torchrun --standalone --nproc_per_node="${GPUS:-gpu}" eval_linear.py "${MODEL_ARGS[@]}" --data_path "$DATA_PATH" \
    --pretrained_weights "$CKPT_PATH" --checkpoint_key teacher --batch_size_per_gpu 256 --n_last_blocks 4 \
    --num_labels "${NUM_LABELS:-1000}" --output_dir "$OUT_PATH" "$@" MODEL.NUM_CLASSES 0
