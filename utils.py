"""Helpers shared by the entry scripts: distributed set-up, schedules, gradients, logging, checkpoints."""
import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


def bool_flag(s):
    """argparse type for booleans written as the original's users do: True/False, 1/0, on/off."""
    value = str(s).lower()
    if value in {'on', 'true', '1', 'yes'}:
        return True
    if value in {'off', 'false', '0', 'no'}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r}")


def run_main(main, args):
    """Run ``main(args)``; a :class:`UserError` (or another known input error) becomes one line on stderr."""
    from config import ConfigError
    from datasets import DataError
    from models import UnknownModelError
    try:
        main(args)
    except (UserError, ConfigError, UnknownModelError, DataError) as e:
        # errors raised in a DataLoader worker carry the worker's traceback after the first line
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def setup_cpu_runtime(tcmalloc=True, flush_denormal=True):
    """Call first thing in an entry script. ``tcmalloc``: re-execute this process with tcmalloc preloaded, when it
    is installed (Debian: libtcmalloc-minimal4) and not loaded yet; glibc's malloc hands every freed block above
    32 MB (activations, [tokens x 65536] logits) back to the OS, so each step page-faults them in again, and
    tcmalloc keeps them (a third of the CPU step, see README, Performance). A no-op off Linux or once the
    restart happened (``ESVIT_MALLOC`` names the allocator). ``flush_denormal``: flush float32 denormals to
    zero, before the first parallel op so that the OpenMP threads inherit the mode."""
    import ctypes.util
    if tcmalloc and sys.platform.startswith('linux') and not os.environ.get('ESVIT_MALLOC'):
        preloaded = 'tcmalloc' in os.environ.get('LD_PRELOAD', '')
        os.environ['ESVIT_MALLOC'] = 'tcmalloc (LD_PRELOAD)' if preloaded else 'system'
        library = None if preloaded else (ctypes.util.find_library('tcmalloc_minimal')
                                          or ctypes.util.find_library('tcmalloc'))
        if library is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            preload = ' '.join(filter(None, [library, os.environ.get('LD_PRELOAD')]))
            os.execve(sys.executable, sys.orig_argv, dict(os.environ, ESVIT_MALLOC=library, LD_PRELOAD=preload))
    torch.set_flush_denormal(flush_denormal)


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


# ---------------------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------------------
def init_distributed_mode(args):
    """Set ``args.rank, args.world_size, args.gpu, args.device`` and join the process group when launched by
    torchrun / torch.distributed.launch (env ``RANK``/``WORLD_SIZE``) or SLURM; a plain ``python`` run is a
    single process without a process group. NCCL for CUDA tensors (with gloo for CPU ones), gloo on CPU."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', getattr(args, 'local_rank', 0)))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ['SLURM_NTASKS'])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    args.device = torch.device('cuda', args.gpu) if use_cuda else torch.device('cpu')
    if args.world_size > 1:
        dist.init_process_group(backend='cpu:gloo,cuda:nccl' if use_cuda else 'gloo', init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(minutes=30))
        dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master):
    """Silence ``print`` on non-master ranks (``print(..., force=True)`` still prints)."""
    import builtins
    builtin_print = getattr(builtins.print, '_esvit_original', builtins.print)

    def print_(*args, force=False, **kwargs):
        if is_master or force:
            builtin_print(*args, **kwargs)
    print_._esvit_original = builtin_print
    builtins.print = print_


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def global_mean(value):
    """The mean over all processes of a 0-d tensor, as a float (one all-reduce; the value itself without a
    process group)."""
    if is_dist():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= get_world_size()
    return value.item()


def any_process(flag, device):
    """Whether ``flag`` is true in any process (one all-reduce of a tensor on ``device``)."""
    if not is_dist():
        return bool(flag)
    flags = torch.tensor(float(flag), device=device)
    dist.all_reduce(flags)
    return flags.item() > 0


class GracefulStop:
    """While active (``with stop:``), SIGTERM and SIGINT do not end the process: they set ``signum`` and the
    training loop ends its step, saves a checkpoint and stops. A second signal acts as usual."""
    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        self.signum = None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])


def fix_random_seeds(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def has_batchnorms(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# schedules, parameter groups, gradients
# ---------------------------------------------------------------------------------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Per-iteration values: linear warm-up from ``start_warmup_value``, then cosine to ``final_value``."""
    warmup_iters = min(int(warmup_epochs * niter_per_ep), epochs * niter_per_ep)  # a run shorter than its warm-up
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model):
    """Weight decay on weights; none on biases and 1-D (norm) parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith('.bias') or param.ndim == 1 else regularized).append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def clip_gradients(model, clip, mode='per_tensor'):
    """Clip gradients to norm ``clip``. ``per_tensor`` (the original's semantics) clips each parameter's
    gradient separately; ``global`` clips the norm of all gradients together (as ``clip_grad_norm_``).
    Works without a host sync per tensor. Returns the per-tensor norms (or the global norm) as a tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    if mode == 'global':
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    norms = torch.stack(torch._foreach_norm(grads))                    # P
    scales = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if 'last_layer' in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher_params, student_params, momentum):
    """teacher <- m * teacher + (1 - m) * student, fused over all tensors."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


class LARS(torch.optim.Optimizer):
    """LARS (for convnets with large batches); no weight decay or scaling on 1-D parameters."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group['eta'] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu'].mul_(group['momentum']).add_(update)
                p.add_(mu, alpha=-group['lr'])


