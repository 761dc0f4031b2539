"""DataLoader for pre-training: shuffled per epoch, one shard per rank when distributed."""
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


class EpochRandomSampler(RandomSampler):
    """RandomSampler whose order is a function of (seed, epoch), with set_epoch like DistributedSampler."""

    def __init__(self, data_source, seed=0):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.generator.manual_seed(self.seed + epoch)


def seed_worker(worker_id):
    """Seed numpy and random in a DataLoader worker from its torch seed (loader base seed + worker id)."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(dataset, batch_size, num_workers, distributed, seed=0, drop_last=True):
    """Shuffling loader; call :func:`set_epoch` before each epoch.

    Workers are started anew each epoch (not persistent) and seeded from (seed, rank, epoch), so an
    epoch sees the same order and the same augmentations whether or not the run was resumed before it.
    """
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
        rank = dist.get_rank()
    else:
        sampler = EpochRandomSampler(dataset, seed=seed)
        rank = 0
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=torch.Generator(),
    )
    loader.worker_seed_base = (seed + rank) * 1_000_003  # worker seeds differ across ranks and epochs
    set_epoch(loader, 0)
    return loader


def set_epoch(loader, epoch):
    """Shuffle order and worker seeds of ``epoch`` (a function of seed, rank and epoch only)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader.worker_seed_base + epoch)
