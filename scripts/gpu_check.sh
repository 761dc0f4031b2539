#!/usr/bin/env bash
# The GPU check, for the day a GPU is lent (at most about 8 minutes on one GPU):
#   1. scripts/benchmark.py sweep, Swin-T V+R, batch 32, 2 x 224 + 8 x 96, out_dim 65536: fp16 + GradScaler,
#      bf16, fp32, each with torch.compile off and on: images/s, MFU against the GPU's dense bf16 peak, peak memory
#   2. a 1-GPU NCCL run of the demo (torchrun, 1 epoch of the embedded Fashion-MNIST subset)
#   3. eval_knn.py of that checkpoint on the GPU
#   4. the colour steps of --colour_augment_on device (the default on CUDA) on the GPU: images/s at batch 32
# One line per figure on stdout and everything in $OUT_PATH/gpu_check.json:
#
#   OUT_PATH=output/gpu_check bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --dry_run     # the same steps on the CPU with tiny sizes (tests/test_benchmark.py)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry_run) DRY_RUN=1 ;;
        *) echo "gpu_check.sh: unknown argument $arg (only --dry_run)" >&2; exit 2 ;;
    esac
done
OUT_PATH=${OUT_PATH:-output/gpu_check}
mkdir -p "$OUT_PATH"
BUDGET_S=${BUDGET_S:-420}   # the sweep stops starting rows after this; the demo and k-NN take the rest

if [ "$DRY_RUN" = 1 ]; then
    # tiny sizes on the CPU: every step runs, no figure means anything
    BENCH=(--arch swin --cfg experiments/cpu/swin_demo.yaml --batch_size 2 --global_size 32 --local_size 16
           --local_crops_number 2 --out_dim 64 --steps 1 --warmup 1)
    PRECISIONS=(bf16 fp32)     # fp16 needs CUDA
    COMPILES=(False)           # compiling takes minutes on a CPU
    DATA_PATH="$OUT_PATH/tiny_data"
    python - "$DATA_PATH" <<'EOF'
import os, shutil, sys
sys.path.insert(0, '.')
from datasets import demo_data_path
for split in ('train', 'val'):  # 3 images of each of the 10 classes
    source = demo_data_path(split)
    for name in sorted(os.listdir(source)):
        os.makedirs(os.path.join(sys.argv[1], split, name), exist_ok=True)
        for image in sorted(os.listdir(os.path.join(source, name)))[:3]:
            shutil.copy(os.path.join(source, name, image), os.path.join(sys.argv[1], split, name, image))
EOF
    DEMO=(--data_path "$DATA_PATH/train" --arch swin --cfg experiments/cpu/swin_demo.yaml --out_dim 256
          --head_hidden_dim 64 --head_bottleneck_dim 32 --local_crops_number 2 --local_crops_size 32
          --batch_size_per_gpu 4 --num_workers 0 --epochs 1 --warmup_epochs 0 --saveckp_freq 0)
    KNN=(--data_path "$DATA_PATH" --image_size 64 --nb_knn 5 --batch_size_per_gpu 8 --num_workers 0)
    COLOUR=(--device_stage cpu --batch_size 2 --global_size 32 --local_size 16 --local_crops_number 2 --passes 1)
else
    BENCH=(--arch swin_tiny --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --batch_size 32
           --global_size 224 --local_size 96 --local_crops_number 8 --out_dim 65536 --steps 10 --warmup 5)
    PRECISIONS=(fp16 bf16 fp32)
    COMPILES=(False True)
    DEMO=(--epochs 1 --num_workers 8)
    KNN=(--num_workers 8)
    COLOUR=(--device_stage cuda --batch_size 32 --passes 20)
fi

# 1. the benchmark sweep (compile off first: those rows are the cheap ones)
for compile in "${COMPILES[@]}"; do
    for precision in "${PRECISIONS[@]}"; do
        if [ "$SECONDS" -ge "$BUDGET_S" ]; then
            echo "bench $precision compile=$compile: skipped (the ${BUDGET_S}-s sweep budget is spent)"
            continue
        fi
        row="$OUT_PATH/bench_${precision}_compile${compile}.json"
        if ! timeout $((BUDGET_S + 60 - SECONDS)) python scripts/benchmark.py "${BENCH[@]}" --precision "$precision" \
                --compile "$compile" --json "$row" MODEL.NUM_CLASSES 0 > "$row.log" 2>&1; then
            echo "bench $precision compile=$compile: failed or timed out (see $row.log)"
            rm -f "$row"
        fi
    done
