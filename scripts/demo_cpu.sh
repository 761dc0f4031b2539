#!/usr/bin/env bash
# The CPU demo, no GPU or download: pretrain the small Swin (experiments/cpu/swin_demo.yaml) on the embedded
# Fashion-MNIST subset (2,000 train images; EPOCHS, default 5), then its k-NN accuracy and a linear probe
# (on cached features) on the embedded 1,000 val images:
#
#   OUT_PATH=output/demo bash scripts/demo_cpu.sh
#
# The data are the embedded demo split (main_esvit.py's defaults when --cfg, --arch and --data_path are unset).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_PATH=${OUT_PATH:-output/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set -x
python main_esvit.py --output_dir "$OUT_PATH" --epochs "${EPOCHS:-5}"
python eval_knn.py --pretrained_weights "$OUT_PATH/checkpoint.pth" --output_dir "$OUT_PATH/knn"
python eval_linear.py --pretrained_weights "$OUT_PATH/checkpoint.pth" --output_dir "$OUT_PATH/linear" \
    --cache_features True
