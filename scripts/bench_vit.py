"""Time the ViT backbone of this repository against the ORIGINAL microsoft/esvit ``VisionTransformer`` on the
multi-crop training input: forward_features of every resolution group plus backward, interleaved (A B A B ...)
so that both see the same machine load, in float32 with the same weights. Wall time and the process's CPU
time are reported: on a shared machine the CPU time of a 1-thread run (``--threads 1``) measures the work.

    python scripts/bench_vit.py --original_repo /path/to/esvit --arch deit_small --patch_size 16 \\
        --batch_size 2 --global_size 224 --local_size 96 --local_crops_number 8 --rounds 3 --threads 1

(measured on 2 shared CPU cores: 2.72 s of CPU time per forward + backward for both, ours 1.00x; at batch 1
with 2 local crops 1.05 s against 1.09 s, 1.03x)

``--original_repo`` is a checkout of microsoft/esvit; only its ``models/vision_transformer.py`` is imported
(its ``utils.trunc_normal_`` import is served by timm's identical function), nothing is copied here. Both
models are students (drop-path 0.1, train mode, the same random draws); before timing, their outputs are
compared in eval mode.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

import torch
import timm.layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from engine import parse_args  # noqa: E402
from models import build_model  # noqa: E402
from utils import HelpFormatter  # noqa: E402


def get_args():
    p = argparse.ArgumentParser('ViT backbone: this repository vs the original', formatter_class=HelpFormatter)
    p.add_argument('--original_repo', required=True, help='a checkout of microsoft/esvit')
    p.add_argument('--arch', default='deit_small', choices=['deit_tiny', 'deit_small', 'vit_base'], help='ViT size')
    p.add_argument('--patch_size', type=int, default=16, help='16 or 8')
    p.add_argument('--batch_size', type=int, default=4, help='images per step')
    p.add_argument('--global_size', type=int, default=224, help='side of the 2 global crops')
    p.add_argument('--local_size', type=int, default=96, help='side of the local crops')
    p.add_argument('--local_crops_number', type=int, default=8, help='local crops')
    p.add_argument('--rounds', type=int, default=5, help='timed (original, ours) pairs after one warm-up pair')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: as torch chooses)')
    return p.parse_args()


def original_vits(repo):
    """The original's models/vision_transformer.py as a module."""
    path = os.path.join(repo, 'models', 'vision_transformer.py')
    if not os.path.isfile(path):
        sys.exit(f"--original_repo {repo}: no models/vision_transformer.py there")
    saved = sys.modules.get('utils')
    sys.modules['utils'] = types.SimpleNamespace(trunc_normal_=timm.layers.trunc_normal_)
    try:
        spec = importlib.util.spec_from_file_location('original_vision_transformer', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop('utils')
        if saved is not None:
            sys.modules['utils'] = saved
    return module


def step(model, groups, seed):
    """forward_features of each resolution group, a loss on the [CLS] and patch tokens, backward.
    (wall seconds, CPU seconds)."""
    torch.manual_seed(seed)  # the same drop-path draws for both models
    model.zero_grad(set_to_none=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = 0.
    for images in groups:
        pooled, region = model.forward_features(images)
        loss = loss + pooled.square().mean() + region.square().mean()
    loss.backward()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = original_vits(args.original_repo).__dict__[args.arch](
        patch_size=args.patch_size, drop_path_rate=0.1, use_dense_prediction=True)
    ours = build_model(load_config(parse_args(['--arch', args.arch, '--patch_size', str(args.patch_size),
                                               'TRAIN.IMAGE_SIZE', f'[{args.global_size}, {args.global_size}]'])))
    ours.load_state_dict(original.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    groups = [torch.randn(2 * args.batch_size, 3, args.global_size, args.global_size, generator=g),
              torch.randn(args.local_crops_number * args.batch_size, 3, args.local_size, args.local_size, generator=g)]
    with torch.no_grad():
        expected, got = original.eval().forward_features(groups[1]), ours.eval().forward_features(groups[1])
    difference = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(expected, got))
    print(f"outputs at {args.local_size} px (eval mode): max relative difference {difference:.1e}")
    original.train()
    ours.train()
    times = {'original': [], 'ours': []}
    for round_ in range(args.rounds + 1):
        for name, model in (('original', original), ('ours', ours)):
            seconds = step(model, groups, seed=round_)
            if round_:
                times[name].append(seconds)
    crops = f"2x{args.global_size} + {args.local_crops_number}x{args.local_size} px, batch {args.batch_size}"
    print(f"{args.arch}/{args.patch_size}, {crops}, {torch.get_num_threads()} threads, forward + backward (s):")
    for clock, index in (('wall', 0), ('CPU', 1)):
        medians = {name: statistics.median(v[index] for v in values) for name, values in times.items()}
        for name, values in times.items():
            print(f"  {clock:4s} {name:8s} median {medians[name]:.3f}  runs "
                  + ' '.join(f'{v[index]:.3f}' for v in values))
        print(f"  {clock} time: ours {medians['original'] / medians['ours']:.2f}x as fast as the original")


if __name__ == '__main__':
    main()
