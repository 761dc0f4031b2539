"""DataLoader for pre-training: shuffled per epoch, one shard per rank when distributed.

The data of an epoch do not depend on the number of processes: the global order is one permutation of
(seed, epoch); a process takes every ``world_size``-th sample of it (DistributedSampler's interleaving), so
global batch b of ``world_size`` processes holds exactly the samples of batch b of one process with a
batch ``world_size`` times larger. Each sample's random augmentations are drawn from a seed of
(seed, epoch, sample index), not from a worker's random stream. Hence 1 and N processes (or N DataLoader
workers, or a run resumed mid-epoch) see the same crops of the same images.
"""
import atexit
import functools
import itertools
import os
import random
import signal
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

import utils


class StepAlignedSampler:
    """Sampler mix-in: the epoch ends on a whole optimizer step (``step_batches`` micro-batches of
    ``batch_size``; the loader drops the rest) and starts at position ``start`` (a mid-epoch resume)."""
    batch_size = 1
    step_batches = 1
    start = 0

    @property
    def stop(self):
        n = super().__len__()
        return n - (n // self.batch_size % self.step_batches) * self.batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, self.stop)

    def __len__(self):
        return max(self.stop - self.start, 0)


class EpochRandomSampler(StepAlignedSampler, RandomSampler):
    """RandomSampler whose order is a function of (seed, epoch), with set_epoch like DistributedSampler
    (the same permutation as DistributedSampler's with one process)."""

    def __init__(self, data_source, seed=0):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.generator.manual_seed(self.seed + epoch)


class DistributedEpochSampler(StepAlignedSampler, DistributedSampler):
    """DistributedSampler without padding (the last ``< world_size`` samples of the order are left out, so
    no sample is seen twice in an epoch)."""

    def __init__(self, dataset, seed=0, num_replicas=None, rank=None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)


def sample_seed(seed, epoch, index):
    """The seed of the random augmentations of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed % 2 ** 32, epoch, index]).generate_state(1)[0])


@contextmanager
def seeded_rng(seed):
    """The CPU random streams of torch, numpy and random seeded with ``seed`` inside the block, restored after."""
    random_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(random_state)
            np.random.set_state(numpy_state)


class PerSampleSeeds(Dataset):
    """``dataset`` whose item ``index`` is computed under :func:`sample_seed` (seed, ``epoch``, index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with seeded_rng(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


_MAIN_EXITING = None  # 1-element shared uint8 tensor: 1 once the main process ends (set at exit or on an error)


def main_exiting_flag():
    """The shared flag that lets DataLoader workers end on SIGTERM (see :func:`worker_init`); created once per
    process, set by an exit handler (which runs before multiprocessing's own, which terminates and joins the
    workers)."""
    global _MAIN_EXITING
    if _MAIN_EXITING is None:
        _MAIN_EXITING = torch.zeros(1, dtype=torch.uint8).share_memory_()
        atexit.register(_MAIN_EXITING.fill_, 1)
    return _MAIN_EXITING


def worker_init(worker_id, nice=0, main_exiting=None):
    """DataLoader workers leave SIGINT to the training process, and SIGTERM too while it runs: a Ctrl-C or
    scancel reaches every process, and the training process finishes its step and saves a checkpoint with the
    workers' help. Once the main process ends (``main_exiting`` set, see :func:`main_exiting_flag`), a SIGTERM
    (multiprocessing's terminate at exit) ends a worker at once, so no worker outlives its run. ``nice``: their
    scheduling priority (see :func:`worker_nice`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if main_exiting is not None and main_exiting[0]:
            os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)
    if nice:
        os.nice(nice)


def usable_cpus():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_CAPPED_ONCE = set()


def cap_workers(num_workers):
    """``num_workers`` at most the usable CPUs (more only make PyTorch warn and the processes compete); says so
    once per requested value."""
    cpus = usable_cpus()
    if num_workers <= cpus:
        return num_workers
    if num_workers not in _CAPPED_ONCE:
        _CAPPED_ONCE.add(num_workers)
        print(f"--num_workers {num_workers} capped at {cpus}, the CPUs this machine gives the run")
    return cpus


def worker_error(error):
    """A :class:`utils.UserError` raised in a worker comes back as ``type(error)('Caught X in DataLoader worker
    process 0.\nOriginal Traceback ...')``; the same type with the worker's own message (its traceback's last
    line), else ``error`` itself."""
    message = str(error)
    if not (isinstance(error, utils.UserError) and message.startswith('Caught ') and 'Traceback' in message):
        return error
    last = message.strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return type(error)(last[len(prefix):] if last.startswith(prefix) else last)


class WorkerLoader(DataLoader):
    """DataLoader whose workers never outlive an error: when anything (a worker's error, or one raised by the
    loop around the batches) ends an iteration early, the workers are shut down before the error goes on, and
    a worker's :class:`utils.UserError` keeps its own one-line message (the file and the cause). At most
    :func:`usable_cpus` workers, at priority ``nice``."""

    def __init__(self, dataset, num_workers=0, nice=0, **kwargs):
        num_workers = cap_workers(num_workers)
        init = functools.partial(worker_init, nice=nice, main_exiting=main_exiting_flag()) if num_workers else None
        super().__init__(dataset, num_workers=num_workers, worker_init_fn=init, **kwargs)

    def __iter__(self):
        batches = super().__iter__()
        try:
            yield from batches
        except utils.UserError as error:
            raise worker_error(error) from None
        finally:
            if hasattr(batches, '_shutdown_workers'):  # idle workers end at once; one stuck in a sample for
                batches._shutdown_workers()             # more than 5 s ends at exit (worker_init)


def worker_nice(device):
    """The niceness for DataLoader workers: 19 (lowest priority) when the model runs on the CPU, 0 on a GPU.
    On the CPU the workers share cores with the OpenMP threads of the step, and every parallel op waits for
    a thread that a worker preempted; at the lowest priority the workers fill the gaps and the waits for data
    instead (the demo on 2 cores: 0.43 s per step at priority 0, 0.29 s at 19, with 2 workers)."""
    return 19 if device.type == 'cpu' else 0


def build_loader(dataset, batch_size, num_workers, distributed, seed=0, drop_last=True, step_batches=1, nice=0,
                 sampler='distributed'):
    """Shuffling loader; call :func:`set_epoch` before each epoch. With ``step_batches`` K (gradient
    accumulation) an epoch holds a whole number of K micro-batches; ``nice``: see :func:`worker_init`.
    ``sampler`` 'chunk': datasets/samplers.py (the chunks are ``dataset.chunk_sizes``, else the whole dataset).
    A stream (WebDataset shards) builds its own loader.

    Workers are started anew each epoch (not persistent), so they see the epoch set by :func:`set_epoch`.
    """
    if hasattr(dataset, 'build_loader'):
        return dataset.build_loader(batch_size, num_workers, step_batches, nice)
    if sampler == 'chunk':
        from .samplers import ChunkEpochSampler
        sampler = ChunkEpochSampler(getattr(dataset, 'chunk_sizes', [len(dataset)]), seed=seed,
                                    num_replicas=utils.get_world_size(), rank=utils.get_rank())
    elif distributed:
        sampler = DistributedEpochSampler(dataset, seed=seed)
    else:
        sampler = EpochRandomSampler(dataset, seed=seed)
    sampler.batch_size, sampler.step_batches = batch_size, step_batches
    loader = WorkerLoader(PerSampleSeeds(dataset, seed), sampler=sampler, batch_size=batch_size,
                          num_workers=num_workers, nice=nice, pin_memory=torch.cuda.is_available(),
                          drop_last=drop_last)
    set_epoch(loader, 0)
    return loader


def set_epoch(loader, epoch, start_batch=0):
    """Order and augmentations of ``epoch`` (functions of seed, epoch and sample index only), from this
    process's micro-batch ``start_batch`` on (a mid-epoch resume)."""
    if hasattr(loader.dataset, 'build_loader'):  # a stream: it deals out its own epochs
        loader.dataset.set_epoch(epoch, start_batch)
        return
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start_batch * loader.batch_size
    loader.dataset.epoch = epoch
