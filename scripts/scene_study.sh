#!/usr/bin/env bash
# The dense study of the README ("Dense evaluation"): on the scene benchmark (datasets/scenes.py, built from the
# full Fashion-MNIST), pretrain the 3-stage demo Swin (experiments/cpu/swin_scenes.yaml: 4x4 region tokens per
# 64 px global crop) with the view loss only (V), view + region losses (V+R), and V then V+R
# (--pretrained_weights_ckpt) for the same number of steps, then evaluate random init and each teacher with
# the linear segmentation probe (mIoU, pixel accuracy), the correspondence score and the k-NN of the largest
# garment. Results in OUT/results.md.
#
#   bash scripts/scene_study.sh [OUT]        # EPOCHS=3 (250 steps of 16 each), V_THEN_VR_SPLIT=2 (V epochs)
#
# Pretraining takes the demo's settings (engine.args.DEMO_DEFAULTS) but for the loss and the epochs; a variant
# whose OUT/<variant>/checkpoint.pth exists is not pretrained again. EXTRA: more main_esvit.py flags; SCENES:
# more make_scenes.py flags (--garment_sizes, --garments_per_canvas, --seed); SEG: more eval_segmentation.py flags.
# PRETRAIN_SCENES: make_scenes.py flags of a separate set of train canvases to pretrain on (OUT/pretrain_data,
# e.g. "--garments_per_canvas 1 1 --num_train 16000 --seed 2": one garment each, object-centric like ImageNet)
# instead of the benchmark's own train canvases; the probes always train and test on the benchmark's scenes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/scenes}
EPOCHS=${EPOCHS:-3}
V_EPOCHS=${V_THEN_VR_SPLIT:-2}
NUM_TRAIN=${NUM_TRAIN:-4000}
NUM_VAL=${NUM_VAL:-1000}
SEG_EPOCHS=${SEG_EPOCHS:-50}
SEG_LR=${SEG_LR:-1.0}
VARIANTS=${VARIANTS:-"V VR VthenVR"}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a SCENES <<< "${SCENES:-}"      # more make_scenes.py flags, e.g. "--garment_sizes 32 56"
read -r -a SEG <<< "${SEG:-}"            # more eval_segmentation.py flags, e.g. "--n_last_blocks 6"
read -r -a PRETRAIN_SCENES <<< "${PRETRAIN_SCENES:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

python scripts/make_scenes.py --output_dir "$OUT/data" --source full --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" "${SCENES[@]}"
PRETRAIN_DATA=$OUT/data/pretrain
if [ ${#PRETRAIN_SCENES[@]} -gt 0 ]; then
    python scripts/make_scenes.py --output_dir "$OUT/pretrain_data" --source full --num_val 1 "${PRETRAIN_SCENES[@]}"
    PRETRAIN_DATA=$OUT/pretrain_data/pretrain
fi
MODEL=(--cfg experiments/cpu/swin_scenes.yaml --arch swin)
read -r -a DEMO <<< "$(python -c "
from engine import DEMO_DEFAULTS
print(' '.join(f'--{k} ' + ' '.join(map(str, v if isinstance(v, list) else [v]))
               for k, v in DEMO_DEFAULTS.items() if k not in ('use_dense_prediction', 'epochs')))")"
pretrain() {  # variant dense epochs [more flags]
    local variant=$1 dense=$2 epochs=$3; shift 3
    [ -f "$OUT/$variant/checkpoint.pth" ] && return
    python main_esvit.py "${MODEL[@]}" "${DEMO[@]}" --use_dense_prediction "$dense" --epochs "$epochs" \
        --data_path "$PRETRAIN_DATA" --knn_freq 0 --output_dir "$OUT/$variant" "${EXTRA[@]}" "$@" \
        > "$OUT/$variant.pretrain.log" 2>&1 || { tail -3 "$OUT/$variant.pretrain.log"; exit 1; }
    grep -E 'Training time' "$OUT/$variant.pretrain.log" | tail -1
}
for variant in $VARIANTS; do
    case $variant in
        V) pretrain V False "$EPOCHS" ;;
        VR) pretrain VR True "$EPOCHS" ;;
        VthenVR) pretrain V_first False "$V_EPOCHS"
                 pretrain VthenVR True $((EPOCHS - V_EPOCHS)) --pretrained_weights_ckpt "$OUT/V_first/checkpoint.pth" ;;
    esac
done

EVAL=(--image_size 64 --resize_size 64 --num_workers 2)
for variant in random $VARIANTS; do
    weights=()
    [ "$variant" != random ] && weights=(--pretrained_weights "$OUT/$variant/checkpoint.pth")
    dir=$OUT/eval_$variant
    [ -f "$dir/segmentation/segmentation.json" ] || python eval_segmentation.py "${MODEL[@]}" "${EVAL[@]}" \
        "${weights[@]}" --data_path "$OUT/data" --cache_features True --batch_size_per_gpu 64 \
        --epochs "$SEG_EPOCHS" --lr "$SEG_LR" --val_freq 100 --output_dir "$dir/segmentation" "${SEG[@]}" \
        > "$dir.seg.log" 2>&1
    [ -f "$dir/largest/measure_correspondence.json" ] || python run_analysis.py "${MODEL[@]}" "${weights[@]}" \
        --image_size 64 --data_path "$OUT/data/largest" --measure_correspondence True --num_workers 2 \
        --output_dir "$dir" > "$dir.corr.log" 2>&1
    [ -f "$dir/knn/knn.json" ] || python eval_knn.py "${MODEL[@]}" "${EVAL[@]}" "${weights[@]}" \
        --data_path "$OUT/data/largest" --nb_knn 20 --output_dir "$dir/knn" > "$dir.knn.log" 2>&1
done

python - "$OUT" random $VARIANTS <<'PY'
import json, sys
out, variants = sys.argv[1], sys.argv[2:]
names = {'random': 'random init', 'V': 'V (view)', 'VR': 'V+R (view + region)', 'VthenVR': 'V, then V+R'}
rows = ['| initialisation | mIoU | pixel acc. | correspondence acc. | position error (px) | k-NN top-1, largest garment |',
        '|---|---|---|---|---|---|']
for v in variants:
    seg = json.load(open(f'{out}/eval_{v}/segmentation/segmentation.json'))
    corr = json.load(open(f'{out}/eval_{v}/largest/measure_correspondence.json'))
    knn = json.load(open(f'{out}/eval_{v}/knn/knn.json'))['knn']['20']['top1']
    rows.append(f"| {names.get(v, v)} | {seg['miou']:.2f} | {seg['pixel_acc']:.2f} | {corr['accuracy']:.4f} | "
                f"{corr['position_error_px']:.2f} | {knn:.2f} |")
open(f'{out}/results.md', 'w').write('\n'.join(rows) + '\n')
print('\n'.join(rows))
PY
