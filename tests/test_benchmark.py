"""The benchmark harness runs, and every speed switch of the training step keeps the loss of the plain path."""
import json
import os
import subprocess
import sys

import pytest
import torch

import utils
from helpers import ROOT, build_trainer

TINY_SWIN = ('swin', 'experiments/cpu/swin_demo.yaml')


def run_tiny_benchmark(tmp_path, *flags):
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, 'scripts/benchmark.py', '--cfg', 'experiments/cpu/swin_demo.yaml', '--batch_size', '2',
           '--global_size', '32', '--local_size', '16', '--local_crops_number', '2', '--out_dim', '64',
           '--steps', '1', '--warmup', '1', '--json', str(out), *flags]
    env = {k: v for k, v in os.environ.items() if k not in ('ESVIT_MALLOC', 'LD_PRELOAD')}
    result = subprocess.run(cmd, cwd=ROOT, env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_benchmark_script_runs_on_a_tiny_config(tmp_path):
    report = run_tiny_benchmark(tmp_path)
    assert report['images_per_s'] > 0 and report['gflop_per_step'] > 0 and report['peak_memory_mb'] > 0
    assert report['seconds_per_step'] == pytest.approx(report['forward_s'] + report['backward_s'] + report['optimizer_s'])
    assert 0 < report['fraction_of_peak'] < 1


@pytest.mark.skipif(utils.preloadable_allocator() is None,
                    reason='neither tcmalloc nor the cmeel-mimalloc wheel is installed')
def test_an_allocator_is_preloaded_by_restarting_unless_switched_off(tmp_path):
    assert run_tiny_benchmark(tmp_path)['malloc'] == utils.preloadable_allocator()
    assert run_tiny_benchmark(tmp_path, '--malloc', 'system')['malloc'] == 'system'


def test_flushing_denormals_keeps_the_loss(tmp_path):
    plain = losses_of(tmp_path / 'plain')
    if not torch.set_flush_denormal(True):
        pytest.skip('this CPU cannot flush denormals')
    try:
        flushed = losses_of(tmp_path / 'flushed')
    finally:
        torch.set_flush_denormal(False)
    assert flushed == pytest.approx(plain, rel=1e-5)


def losses_of(tmp_path, steps=3, extra=()):
    trainer = build_trainer(*TINY_SWIN, tmp_path, extra)
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)] + \
            [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    return [trainer.step(crops, epoch=1, it=8 + i) for i in range(steps)]


@pytest.mark.parametrize('switch,rtol', [
    (('--fused_optimizer', 'False'), 1e-5),   # per-tensor AdamW loop vs the fused kernel
    (('--precision', 'bf16'), 3e-2),          # bf16 autocast vs fp32
])
def test_speed_switches_keep_the_loss(switch, rtol, tmp_path):
    plain = losses_of(tmp_path / 'plain')
    switched = losses_of(tmp_path / 'switched', extra=switch)
    assert switched == pytest.approx(plain, rel=rtol)


FAULTS_OF_REPEATED_BIG_BLOCKS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import utils
print(utils.setup_cpu_runtime({malloc!r}, flush_denormal=False))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.ones(16 * 2 ** 20)  # 64 MiB, freed at once: above glibc's largest mmap threshold (32 MiB)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(utils.preloadable_allocator() is None,
                    reason='neither tcmalloc nor the cmeel-mimalloc wheel is installed')
def test_the_preloaded_allocator_reuses_freed_big_blocks_instead_of_faulting_them_in_again():
    def run(malloc):
        env = {k: v for k, v in os.environ.items() if k not in ('ESVIT_MALLOC', 'LD_PRELOAD')}
        code = FAULTS_OF_REPEATED_BIG_BLOCKS.format(root=str(ROOT), malloc=malloc)
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()
        return out[0], int(out[1])
    pages = 64 * 2 ** 20 // 4096
    system_name, system_faults = run('system')
    preloaded_name, preloaded_faults = run('auto')
    assert system_name == 'system' and preloaded_name == utils.preloadable_allocator()
    assert system_faults > 5 * pages       # every block is mapped and faulted in anew
    assert preloaded_faults < 1.5 * pages  # faulted in once at most, then reused


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('ESVIT_MALLOC', 'LD_PRELOAD')}
    done = subprocess.run(['bash', 'scripts/gpu_check.sh', '--dry_run'], cwd=ROOT, capture_output=True, text=True,
                          env={**env, 'OUT_PATH': str(tmp_path), 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [(r['precision'], r['compile']) for r in summary['bench']] == [('bf16', False), ('fp32', False)]
    for row in summary['bench']:  # MFU: the step's FLOP/s over the measured bf16 matmul peak
        assert row['mfu_vs_bf16_peak'] == pytest.approx(
            row['gflop_per_step'] / row['seconds_per_step'] / (summary['bf16_peak_tflops'] * 1e3))
        assert 0 < row['mfu_vs_bf16_peak'] < 1 and row['peak_memory_mb'] > 0
    assert summary['demo']['epoch'] == 0 and summary['knn']['num_train'] == 30
    lines = done.stdout.splitlines()
    assert sum(line.startswith('bench ') for line in lines) == 2 and any(line.startswith('knn k=5') for line in lines)
    colour = summary['device_colour']  # the views' colour steps, timed on the device (the CPU here)
    assert colour['device'] == 'cpu' and colour['images_per_s'] == pytest.approx(2 / colour['seconds_per_batch'])
    assert any(line.startswith('colour steps on the device') for line in lines)
