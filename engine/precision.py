"""Which precision a training step runs in: ``--precision`` and ``--use_fp16``, measured on a CPU."""
import time

import torch

import utils

BF16_MIN_SPEEDUP = 1.5


def bf16_matmul_speedup(n=1024, reps=5):
    """How many times as fast an n x n bfloat16 matmul runs as a float32 one on this CPU (best of ``reps``
    each, about 0.1 s): oneDNN's bf16 kernels are 2.5x float32 on some CPUs with AVX-512-BF16 and half of it
    on others."""
    def best_seconds(dtype):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # first call: kernel selection
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)
    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def resolve_precision(args):
    """(autocast dtype or None, whether a GradScaler is needed). ``--precision auto`` with ``--use_fp16`` is the
    original's mixed precision: fp16 + GradScaler on CUDA; on a CPU, bf16 autocast where a bf16 matmul runs at
    least BF16_MIN_SPEEDUP times as fast as a float32 one in every process (measured: 2.5x on an AMD EPYC with
    AVX-512-BF16, 0.5x on a Xeon without AMX, over 5x with AMX), float32 elsewhere."""
    precision = args.precision
    if precision == 'auto':
        if not args.use_fp16:
            precision = 'fp32'
        elif args.device.type == 'cuda':
            precision = 'fp16'
        else:
            speedup = bf16_matmul_speedup()
            slow = utils.any_process(speedup < BF16_MIN_SPEEDUP, args.device)
            precision = 'fp32' if slow else 'bf16'
            print(f"--precision auto: {precision} on this CPU (a bf16 matmul runs {speedup:.1f}x as fast as "
                  f"float32; --precision fp32 or bf16 to choose)")
    if precision == 'fp16' and args.device.type != 'cuda':
        raise utils.UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    return dtype, precision == 'fp16'
