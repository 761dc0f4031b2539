"""Leaf helpers (no imports of this project): user errors and flags, the CPU runtime, distributed set-up,
progress and log files, checkpoint files (atomic writes, safe reads, checked state-dict loading)."""
import argparse
import datetime
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
import zipfile
from collections import defaultdict, deque

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist


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


ERROR_LINE_CHARS = 400  # an error line longer than this is cut (a library's message can run to paragraphs)


def error_line(error):
    """The first line of ``error``'s message, at most :data:`ERROR_LINE_CHARS` characters."""
    message = str(error).strip()
    line = message.splitlines()[0] if message else type(error).__name__
    return line if len(line) <= ERROR_LINE_CHARS else line[:ERROR_LINE_CHARS - 4].rstrip() + ' ...'


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of the entry scripts: each option's default (unless its help already says what it is), and
    [True/False] for the boolean ones."""

    def _get_help_string(self, action):
        own = action.help or ''
        text = own if 'default' in own.lower() else super()._get_help_string(action)
        return text if action.type is not bool_flag or 'True/False' in text else f'{text} [True/False]'


def run_main(main, args):
    """Run ``main(args)``; a :class:`UserError` (the config's and the data's errors are ones) becomes one short
    line on stderr and exit status 2. The exit happens outside the ``except`` clause: the error, its traceback
    and what its frames hold (DataLoader workers) are released first, so nothing keeps the exit waiting."""
    message = None
    try:
        main(args)
    except UserError as e:
        message = error_line(e)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


MALLOC_CHOICES = ('auto', 'system')


def preloadable_allocator():
    """The path of an allocator library to preload, or None: tcmalloc when the system has it (Debian:
    libtcmalloc-minimal4), else mimalloc from the cmeel-mimalloc wheel (requirements.txt)."""
    import ctypes.util
    import sysconfig
    library = ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')
    if library is not None:
        return library
    for site_dir in dict.fromkeys([sysconfig.get_path('platlib'), sysconfig.get_path('purelib')]):
        wheel_library = os.path.join(site_dir, 'cmeel.prefix', 'lib', 'libmimalloc.so')
        if os.path.isfile(wheel_library):
            return wheel_library
    return None


def setup_cpu_runtime(malloc='auto', flush_denormal=True):
    """Call first thing in an entry script; returns the allocator in use, in words.

    ``malloc``: 'auto' re-executes this process with :func:`preloadable_allocator` preloaded (tcmalloc, else the
    mimalloc of the cmeel-mimalloc wheel) unless one is loaded already; 'system' leaves the allocator alone.
    Glibc's malloc hands freed big blocks (activations, [tokens x 65536] logits) back to the OS, so each CPU step
    page-faults them in again (see README, Performance; its mallopt settings do not help: torch's 64-byte
    aligned allocations never fit the hole a freed one leaves). ``ESVIT_MALLOC`` marks the restart.
    ``flush_denormal``: flush float32 denormals to zero, before the first parallel op so that the OpenMP threads
    inherit the mode."""
    if malloc not in MALLOC_CHOICES:
        raise UserError(f"--malloc {malloc}: choose one of {', '.join(MALLOC_CHOICES)}")
    preloaded = [name for name in ('tcmalloc', 'mimalloc') if name in os.environ.get('LD_PRELOAD', '')]
    in_use = 'system'
    if preloaded:
        in_use = os.environ.get('ESVIT_MALLOC') or f'{preloaded[0]} (LD_PRELOAD)'
    elif malloc == 'auto' and sys.platform.startswith('linux') and not os.environ.get('ESVIT_MALLOC'):
        library = preloadable_allocator()
        if library is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            preload = ' '.join(filter(None, [library, os.environ.get('LD_PRELOAD')]))
            # mimalloc returns freed pages to the OS 10 ms after a free by default: never, as tcmalloc (mostly)
            env = dict({'MIMALLOC_PURGE_DELAY': '-1'}, **os.environ, ESVIT_MALLOC=library, LD_PRELOAD=preload)
            os.execve(sys.executable, sys.orig_argv, env)
    torch.set_flush_denormal(flush_denormal)
    return in_use


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


def all_gather_cat(tensor):
    """``tensor`` of every rank, concatenated along dim 0 in rank order (all ranks pass the same shape)."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def fix_random_seeds(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------------
class SmoothedValue:
    """A window-smoothed series with a global average, synchronisable across processes."""

    def __init__(self, window_size=20, fmt='{median:.4g} ({global_avg:.4g})'):
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

    def log_every(self, iterable, print_freq, header='', images_per_iter=None, start=0):
        """Yield from ``iterable``, printing progress every ``print_freq`` iterations and at the end. ``start``:
        the iterations done before (a resume inside an epoch): the counter goes on from there to
        ``start + len(iterable)``."""
        total = start + len(iterable)
        width = len(str(total))
        start_time = end = time.time()
        for i, obj in enumerate(iterable, start):
            self.meters['data_time'].update(time.time() - end)
            yield obj
            self.meters['iter_time'].update(time.time() - end)
            if images_per_iter:
                self.meters['img_per_s'].update(images_per_iter / max(time.time() - end, 1e-9))
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(self.meters['iter_time'].global_avg * (total - i - 1)))
                print(f"{header} [{i:{width}d}/{total}]  eta: {eta}{self.delimiter}{self}", flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"{header} Total time: {elapsed} ({(time.time() - start_time) / max(total - start, 1):.4g} s / it)",
              flush=True)


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
def make_output_dir(path):
    """Create ``path`` (and its parents); a folder that cannot be made or written is a :class:`UserError`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output dir {path} is not writable")
    return path


def save_json(obj, path):
    """``obj`` as indented JSON in ``path``, written atomically (a temporary file, then a rename)."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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


