"""WebDataset tar shards (``--data_path 'shards/train-{000000..000127}.tar'``): local files, ``pipe:`` commands
or URLs (webdataset's gopen), brace patterns and ``::``-joined lists (webdataset's expand_urls). A sample is
the files of one key in a tar: an image (.jpg, .png, ...) and optionally .cls, an integer label
(scripts/make_shards.py writes such shards from any image folder or list).

An epoch is a fixed number of steps: ``epoch_images`` (--shard_epoch_images; by default the images counted in
local shards) over processes x batch, rounded down to whole optimizer steps. Each epoch the shard list is
shuffled with (seed, epoch) and dealt out over processes and loader workers (process r, worker w of N x W take
shards r*W + w, r*W + w + N*W, ...); each worker reads its shards through a shuffle buffer seeded with (seed,
epoch, process, worker), passing over them again only if its share of the epoch needs more. Every image is seen
once per epoch when the shards hold equal numbers of images and their count is a multiple of N x W. Each image's
augmentations are drawn from a seed of (seed, epoch, key) (a numeric key is the image index, as make_shards
writes it), so the same image gets the same crops as in a folder. A resume continues at its epoch; a mid-epoch
resume skips, undecoded, the samples of the batches already done.

Unreadable shards are found at start when the images are counted (local shards), else when read; corrupt
images follow --on_bad_image.
"""
import functools
import io
import itertools
import logging
import os
import tarfile
import zlib

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

import utils
from .folder import BAD_IMAGE_POLICIES, DECODE_ERRORS, DataError, load_image
from .loader import sample_seed, seeded_rng, worker_init

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'ppm', 'pgm', 'tif', 'tiff', 'gif')


def is_remote(url):
    return url.startswith('pipe:') or '://' in url


def expand_shards(pattern):
    """The shard URLs of a brace pattern or a ``::``-joined list; local shards must exist."""
    urls = wds.shardlists.expand_urls(pattern)
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of the {len(urls)} shards of "
                        f"{pattern} are missing)")
    return urls


def sample_key(member_name):
    """webdataset's grouping: a member 'dir/123.cls' belongs to the sample 'dir/123' (up to the first dot of
    the file name)."""
    folder, name = os.path.split(member_name)
    return os.path.join(folder, name.split('.', 1)[0]), name.split('.', 1)[-1].lower()


def count_images(url):
    """Samples with an image in the local tar ``url``; a file that is not a readable tar is a DataError."""
    try:
        with tarfile.open(url) as archive:
            keys = {sample_key(m.name)[0] for m in archive if m.isfile() and sample_key(m.name)[1] in IMAGE_SUFFIXES}
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"shard {url} is not a readable tar file ({type(error).__name__}: {error})") from None
    return len(keys)


def sample_index(key):
    """The index in the per-sample seed: the key itself when numeric (make_shards: the image's index in its
    folder), else a stable hash of it."""
    name = os.path.basename(key)
    return int(name) if name.isdigit() else zlib.crc32(key.encode())


