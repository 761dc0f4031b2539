#!/usr/bin/env bash
# One-node EsViT pretraining with the original's ImageNet recipe (300 epochs, 32 images per GPU, lr 5e-4 x
# batch / 256 after 10 warm-up epochs, teacher temperature 0.04 -> 0.07 over 30 epochs) on all GPUs of this node:
#
#   DATA_PATH=imagenet/train OUT_PATH=output/swin_tiny bash scripts/pretrain.sh                # Swin-T/7, V+R
#   ARCH=swin_small CFG=experiments/imagenet/swin/swin_small_patch4_window14_224.yaml ...     # Swin-S/14
#   ARCH=cvt_tiny ... | ARCH=vil_2262 ... | ARCH=resnet50 ...                                 # CvT, ViL, ResNet-50
#   DENSE=False ...                                       # V: the view-level loss only
#   DENSE=True INIT_CKPT=output/v/checkpoint0200.pth ...  # V+R continued from a V checkpoint (the original's
#                                                         # "continued_from0200_dense" runs)
#
# GPUS sets the processes (default: every visible GPU); further arguments go to main_esvit.py (e.g.
# --accum_iter 2, --saveckp_iters 1000, --dry_run to print the command only). Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_PATH:?set DATA_PATH to the training images (class folders; a zip with --zip_mode True)}"
: "${OUT_PATH:?set OUT_PATH to the output folder}"
DEFAULT_ARCH=swin_tiny
source scripts/common.sh
ARGS=(--data_path "$DATA_PATH" --output_dir "$OUT_PATH" --use_dense_prediction "${DENSE:-True}"
      --batch_size_per_gpu 32 --epochs 300 --teacher_temp 0.07 --warmup_epochs 10 --warmup_teacher_temp_epochs 30
      --norm_last_layer false --aug-opt dino_aug)
if [ -n "${INIT_CKPT:-}" ]; then
    ARGS+=(--pretrained_weights_ckpt "$INIT_CKPT")
fi
if [ -n "${GPUS:-}" ]; then
    ARGS+=(--num_gpus_per_node "$GPUS")
fi
set -x
python main_esvit_mnodes.py "${MODEL_ARGS[@]}" "${ARGS[@]}" "$@" MODEL.NUM_CLASSES 0
