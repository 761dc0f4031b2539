#!/usr/bin/env bash
# Multi-node EsViT pretraining: the original's Swin-S/14 run on NUM_NODES x GPUS_PER_NODE GPUs (default 2 x 16,
# 16 images per GPU), V+R continued from the epoch-200 checkpoint of a V run (INIT_CKPT; unset: from scratch).
# Run it once on every node:
#
#   mpirun -np 2 -npernode 1 -x MASTER_ADDR=node0 -x DATA_PATH -x OUT_PATH bash scripts/pretrain_multinode.sh
#   srun --nodes 2 --ntasks-per-node 1 bash scripts/pretrain_multinode.sh     # node 0 of the job hosts
#   NODE_RANK=1 MASTER_ADDR=node0 DATA_PATH=... OUT_PATH=... bash scripts/pretrain_multinode.sh   # by hand
#
# OUT_PATH must be shared by the nodes. A failed worker restarts all of them (MAX_RESTARTS, default 3) from
# checkpoint.pth, written every 1000 steps inside an epoch; SIGTERM saves one and stops. Further arguments go to
# main_esvit.py (--dry_run prints the command only).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_PATH:?set DATA_PATH to the training images (a zip of class folders here, as the original)}"
: "${OUT_PATH:?set OUT_PATH to the output folder, on storage shared by the nodes}"
DEFAULT_ARCH=swin_small
CFG=${CFG-experiments/imagenet/swin/swin_small_patch4_window14_224.yaml}
source scripts/common.sh
ARGS=(--data_path "$DATA_PATH" --output_dir "$OUT_PATH" --use_dense_prediction "${DENSE:-True}" --zip_mode True
      --batch_size_per_gpu 16 --epochs 300 --teacher_temp 0.07 --warmup_epochs 10 --warmup_teacher_temp_epochs 30
      --norm_last_layer false --saveckp_iters 1000)
if [ -n "${INIT_CKPT:-}" ]; then
    ARGS+=(--pretrained_weights_ckpt "$INIT_CKPT")
fi
set -x
python main_esvit_mnodes.py --num_nodes "${NUM_NODES:-2}" --num_gpus_per_node "${GPUS_PER_NODE:-16}" \
    --max_restarts "${MAX_RESTARTS:-3}" "${MODEL_ARGS[@]}" "${ARGS[@]}" "$@" MODEL.NUM_CLASSES 0