class ShardDataset(IterableDataset):
    """Multi-crop views of the images of WebDataset shards, ``(views, label or -1)`` per image; call
    :meth:`configure` (``build_loader`` does) and :meth:`set_epoch` (``datasets.set_epoch``)."""

    def __init__(self, pattern, transform=None, on_bad_image='skip', seed=0, epoch_images=0, shuffle_buffer=1000):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got '{on_bad_image}'")
        self.root, self.transform, self.on_bad_image = pattern, transform, on_bad_image
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.urls = expand_shards(pattern)
        if epoch_images <= 0:
            remote = [url for url in self.urls if is_remote(url)]
            if remote:
                raise DataError(f"shard {remote[0]} is not a local file: give the images per epoch with "
                                f"--shard_epoch_images")
            epoch_images = sum(count_images(url) for url in self.urls)
            if not epoch_images:
                raise DataError(f"the {len(self.urls)} shards of {pattern} hold no images")
        self.epoch_images = epoch_images
        self.world_size, self.rank = utils.get_world_size(), utils.get_rank()
        self.batch_size, self.step_batches = 1, 1
        self.epoch, self.start_batch = 0, 0
        self._bad_count = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self):
        """Images this process yields in the current epoch (from ``start_batch`` on)."""
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    @property
    def batches_per_epoch(self):
        """This process's micro-batches per epoch: whole optimizer steps of the epoch's images."""
        batches = self.epoch_images // (self.world_size * self.batch_size)
        return batches - batches % self.step_batches

    def configure(self, batch_size, step_batches=1):
        self.batch_size, self.step_batches = batch_size, step_batches

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def num_bad_images(self):
        return int(self._bad_count)

    def shards_of(self, rank, worker, workers):
        """The shards of process ``rank``'s loader worker ``worker`` (of ``workers``) in this epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [self.urls[i] for i in torch.randperm(len(self.urls), generator=generator).tolist()]
        return order[rank * workers + worker::self.world_size * workers]

    def raw_samples(self, shards, rank, worker):
        """The undecoded samples of ``shards``, one shuffled pass after another."""
        for repeat in itertools.count():
            samples = tariterators.tarfile_samples(iter([{'url': url} for url in shards]), handler=self._shard_error)
            if self.shuffle_buffer > 1:
                seed = sample_seed(self.seed, self.epoch, (rank * 1_000_003 + worker) * 1_000_003 + repeat)
                samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                                              seed=seed)(samples)
            count = 0
            for count, sample in enumerate(samples, 1):
                yield sample
            if not count:
                raise DataError(f"shards {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''} hold no samples")

    @staticmethod
    def _shard_error(error):
        raise DataError(f"unreadable shard data ({type(error).__name__}: {str(error).splitlines()[0]})") from None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream(self.rank, worker, workers)

    def stream(self, rank, worker, workers):
        """The (views, label) of one process's loader worker in this epoch: its batches ``worker``,
        ``worker + workers``, ... of the epoch, from ``start_batch`` on."""
        shards = self.shards_of(rank, worker, workers)
        if not shards:
            raise DataError(f"{len(self.urls)} shards are fewer than {self.world_size} processes x {workers} loader "
                            f"workers: write more shards or lower --num_workers")
        skipped = len(range(worker, self.start_batch, workers)) * self.batch_size
        wanted = len(range(worker, self.batches_per_epoch, workers)) * self.batch_size - skipped
        samples = itertools.islice(self.raw_samples(shards, rank, worker), skipped, None)
        while wanted > 0:
            sample = next(samples)
            image = self.decode(sample, getattr(self.transform, 'decode_size', None))
            if image is None:
                continue
            with seeded_rng(sample_seed(self.seed, self.epoch, sample_index(sample['__key__']))):
                views = self.transform(image) if self.transform is not None else image
            label = int(sample['cls']) if 'cls' in sample else -1
            wanted -= 1
            yield views, label

    def decode(self, sample, decode_size=None):
        """The image of ``sample``, or None for an unreadable one with on_bad_image='skip'; ``decode_size``: see
        :func:`datasets.folder.load_image`."""
        name = f"{sample['__key__']} in {sample.get('__url__', self.root)}"
        data = next((sample[suffix] for suffix in IMAGE_SUFFIXES if suffix in sample), None)
        try:
            if data is None:
                raise ValueError(f"no image file ({', '.join(IMAGE_SUFFIXES[:3])}, ...) in the sample")
            return load_image(io.BytesIO(data), decode_size)
        except DECODE_ERRORS as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            if self.on_bad_image == 'fail':
                raise DataError(f"unreadable image {name} ({reason})") from None
            self._bad_count += 1
            logger.warning("skipping unreadable image %s (%s); the next sample replaces it", name, reason)
            return None

    def first_image(self):
        """The first readable image of the first shard (the attention picture of --vis_freq)."""
        for sample in tariterators.tarfile_samples(iter([{'url': self.urls[0]}]), handler=self._shard_error):
            image = self.decode(sample)
            if image is not None:
                return image
        raise DataError(f"no readable image in shard {self.urls[0]}")

    def build_loader(self, batch_size, num_workers, step_batches=1, nice=0):
        """The loader of this stream: batches of ``batch_size``, epochs of whole steps of ``step_batches``."""
        if len(self.urls) < self.world_size * max(num_workers, 1):
            raise DataError(f"{len(self.urls)} shards are fewer than {self.world_size} processes x "
                            f"{max(num_workers, 1)} loader workers: write more shards or lower --num_workers")
        self.configure(batch_size, step_batches)
        return DataLoader(self, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                          drop_last=True, worker_init_fn=functools.partial(worker_init, nice=nice))


def write_shards(dataset, pattern, images_per_shard):
    """Pack the image files of ``dataset`` (class folders, an unlabelled folder or a list: samples are paths)
    into tar shards ``pattern % shard_number`` of ``images_per_shard`` images each, in the dataset's order: key
    the image's index (9 digits), the file's bytes unchanged under its suffix, the label as .cls when there is
    one. Returns the shard paths."""
    if not all(isinstance(path, str) and os.path.isfile(path) for path, _ in dataset.samples[:1]):
        raise DataError(f"{dataset.root}: only image files (a folder or a list) can be packed into shards")
    os.makedirs(os.path.dirname(os.path.abspath(pattern % 0)), exist_ok=True)
    written = []
    with wds.ShardWriter(pattern, maxcount=images_per_shard, verbose=0) as writer:
        for index, (path, label) in enumerate(dataset.samples):
            suffix = os.path.splitext(path)[1].lower().lstrip('.')
            with open(path, 'rb') as file:
                sample = {'__key__': f"{index:09d}", suffix if suffix in IMAGE_SUFFIXES else 'jpg': file.read()}
            if label >= 0:
                sample['cls'] = str(label).encode()
            writer.write(sample)
            if writer.fname not in written:
                written.append(writer.fname)
    return written
