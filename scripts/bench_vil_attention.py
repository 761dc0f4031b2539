"""Timing of the ViL backbone and of its sliding-chunk attention against dense full attention (CPU).

    OMP_NUM_THREADS=1 python scripts/bench_vil_attention.py [--batch 2] [--size 224] [--repeats 3]

Reports the vil_2262 parameter count, its forward+backward time per image (student in train mode, with
the random-neighbour MODE 1 of its yaml and after the switch to MODE 0), and, at the resolution of its
first stage (56 x 56 tokens + 1 global token, 96 channels, 3 heads at 224 px), the Vision Longformer
attention against full attention over all tokens with a relative position bias of the same kind.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import get_default_config, update_config  # noqa: E402
from utils import HelpFormatter  # noqa: E402
from models import build_model  # noqa: E402
from models.vision_longformer import FullAttention, LongformerAttention  # noqa: E402

VIL_2262_YAML = Path(__file__).resolve().parents[1] / 'experiments/imagenet/vil/vil_2262.yaml'


def seconds(fn, repeats):
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(fn, *inputs):
    def run():
        out = fn(*inputs)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()  # gradients accumulate
    return run


def forward_only(fn, *inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--batch', type=int, default=2, help='images per forward')
    parser.add_argument('--size', type=int, default=224, help='image side')
    parser.add_argument('--repeats', type=int, default=3, help='timed repetitions (the best is kept)')
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.size} px')

    config = get_default_config()
    update_config(config, argparse.Namespace(cfg=str(VIL_2262_YAML), opts=[]))
    torch.manual_seed(0)
    model = build_model(config).train()
    print(f'vil_2262 backbone parameters: {sum(p.numel() for p in model.parameters()):,}')
    images = torch.randn(args.batch, 3, args.size, args.size)
    for mode in (config.MODEL.SPEC.MSVIT.MODE, 0):
        model.set_attention_mode(mode)
        t = seconds(forward_backward(model.forward_features, images), args.repeats)
        print(f'vil_2262 forward+backward, MODE {mode:2d}: {t / args.batch * 1e3:8.1f} ms / image')
    del model

    dim, heads, window = 96, 3, 7
    side = args.size // 4
    tokens = torch.randn(args.batch, 1 + side * side, dim, requires_grad=True)
    hw = (side, side)
    longformer = LongformerAttention(dim, heads, window, num_global=1, share_weights=True, rpe=True)
    full = FullAttention(dim, heads, num_global=1, rpe=True, grid=hw)
    print(f'attention over {side} x {side} + 1 tokens, {dim} channels, {heads} heads:')
    for name, attn, mode in (('sliding chunk, all 9 chunks', longformer, 0),
                             ('sliding chunk, own + 1 chunk', longformer, 1),
                             ('dense full attention', full, None)):
        attn.train()
        if mode is not None:
            attn.mode = mode
        forward = seconds(forward_only(attn, tokens, hw), args.repeats)
        both = seconds(forward_backward(attn, tokens, hw), args.repeats)
        print(f'  {name:30s} forward {forward / args.batch * 1e3:8.1f} ms / image, '
              f'forward+backward {both / args.batch * 1e3:8.1f} ms / image')


if __name__ == '__main__':
    main()