# ---------------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------------
class SmoothedValue:
    """A window-smoothed series with a global average, synchronisable across processes."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        if not is_dist():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    def __str__(self):
        return self.fmt.format(median=self.median, global_avg=self.global_avg)


class MetricLogger:
    """Collects per-iteration metrics and prints a progress line (iteration, ETA, images/s, metrics)."""

    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(float(v.item() if torch.is_tensor(v) else v))

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header='', images_per_iter=None):
        """Yield from ``iterable``, printing progress every ``print_freq`` iterations and at the end."""
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        for i, obj in enumerate(iterable):
            self.meters['data_time'].update(time.time() - end)
            yield obj
            self.meters['iter_time'].update(time.time() - end)
            if images_per_iter:
                self.meters['img_per_s'].update(images_per_iter / max(time.time() - end, 1e-9))
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(self.meters['iter_time'].global_avg * (total - i - 1)))
                print(f"{header} [{i:{width}d}/{total}]  eta: {eta}{self.delimiter}{self}", flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)", flush=True)


class TrainingLog:
    """``log.txt`` (one JSON line per epoch) and TensorBoard scalars, written by the main process only."""

    def __init__(self, output_dir, enabled=True, first_epoch=None):
        """``first_epoch``: the epoch a resumed run starts at; lines of later epochs (written before a crash
        that came ahead of their checkpoint) are dropped, as those epochs run again."""
        self.output_dir = output_dir
        self.enabled = enabled
        self.writer = None
        if enabled and first_epoch is not None:
            self._drop_epochs_from(first_epoch)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tb'))
            except ImportError:  # tensorboard is optional at run time
                print("tensorboard is not installed: TensorBoard scalars are not written")

    def _drop_epochs_from(self, first_epoch):
        path = os.path.join(self.output_dir, 'log.txt')
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        def before_first_epoch(line):  # a line cut short by a crash is dropped too
            try:
                return json.loads(line).get('epoch', -1) < first_epoch
            except ValueError:
                return False
        kept = [line for line in lines if before_first_epoch(line)]
        if len(kept) < len(lines):
            with open(path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(path + '.tmp', path)

    def scalars(self, step, **values):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag, picture, step):
        """An H x W x 3 uint8 picture to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats='HWC')

    def epoch(self, stats):
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def plain_args(args):
    """``vars(args)`` reduced to plain data (no pickled classes in a checkpoint)."""
    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def save_checkpoint(state, path):
    """Write ``state`` atomically: a temporary file in the same directory, fsync, then rename. A crash at
    any moment leaves either the previous file or the new one. Only the main process writes."""
    if not is_main_process():
        return
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"could not write checkpoint {path}: {e.strerror or e} (the previous checkpoint is intact)") from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """``torch.load(path, weights_only=True)``, also accepting the original's pickled ``argparse.Namespace``
    (and nothing else). A missing, truncated or unsafe file is a :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if 'Unsupported global' in str(e) or 'weights_only' in str(e):
            reason = "it contains pickled objects other than tensors and plain data, refused for safety"
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None


def strip_prefix(state_dict, prefixes=('module.',)):
    """Remove each of ``prefixes`` (in turn) from the keys that carry it."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_checked(module, state_dict, what):
    """``load_state_dict(strict=True)`` whose failure is one :class:`UserError` naming the mismatched keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state_dict and hasattr(state_dict[k], 'shape') and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def short(keys):
            return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
        parts = [f"missing keys: {short(missing)}" if missing else '',
                 f"unexpected keys: {short(unexpected)}" if unexpected else '',
                 f"shape mismatch: {short(mismatched)}" if mismatched else '']
        raise UserError(f"{what} does not match the model; " + '; '.join(p for p in parts if p))
    module.load_state_dict(state_dict, strict=True)


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def is_finite(value):
    return math.isfinite(value)
