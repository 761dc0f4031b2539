"""Time the real EsViT training step of main_esvit.py (the same Trainer, not a copy), with main_esvit.py's
defaults (--precision auto, --malloc auto, --flush_denormal True) unless told otherwise.

    python scripts/benchmark.py --arch swin_tiny --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml \\
        --batch_size 4 --global_size 224 --local_size 96 --local_crops_number 8 --out_dim 65536 \\
        --use_dense_prediction True --steps 5 --warmup 2 --json bench.json MODEL.NUM_CLASSES 0
    python scripts/benchmark.py --sweep --json sweep.json ...    # a markdown table over precisions and options

Reports images/s, seconds per step split into forward (student + teacher + loss) / backward / optimizer (clip,
step, EMA), process CPU seconds and minor page faults per step, the allocator, threads and precision used,
peak memory in MB (RSS on CPU, max allocated on CUDA), FLOPs per step (torch.utils.flop_counter) and the
fraction of a matmul peak measured here on the same device and precision. The data pipeline: bench_data.py.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from bench_common import matmul_peak, peak_memory_mb, synthetic_crops, time_steps  # noqa: E402
from config import load_config  # noqa: E402
from datasets import BoxedViews, matches_by_position  # noqa: E402
from engine import build_trainer, parse_args  # noqa: E402
from engine.args import get_args_parser  # noqa: E402

TRAIN_DEFAULTS = get_args_parser()  # main_esvit.py's defaults: the benchmark times the step a training run takes


def get_args():
    p = argparse.ArgumentParser('EsViT training-step benchmark', formatter_class=utils.HelpFormatter)
    p.add_argument('--arch', default='swin_tiny', help="as main_esvit.py's --arch")
    p.add_argument('--cfg', default='experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml',
                   help="as main_esvit.py's --cfg ('' for none)")
    p.add_argument('--batch_size', type=int, default=4, help='images per step')
    p.add_argument('--global_size', type=int, default=224, help='side of the 2 global crops')
    p.add_argument('--local_size', type=int, nargs='+', default=[96], help='sides of the local crops')
    p.add_argument('--local_crops_number', type=int, nargs='+', default=[8], help='local crops of each size')
    p.add_argument('--out_dim', type=int, default=65536, help='prototypes of the DINO heads')
    p.add_argument('--use_dense_prediction', type=utils.bool_flag, default=True, help='V+R (True) or V (False)')
    p.add_argument('--precision', default=TRAIN_DEFAULTS.get_default('precision'),
                   choices=['auto', 'fp32', 'bf16', 'fp16'],
                   help="as main_esvit.py's --precision, and its default (auto: its choice on this device)")
    p.add_argument('--compile', type=utils.bool_flag, default=False, help='torch.compile the backbones')
    p.add_argument('--malloc', default=TRAIN_DEFAULTS.get_default('malloc'), choices=utils.MALLOC_CHOICES,
                   help="as main_esvit.py's --malloc (system: glibc's malloc untuned)")
    p.add_argument('--flush_denormal', type=utils.bool_flag, default=TRAIN_DEFAULTS.get_default('flush_denormal'),
                   help='flush float32 denormals to zero, as main_esvit.py does')
    p.add_argument('--train_args', default='', help='extra main_esvit.py flags, e.g. "--clip_mode global"')
    p.add_argument('--steps', type=int, default=5, help='timed steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='also profile one step (torch.profiler) and print its N most expensive operators')
    p.add_argument('--sweep', action='store_true', help='run every precision/option combination (subprocesses)')
    p.add_argument('opts', nargs=argparse.REMAINDER, help='config overrides KEY VALUE ...')
    return p.parse_args()


def random_crop_boxes(batch, ncrops):
    """B x V x 5 boxes [top, left, height, width, flipped] inside the unit image, as the views' crop boxes."""
    g = torch.Generator().manual_seed(0)
    size = 0.3 + 0.7 * torch.rand(batch, ncrops, 2, generator=g)
    corner = (1 - size) * torch.rand(batch, ncrops, 2, generator=g)
    return torch.cat([corner, size, (torch.rand(batch, ncrops, 1, generator=g) < 0.5).float()], dim=-1)


def trainer_for(args):
    """(main_esvit.py's arguments, the Trainer) of this benchmark's settings."""
    argv = ['--arch', args.arch, '--out_dim', str(args.out_dim), '--use_dense_prediction', str(args.use_dense_prediction),
            '--batch_size_per_gpu', str(args.batch_size), '--local_crops_number', *map(str, args.local_crops_number),
            '--local_crops_size', *map(str, args.local_size), '--precision', args.precision,
            '--norm_last_layer', 'false', '--epochs', '10', '--warmup_epochs', '1', '--output_dir', '/tmp',
            '--compile', str(args.compile), '--malloc', args.malloc,
            '--flush_denormal', str(args.flush_denormal), *args.train_args.split()]
    if args.cfg:
        argv += ['--cfg', args.cfg]
    argv += list(args.opts or []) + ['TRAIN.IMAGE_SIZE', f'[{args.global_size}, {args.global_size}]']
    train_args = parse_args(argv)
    utils.init_distributed_mode(train_args)
    torch.manual_seed(0)
    return train_args, build_trainer(train_args, load_config(train_args), steps_per_epoch=100)


