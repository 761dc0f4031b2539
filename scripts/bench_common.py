"""What scripts/benchmark.py (this project's step) and scripts/bench_original.py (the original's) share, so that
both are timed the same way. Imports nothing but torch: bench_original.py imports it next to the original's
modules (main_esvit, utils, config, models), which this project's names would shadow."""
import resource
import time

import torch


def synthetic_crops(args, device):
    sizes = [args.global_size] * 2 + [s for n, s in zip(args.local_crops_number, args.local_size) for _ in range(n)]
    return [torch.randn(args.batch_size, 3, s, s, device=device) for s in sizes]


def matmul_peak(device, dtype, n=2048, seconds=1.0):
    """FLOP/s of a large matmul on this device at this precision."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def peak_memory_mb(device):
    """Peak memory of this process in MiB: max allocated on CUDA, max resident set size on a CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # kB -> MiB


def minor_faults():
    """Page faults of this process so far that needed no disk read (fresh pages the allocator asked for)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(forward_loss, backward, optimizer_step, args, device, first_it=100):
    """Mean seconds per step of each phase over ``args.steps`` steps after ``args.warmup`` ones, the process CPU
    seconds (all threads; less sensitive than wall time to other loads on the machine) and the minor page faults
    per step: ``forward_loss(it) -> loss``, ``backward(loss)``, ``optimizer_step(it)``, at schedule
    positions ``first_it + step`` (shared with scripts/bench_original.py, so both are timed the same way)."""
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    phases = {'forward': 0.0, 'backward': 0.0, 'optimizer': 0.0}
    faults, cpu_seconds = 0, 0.0
    for step in range(args.warmup + args.steps):
        it = first_it + step
        sync()
        f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
        loss = forward_loss(it)
        sync()
        t1 = time.perf_counter()
        backward(loss)
        sync()
        t2 = time.perf_counter()
        optimizer_step(it)
        sync()
        t3 = time.perf_counter()
        if step >= args.warmup:
            faults += minor_faults() - f0
            cpu_seconds += time.process_time() - c0
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name] += seconds / args.steps
    return phases, cpu_seconds / args.steps, faults / args.steps