done

# 2. the demo, one process through torchrun: NCCL on a GPU (gloo on the CPU)
torchrun --standalone --nproc_per_node=1 main_esvit.py "${DEMO[@]}" --output_dir "$OUT_PATH/demo" \
    > "$OUT_PATH/demo.log" 2>&1 || echo "demo: failed (see $OUT_PATH/demo.log)"

# 3. k-NN of the demo's teacher
python eval_knn.py --pretrained_weights "$OUT_PATH/demo/checkpoint.pth" "${KNN[@]}" \
    --output_dir "$OUT_PATH/knn" > "$OUT_PATH/knn.log" 2>&1 || echo "knn: failed (see $OUT_PATH/knn.log)"

# 4. the views' colour steps on the device
python scripts/bench_data.py "${COLOUR[@]}" --json "$OUT_PATH/device_colour.json" > "$OUT_PATH/device_colour.log" 2>&1 \
    || echo "device colour: failed (see $OUT_PATH/device_colour.log)"

# the figures, one per line, and gpu_check.json
python - "$OUT_PATH" <<'EOF'
import glob, json, os, sys
import torch
out = sys.argv[1]
# dense bf16 tensor-core peaks (FLOP/s, no sparsity) of the GPUs a lender may have; else the bf16 matmul peak
# scripts/benchmark.py measured on the device
BF16_PEAK = {'B200': 2250e12, 'H200': 989e12, 'H100': 989e12, 'H800': 989e12, 'A100': 312e12, 'A800': 312e12,
             'L40S': 362e12, 'L4': 121e12, 'A10': 125e12, 'RTX 4090': 165e12, 'V100': 125e12}
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
rows = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, 'bench_*.json')))]
peak = next((flops for key, flops in BF16_PEAK.items() if key in name), None)
peak_source = f'{name} datasheet'
if peak is None:
    measured = [r['matmul_peak_gflops'] * 1e9 for r in rows if r['precision'].endswith('bf16')]
    peak, peak_source = (max(measured), 'measured bf16 matmul') if measured else (None, 'none')
summary = {'device': name, 'bf16_peak_tflops': peak and peak / 1e12, 'peak_source': peak_source, 'bench': []}
for r in rows:
    mfu = r['gflop_per_step'] * 1e9 / r['seconds_per_step'] / peak if peak else None
    summary['bench'].append({**r, 'mfu_vs_bf16_peak': mfu})
    print(f"bench {r['precision']} compile={r['compile']}: {r['images_per_s']:.1f} images/s, "
          f"MFU {100 * mfu:.1f} % of {peak / 1e12:.3g} TFLOP/s bf16, peak memory {r['peak_memory_mb']:.0f} MB"
          if mfu is not None else f"bench {r['precision']} compile={r['compile']}: {r['images_per_s']:.1f} images/s")
log = os.path.join(out, 'demo', 'log.txt')
if os.path.isfile(log):
    last = json.loads(open(log).read().strip().splitlines()[-1])
    summary['demo'] = last
    print(f"demo (1-GPU torchrun): epoch {last.get('epoch')}, train loss {last.get('train_loss', float('nan')):.4f}")
knn = os.path.join(out, 'knn', 'knn.json')
if os.path.isfile(knn):
    summary['knn'] = json.load(open(knn))
    for k, acc in summary['knn']['knn'].items():
        print(f"knn k={k}: top-1 {acc['top1']:.2f} %")
colour = os.path.join(out, 'device_colour.json')
if os.path.isfile(colour):
    summary['device_colour'] = json.load(open(colour))
    print(f"colour steps on the device ({summary['device_colour']['crops']}, batch "
          f"{summary['device_colour']['batch_size']}): {summary['device_colour']['images_per_s']:.0f} images/s")
with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
    json.dump(summary, f, indent=1)
print(f"gpu_check.json: {os.path.join(out, 'gpu_check.json')}")
EOF
