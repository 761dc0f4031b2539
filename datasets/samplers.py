"""``--sampler chunk``: the epoch's order goes chunk by chunk (a chunk: one .tsv file of the original's TSV
layout, else the whole dataset), the chunks in an order of (seed, epoch) and the samples shuffled inside each, so
that consecutive steps read one file instead of all of them (the original's DistributedChunkSampler, for data
that streams from slow storage). As every sampler here, the global order does not depend on the number of
processes: process r of N takes every N-th sample of it. Unlike the original's, no chunk is cut to the smallest
one's size (every sample is seen once per epoch) and nodes do not own chunks (a step reads the same chunk in all
processes).
"""
import torch
from torch.utils.data import Sampler

from .loader import StepAlignedSampler


class _ChunkOrder(Sampler):
    def __init__(self, chunk_sizes, seed=0, num_replicas=1, rank=0):
        self.chunk_sizes, self.seed, self.num_replicas, self.rank = list(chunk_sizes), seed, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def global_order(self):
        """Every sample index once: the chunks in a random order, each one's samples shuffled."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        starts = torch.tensor([0] + self.chunk_sizes).cumsum(0)
        order = [starts[chunk] + torch.randperm(self.chunk_sizes[chunk], generator=generator)
                 for chunk in torch.randperm(len(self.chunk_sizes), generator=generator).tolist()]
        return torch.cat(order)

    def __iter__(self):
        order = self.global_order()[:len(self) * self.num_replicas]
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return sum(self.chunk_sizes) // self.num_replicas


class ChunkEpochSampler(StepAlignedSampler, _ChunkOrder):
    """The chunk order, one process's share, whole optimizer steps (see datasets/loader.py)."""