def save_checkpoint(state, path, metadata=None):
    """Write ``state`` atomically: a temporary file in the same directory, fsync, then rename. A crash at
    any moment leaves either the previous file or the new one. Only the main process writes. A ``.safetensors``
    path gets ``state`` (tensors by name, none sharing memory) in that format, with the str -> str ``metadata``."""
    if not is_main_process():
        return
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            if path.endswith('.safetensors'):
                f.write(safetensors.torch.save(state, metadata))
            else:
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


def keep_copy(path, copy_path):
    """``copy_path`` holds what ``path`` holds now: a hard link where the file system has them (no second write,
    no extra space; :func:`save_checkpoint` replaces ``path`` by a new file, so the link keeps this content), else
    a copy; atomically either way. Only the main process writes."""
    if not is_main_process():
        return
    tmp = os.path.join(os.path.dirname(os.path.abspath(copy_path)), f'.{os.path.basename(copy_path)}.tmp{os.getpid()}')
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy_path)


def _numpy_scalar_globals():
    """What numpy float64 and int64 scalars pickle into: numpy's scalar constructor (under its numpy 1.x and 2.x
    module names: the original's files were written with numpy 1.x), ``np.dtype`` and the classes of the
    float64 and int64 dtypes (unpickling a dtype sets its state)."""
    scalar = np.float64(0).__reduce__()[0]
    return [(scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'), np.dtype,
            type(np.dtype(np.float64)), type(np.dtype(np.int64))]


# Everything a checkpoint may pickle besides tensors and plain data: the original's ``args`` and the numpy float64
# lr / weight decay it assigns to its optimizer's param groups. Nothing else is ever unpickled.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace] + _numpy_scalar_globals()


def _plain_numbers(obj):
    """``obj`` with every numpy scalar replaced by the Python number it holds (in place for dicts, lists and
    Namespaces): an optimizer resumed from the original's file gets float lr and weight decay."""
    if isinstance(obj, np.generic):
        return obj.item()
    items = vars(obj) if isinstance(obj, argparse.Namespace) else obj if isinstance(obj, (dict, list)) else None
    if items is not None:
        for key, value in (items.items() if isinstance(items, dict) else enumerate(items)):
            items[key] = _plain_numbers(value)
    elif isinstance(obj, tuple):
        return tuple(_plain_numbers(v) for v in obj)
    return obj


def is_safetensors_file(path):
    """A safetensors file starts with the 8-byte length of its JSON header, then the header's '{'."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def load_checkpoint(path, mmap=False):
    """The content of a checkpoint file: ``torch.load(path, weights_only=True)``, which also accepts exactly
    :data:`CHECKPOINT_SAFE_GLOBALS` (numpy scalars come back as Python numbers), or the tensors of a
    ``.safetensors`` file. ``mmap``: tensors stay in the file until read (cheap for a look at ``args``; zip-format
    files only, older ones are read whole). A missing, truncated or unsafe file is a :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        if is_safetensors_file(path):
            return safetensors.torch.load_file(path)
        with open(path, 'rb') as f:
            mmap = mmap and f.read(4) == b'PK\x03\x04'  # zip format: torch >= 1.6
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return _plain_numbers(torch.load(path, map_location='cpu', weights_only=True, mmap=mmap))
    except Exception as e:
        reason = checkpoint_read_error(e, path)
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None


def checkpoint_read_error(error, path):
    """Why ``torch.load`` of ``path`` failed, in plain words (torch's own message runs to several sentences)."""
    message = str(error).strip()
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head == b'PK\x03\x04' and not zipfile.is_zipfile(path):
        return "the file is truncated (an incomplete copy or an interrupted save?)"
    if 'Unsupported global' in message or 'weights_only' in message:
        culprit = re.search(r'GLOBAL ([\w.]+)', message)
        return (f"it contains pickled objects other than tensors and plain data"
                f"{f' ({culprit.group(1)})' if culprit else ''}, refused for safety")
    if 'central directory' in message or isinstance(error, EOFError) or 'unexpected EOF' in message:
        return "the file is truncated or corrupted (an incomplete copy or an interrupted save?)"
    if isinstance(error, (KeyError, pickle.UnpicklingError)) or 'invalid load key' in message:
        return "not a PyTorch checkpoint (neither a torch.save zip, a legacy pickle nor safetensors)"
    return f"{type(error).__name__}: {error_line(error)}"


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
            return ', '.join(keys[:3]) + (f' ... ({len(keys)} in all)' if len(keys) > 3 else '')
        parts = [f"missing keys: {short(missing)}" if missing else '',
                 f"unexpected keys: {short(unexpected)}" if unexpected else '',
                 f"shape mismatch: {short(mismatched)}" if mismatched else '']
        raise UserError(f"{what} does not match the model; " + '; '.join(p for p in parts if p))
    module.load_state_dict(state_dict, strict=True)
