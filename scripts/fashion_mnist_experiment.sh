#!/usr/bin/env bash
# Fashion-MNIST: k-NN (k=20) and linear-probe top-1 on the 10,000 test images of the demo Swin, randomly
# initialised and pretrained with EsViT's view-level loss only (V) or view + region losses (V+R).
#
#   apt-get install dataset-fashion-mnist && bash scripts/fashion_mnist_experiment.sh [OUT]
#
# Pretraining uses the demo settings (engine.args.DEMO_DEFAULTS, listed in the README's Fashion-MNIST section;
# --precision auto, workers at nice 19) on the first PRETRAIN_PER_CLASS train images of each class: 10,000
# images x 7 epochs for V (4,375 steps) and x 6 epochs for V+R (3,750 steps; its region loss makes a step ~20 %
# slower), so that each usually fits its 15 minutes on 2 idle cores of an AMD EPYC (bf16 there) and its cosine
# schedules run to their end (V: 14 min 13 s in one run, stopped 97-99 % through its last epoch in others). A
# run still going after PRETRAIN_MINUTES is stopped with SIGTERM, which saves its checkpoint (the pretraining
# log says where it stopped); a variant whose OUT/<variant>/checkpoint.pth exists is not pretrained again (a
# fresh OUT starts over). The k-NN bank and the linear probe's training set are the first TRAIN_PER_CLASS train
# images of each class (default: all 60,000), the test set the first TEST_PER_CLASS test images of each class
# (default: all 10,000); the probe trains on cached features (--cache_features True). The table is written to
# OUT/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/fashion_mnist}
PRETRAIN_PER_CLASS=${PRETRAIN_PER_CLASS:-1000}
EPOCHS_V=${EPOCHS_V:-7}
EPOCHS_VR=${EPOCHS_VR:-6}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-15}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-}
TEST_PER_CLASS=${TEST_PER_CLASS:-}
PROBE_EPOCHS=${PROBE_EPOCHS:-100}
PROBE_LR=${PROBE_LR:-0.1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

MODEL=(--cfg experiments/cpu/swin_demo.yaml --arch swin_tiny)
EVAL=(--data_path "$OUT/data" --image_size 64 --num_workers 2 --batch_size_per_gpu 128)

python - "$OUT" "$PRETRAIN_PER_CLASS" "$TRAIN_PER_CLASS" "$TEST_PER_CLASS" <<'EOF'
import sys
from datasets import fashion_mnist_folder
out, pretrain, train, test = sys.argv[1], *(int(n) if n else None for n in sys.argv[2:])
fashion_mnist_folder(None, 'train', f'{out}/pretrain', per_class=pretrain)
fashion_mnist_folder(None, 'train', f'{out}/data/train', per_class=train)
fashion_mnist_folder(None, 'test', f'{out}/data/val', per_class=test)
EOF

# the demo's settings as flags, but for the loss variant and the length of the run
read -r -a DEMO <<< "$(python -c "
from engine import DEMO_DEFAULTS
print(' '.join(f'--{k} ' + ' '.join(map(str, v if isinstance(v, list) else [v]))
               for k, v in DEMO_DEFAULTS.items() if k not in ('use_dense_prediction', 'epochs')))")"

for variant in V VR; do
    [ -f "$OUT/$variant/checkpoint.pth" ] && continue
    case $variant in
        V) dense=False epochs=$EPOCHS_V ;;
        VR) dense=True epochs=$EPOCHS_VR ;;
    esac
    status=0
    timeout -s TERM "${PRETRAIN_MINUTES}m" python main_esvit.py "${MODEL[@]}" "${DEMO[@]}" \
        --use_dense_prediction "$dense" --data_path "$OUT/pretrain" --epochs "$epochs" \
        --output_dir "$OUT/$variant" > "$OUT/$variant.pretrain.log" 2>&1 || status=$?
    [ "$status" = 0 ] || [ "$status" = 124 ] || { tail -3 "$OUT/$variant.pretrain.log"; exit "$status"; }
    grep -E 'Averaged stats|Training time|stopped by' "$OUT/$variant.pretrain.log" | tail -2
done

for variant in random V VR; do
    weights=()
    [ "$variant" != random ] && weights=(--pretrained_weights "$OUT/$variant/checkpoint.pth")
    python eval_knn.py "${MODEL[@]}" "${EVAL[@]}" "${weights[@]}" --nb_knn 20 \
        --output_dir "$OUT/eval_$variant/knn" > "$OUT/eval_$variant.knn.log" 2>&1
    python eval_linear.py "${MODEL[@]}" "${EVAL[@]}" "${weights[@]}" --cache_features True \
        --epochs "$PROBE_EPOCHS" --lr "$PROBE_LR" --val_freq 10 --output_dir "$OUT/eval_$variant/linear" \
        > "$OUT/eval_$variant.linear.log" 2>&1
done

python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = ['| initialisation | k-NN top-1 (k=20) | linear probe top-1 (last epoch) |', '|---|---|---|']
names = {'random': 'random init', 'V': 'EsViT V (view)', 'VR': 'EsViT V+R (view + region)'}
for variant, name in names.items():
    knn = json.load(open(f'{out}/eval_{variant}/knn/knn.json'))['knn']['20']['top1']
    log = [json.loads(line) for line in open(f'{out}/eval_{variant}/linear/log.txt')]
    rows.append(f'| {name} | {knn:.2f} | {log[-1]["test_acc1"]:.2f} |')
open(f'{out}/results.md', 'w').write('\n'.join(rows) + '\n')
print('\n'.join(rows))
EOF
