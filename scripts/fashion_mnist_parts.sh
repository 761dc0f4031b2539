#!/usr/bin/env bash
# Demo settings chosen on one part of Fashion-MNIST and reported on the other (README, "Dense evaluation"):
# part A = classes 0-4 (t-shirt/top, trouser, pullover, dress, coat), part B = classes 5-9 (sandal, shirt,
# sneaker, bag, ankle boot). Pretrains the demo model (experiments/cpu/swin_demo.yaml, engine.args.DEMO_DEFAULTS
# + EXTRA flags) on the first 1,000 train images of each class of the part, V and V+R, then the 20-NN top-1 of
# random init and both teachers on the part's 5,000 test images (bank: the 5,000 pretraining images).
#
#   PART=A EXTRA="--teacher_temp 0.02" NAME=tt02 bash scripts/fashion_mnist_parts.sh [OUT]
#
# Needs apt-get install dataset-fashion-mnist. EPOCHS (default 1: 313 steps of 16), VARIANTS (default "V VR").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/fashion_mnist_parts}
PART=${PART:-A}
NAME=${NAME:-demo}
EPOCHS=${EPOCHS:-1}
VARIANTS=${VARIANTS:-"V VR"}
read -r -a EXTRA <<< "${EXTRA:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

python - "$OUT" <<'PY'
import sys
from pathlib import Path
from datasets import FASHION_MNIST_CLASSES, fashion_mnist_folder
out = Path(sys.argv[1])
train = fashion_mnist_folder(None, 'train', out / 'all_train', per_class=1000)
test = fashion_mnist_folder(None, 'test', out / 'all_test')
for part, classes in (('A', range(5)), ('B', range(5, 10))):
    for source, split in ((train, 'train'), (test, 'val')):
        for c in classes:
            link = out / part / split / FASHION_MNIST_CLASSES[c]
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((source / FASHION_MNIST_CLASSES[c]).resolve())
PY
DATA=$OUT/$PART
MODEL=(--cfg experiments/cpu/swin_demo.yaml --arch swin)
read -r -a DEMO <<< "$(python -c "
from engine import DEMO_DEFAULTS
print(' '.join(f'--{k} ' + ' '.join(map(str, v if isinstance(v, list) else [v]))
               for k, v in DEMO_DEFAULTS.items() if k not in ('use_dense_prediction', 'epochs')))")"
for variant in $VARIANTS; do
    run=$OUT/$PART/$NAME/$variant
    dense=$([ "$variant" = VR ] && echo True || echo False)
    mkdir -p "$OUT/$PART/$NAME"
    [ -f "$run/checkpoint.pth" ] || python main_esvit.py "${MODEL[@]}" "${DEMO[@]}" --use_dense_prediction "$dense" \
        --epochs "$EPOCHS" --data_path "$DATA/train" --knn_freq 0 --output_dir "$run" "${EXTRA[@]}" > "$run.log" 2>&1 \
        || { tail -3 "$run.log"; exit 1; }
done
for variant in random $VARIANTS; do
    weights=()
    eval_dir=$OUT/$PART/$NAME/knn_$variant
    if [ "$variant" = random ]; then eval_dir=$OUT/$PART/knn_random; else weights=(--pretrained_weights "$OUT/$PART/$NAME/$variant/checkpoint.pth"); fi
    [ -f "$eval_dir/knn.json" ] || python eval_knn.py "${MODEL[@]}" "${weights[@]}" --data_path "$DATA" --image_size 64 \
        --nb_knn 20 --num_workers 2 --batch_size_per_gpu 128 --output_dir "$eval_dir" > "$eval_dir.log" 2>&1
    losses=$([ "$variant" = random ] || grep -o 'loss: [0-9.]* ([0-9.]*)' "$OUT/$PART/$NAME/$variant.log" | tail -1)
    echo "part $PART, $NAME, $variant: k-NN top-1 $(python -c "import json; print(json.load(open('$eval_dir/knn.json'))['knn']['20']['top1'])") $losses"
done
