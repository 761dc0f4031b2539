"""Image datasets over class folders or a zip of class folders, robust to unreadable images.

Both return (image, class_index) and present the ImageFolder interface (root, classes, class_to_idx,
samples, targets). Images come out as PIL images in RGB, or in 'L' when the file holds one grey band
(Fashion-MNIST, the grey JPEGs of ImageNet): every transform of this project ends with
`datasets.transforms.to_normalized_tensor`, which gives 3 channels either way, and DINO's augmentations then
work on one band instead of three identical ones (the same pixels: tests/test_datasets.py).

An unreadable image (truncated, not an image at all) is, with on_bad_image='skip', replaced by the next
readable sample, flagged in shared memory (so counts hold across DataLoader workers) and logged once; with
on_bad_image='fail' it raises DataError naming the file.
"""
import io
import logging
import os
import posixpath
import zipfile
import zlib

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

import utils

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ('skip', 'fail')
DECODE_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, zipfile.BadZipFile, Image.DecompressionBombError)


class DataError(utils.UserError, ValueError):
    """A data path or file that cannot be used; the message names it."""


GREY_MODES = ('1', 'L', 'I', 'I;16', 'F')  # PIL modes with one grey band


def load_image(file, decode_size=None):
    """Decode an image (path or binary file object) once: 'L' if it holds one grey band, else RGB.

    ``decode_size(width, height) -> (w, h)``: the smallest size the transform can use (e.g.
    ``DataAugmentationDINO.decode_size``); a JPEG is then decoded at 1/2, 1/4 or 1/8 scale where that is no
    smaller (``PIL.Image.draft``: the DCT skips the fine frequencies, several times faster than a full decode)."""
    image = Image.open(file)
    if decode_size is not None and image.format == 'JPEG':
        image.draft(None, decode_size(*image.size))
    image.load()
    mode = 'L' if image.mode in GREY_MODES else 'RGB'
    return image if image.mode == mode else image.convert(mode)


def load_rgb(file):
    """Decode an image (path or binary file object) once and return it in RGB."""
    image = load_image(file)
    return image if image.mode == 'RGB' else image.convert('RGB')


class RobustImageDataset(Dataset):
    """Bad-image policy on top of `samples` [(path, class_index)] and a subclass's `read_image(path)`."""

    def _init_bad_image_policy(self, on_bad_image):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got '{on_bad_image}'")
        self.on_bad_image = on_bad_image
        self._bad_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, target = self._first_readable(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _first_readable(self, index):
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if self._bad_flags[candidate]:
                continue
            path, target = self.samples[candidate]
            try:
                return self.read_image(path), target
            except DECODE_ERRORS as error:
                self._flag_bad(candidate, error)
        raise DataError(f"no readable image left in {self.root}")

    def read_image(self, path):
        """The image at ``path`` (a subclass reads other kinds of sample)."""
        with open(path, 'rb') as file:
            return self.decode(file)

    def decode(self, file):
        """Decode ``file`` (a path or binary file object) with :func:`load_image`, at reduced size where the
        transform allows it (its ``decode_size``, e.g. DataAugmentationDINO's)."""
        return load_image(file, getattr(self.transform, 'decode_size', None))

    def describe(self, path):
        """How log and error messages name a sample."""
        return path

    def _flag_bad(self, index, error):
        path = self.describe(self.samples[index][0])
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        if self.on_bad_image == 'fail':
            raise DataError(f"unreadable image {path} ({reason})") from None
        self._bad_flags[index] = 1
        logger.warning("skipping unreadable image %s (%s); the next sample replaces it", path, reason)

    @property
    def num_bad_images(self):
        """How many distinct samples were found unreadable so far (in this process and its workers)."""
        return int(self._bad_flags.sum())

    @property
    def bad_images(self):
        """Paths (zip member names for a zip) of the unreadable samples found so far."""
        return [self.samples[i][0] for i in torch.nonzero(self._bad_flags).flatten().tolist()]


def _check_folder(root):
    if not os.path.exists(root):
        raise DataError(f"data folder {root} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is not a folder")
    if not os.listdir(root):
        raise DataError(f"data folder {root} is empty")


class ImageFolderDataset(RobustImageDataset, ImageFolder):
    """torchvision ImageFolder (root/<class>/.../<image>) with DataError for unusable folders."""

    def __init__(self, root, transform=None, target_transform=None, on_bad_image='skip'):
        root = os.fspath(root)
        _check_folder(root)
        try:
            ImageFolder.__init__(self, root, transform=transform, target_transform=target_transform)
        except FileNotFoundError as error:  # no class folder, or a class folder without images
            raise DataError(f"data folder {root} holds no usable class folders: {error}") from None
        self._init_bad_image_policy(on_bad_image)


def _zip_class_members(zip_path, prefix):
    """{class: [member names]} of the images under `prefix/<class>/` in the zip, listed once."""
    if not os.path.isfile(zip_path):
        raise DataError(f"zip file {zip_path} does not exist")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise DataError(f"{zip_path} is not a valid zip file") from None
    head = f"{prefix}/" if prefix else ''
    members = {}
    for name in names:
        parts = name[len(head):].split('/')
        if (name.startswith(head) and len(parts) >= 2 and parts[0] != '__MACOSX'
                and name.lower().endswith(IMG_EXTENSIONS)):
            members.setdefault(parts[0], []).append(name)
    if not members:
        raise DataError(f"zip file {zip_path} has no class folders with images under '{head or '/'}'")
    return members


class ZipImageFolder(RobustImageDataset):
    """ImageFolder interface over a zip of class folders (`prefix/<class>/.../<image>`), read lazily.

    Members are listed once here; every process opens its own ZipFile on first read, so the dataset
    is safe to fork or spawn into DataLoader workers. Samples are ordered as ImageFolder orders them.
    """

    def __init__(self, zip_path, prefix='', transform=None, target_transform=None, on_bad_image='skip'):
        self.root = os.fspath(zip_path)
        self.prefix = prefix.strip('/')
        self.transform = transform
        self.target_transform = target_transform
        members = _zip_class_members(self.root, self.prefix)
        self.classes = sorted(members)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = [(member, self.class_to_idx[name]) for name in self.classes
                        for member in sorted(members[name], key=posixpath.split)]
        self.targets = [target for _, target in self.samples]
        self._archive, self._archive_pid = None, None
        self._init_bad_image_policy(on_bad_image)

    def read_image(self, member):
        if self._archive_pid != os.getpid():
            self._archive, self._archive_pid = zipfile.ZipFile(self.root), os.getpid()
        return self.decode(io.BytesIO(self._archive.read(member)))

    def describe(self, member):
        return f"{member} in {self.root}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_archive'] = state['_archive_pid'] = None
        return state


def build_dataset(data_path, transform=None, zip_mode=False, on_bad_image='skip', zip_prefix=''):
    """Pre-training dataset: ImageFolder at `data_path`, or with zip_mode the zip `data_path` (a file) or
    `data_path/train.zip` (a folder), whose class folders lie under `zip_prefix`."""
    data_path = os.fspath(data_path)
    if zip_mode:
        zip_path = data_path if os.path.isfile(data_path) else os.path.join(data_path, 'train.zip')
        return ZipImageFolder(zip_path, zip_prefix, transform=transform, on_bad_image=on_bad_image)
    return ImageFolderDataset(data_path, transform=transform, on_bad_image=on_bad_image)