def print_profile(trainer, crops, n_rows):
    """The operators of one training step by self time (where the time goes, without the Python overhead)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.backward(trainer.forward_loss(crops, epoch=1, it=100))
        trainer.optimizer_step(epoch=1, it=100)
    sort_by = 'self_cuda_time_total' if torch.cuda.is_available() else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort_by, row_limit=n_rows), file=sys.stderr)


def benchmark(args, malloc):
    train_args, trainer = trainer_for(args)
    device = train_args.device
    crops = synthetic_crops(args, device)
    if matches_by_position(train_args):  # --train_args "--region_matching position": the views' crop boxes too
        crops = BoxedViews(crops, random_crop_boxes(args.batch_size, len(crops)))
    phases, cpu_seconds, faults = time_steps(lambda it: trainer.forward_loss(crops, epoch=1, it=it), trainer.backward,
                                lambda it: trainer.optimizer_step(epoch=1, it=it), args, device)

    if args.profile:
        print_profile(trainer, crops, args.profile)
    with FlopCounterMode(display=False) as counter:
        trainer.backward(trainer.forward_loss(crops, epoch=1, it=100))
    flops = counter.get_total_flops()
    dtype = trainer.autocast_dtype or torch.float32
    peak = matmul_peak(device, dtype)
    precision = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]
    step_time = sum(phases.values())
    result = {
        'arch': args.arch, 'precision': precision if args.precision != 'auto' else f'auto: {precision}',
        'compile': args.compile, 'train_args': args.train_args,
        'batch_size': args.batch_size, 'crops': f"2x{args.global_size}+" + '+'.join(
            f"{n}x{s}" for n, s in zip(args.local_crops_number, args.local_size)),
        'out_dim': args.out_dim, 'dense': args.use_dense_prediction, 'device': str(device),
        'threads': torch.get_num_threads(), 'malloc': malloc,
        'flush_denormal': args.flush_denormal,
        'images_per_s': args.batch_size / step_time, 'seconds_per_step': step_time,
        **{f'{name}_s': seconds for name, seconds in phases.items()},
        'cpu_seconds_per_step': cpu_seconds, 'minor_faults_per_step': faults,
        'peak_memory_mb': peak_memory_mb(device), 'gflop_per_step': flops / 1e9,
        'achieved_gflops': flops / 1e9 / step_time, 'matmul_peak_gflops': peak / 1e9,
        'fraction_of_peak': flops / step_time / peak,
    }
    return result


SWEEP = [  # (precision, benchmark flags): the plain path, then each switch turned on in turn
    ('fp32', ['--malloc', 'system', '--flush_denormal', 'False']),
    ('fp32', ['--malloc', 'system']),
    ('fp32', []),
    ('fp32', ['--train_args', '--clip_mode global']),
    ('bf16', ['--malloc', 'system', '--flush_denormal', 'False']),
    ('bf16', []),
    ('auto', []),
]  # --compile True is left out: compiling the Swin step on a 2-core CPU did not finish within 15 minutes


def sweep(args):
    rows = []
    for precision, flags in SWEEP:
        cmd = [sys.executable, os.path.abspath(__file__), '--arch', args.arch, '--cfg', args.cfg,
               '--batch_size', str(args.batch_size), '--global_size', str(args.global_size),
               '--local_size', *map(str, args.local_size), '--local_crops_number', *map(str, args.local_crops_number),
               '--out_dim', str(args.out_dim), '--use_dense_prediction', str(args.use_dense_prediction),
               '--precision', precision, *flags, '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--json', '/tmp/esvit_bench_row.json', *(args.opts or [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{precision} {' '.join(flags)}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        with open('/tmp/esvit_bench_row.json') as f:
            rows.append(json.load(f))
    header = ('| precision | malloc | flush denormal | compile | options | images/s | s/step | fwd | bwd | opt | peak MB '
              '| GFLOP/step | % of peak |')
    lines = [header, '|' + '---|' * 13]
    for r in rows:
        malloc = next((name for name in ('tcmalloc', 'mimalloc') if name in r['malloc']), 'glibc')
        lines.append(f"| {r['precision']} | {malloc} | {r['flush_denormal']} | {r['compile']} | {r['train_args'] or '-'} | "
                     f"{r['images_per_s']:.2f} | {r['seconds_per_step']:.2f} | {r['forward_s']:.2f} | "
                     f"{r['backward_s']:.2f} | {r['optimizer_s']:.2f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['gflop_per_step']:.0f} | {100 * r['fraction_of_peak']:.0f} % |")
    table = '\n'.join(lines)
    print(table)
    if args.json:
        utils.save_json({'rows': rows, 'markdown': table}, args.json)


def main():
    args = get_args()
    if args.sweep:  # each row in a subprocess, with its own allocator
        os.chdir(ROOT)
        return sweep(args)
    malloc = utils.setup_cpu_runtime(args.malloc, args.flush_denormal)
    os.chdir(ROOT)
    result = benchmark(args, malloc)
    print(json.dumps(result, indent=1))
    if args.json:
        utils.save_json(result, args.json)


if __name__ == '__main__':
    main()
