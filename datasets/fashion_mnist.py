"""Fashion-MNIST as class folders, and the small demo subset committed to this repository.

Source: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist),
Copyright 2017 Zalando SE, MIT licence (see datasets/demo/LICENSE-fashion-mnist). The IDX files come from
the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), installed in
/usr/share/datasets/fashion-mnist: 60,000 train and 10,000 test 28x28 grayscale product photos, 10 classes.

The demo (`datasets/demo/fashion_mnist_demo.zip`, built by scripts/make_demo_data.py) holds PNGs in class
folders: train/ = the first 200 images of each class of the train split, val/ = the first 100 of each
class of the test split; file names are the indices in the split. `demo_data_path(split)` extracts it once
to `$ESVIT_CACHE_DIR/demo` (default `$XDG_CACHE_HOME/esvit/demo`, i.e. `~/.cache/esvit/demo`), in a folder
named after the zip's hash, and returns the ImageFolder root of the split.
"""
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .folder import DataError

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat',
                         'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')  # by label index
IDX_FILE_PREFIX = {'train': 'train', 'test': 't10k'}

DEMO_ZIP = Path(__file__).resolve().parent / 'demo' / 'fashion_mnist_demo.zip'
DEMO_SPLITS = {'train': ('train', 200), 'val': ('test', 100)}  # demo split: (source split, images per class)


def read_idx(path):
    """The uint8 array stored in a gzipped IDX file."""
    with gzip.open(path, 'rb') as file:
        data = file.read()
    if data[:3] != b'\x00\x00\x08':
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root=None, split='train'):
    """(images N x 28 x 28 uint8, labels N) of the 'train' or 'test' split."""
    if split not in IDX_FILE_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be one of {tuple(IDX_FILE_PREFIX)}, got '{split}'")
    root = Path(root or FASHION_MNIST_DIR)
    prefix = IDX_FILE_PREFIX[split]
    images_path, labels_path = root / f'{prefix}-images-idx3-ubyte.gz', root / f'{prefix}-labels-idx1-ubyte.gz'
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(f"Fashion-MNIST IDX files not found in {root} (apt-get install dataset-fashion-mnist)")
    return read_idx(images_path), read_idx(labels_path)


def first_per_class(labels, per_class=None):
    """Indices of the first `per_class` samples of each class, in file order (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]))


def fashion_mnist_folder(root, split, out_dir, per_class=None):
    """Export a Fashion-MNIST split as PNG class folders (`out_dir/<class>/<index>.png`); returns out_dir.

    `root` is the folder of the IDX files (None: the Debian package's). An export already complete for the
    same split and per_class is kept as is; any other content of the class folders is replaced.
    """
    out_dir = Path(out_dir)
    marker, signature = out_dir / '.complete', f'Fashion-MNIST {split} per_class={per_class}\n'
    if marker.is_file() and marker.read_text() == signature:
        return out_dir
    images, labels = load_fashion_mnist(root, split)
    indices = first_per_class(labels, per_class)
    marker.unlink(missing_ok=True)
    for name in FASHION_MNIST_CLASSES:  # drop what an export with other settings left
        shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / name).mkdir(parents=True)
    for index in indices:
        class_name = FASHION_MNIST_CLASSES[labels[index]]
        Image.fromarray(images[index]).save(out_dir / class_name / f'{index:05d}.png', optimize=True)
    marker.write_text(signature)
    return out_dir


def default_cache_dir():
    """$ESVIT_CACHE_DIR, else $XDG_CACHE_HOME/esvit (~/.cache/esvit)."""
    if 'ESVIT_CACHE_DIR' in os.environ:
        return Path(os.environ['ESVIT_CACHE_DIR'])
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'esvit'


def demo_data_path(split='train', cache_dir=None):
    """ImageFolder root of the demo 'train' or 'val' split, extracting the committed zip on first use."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo split must be one of {tuple(DEMO_SPLITS)}, got '{split}'")
    if not DEMO_ZIP.is_file():
        raise DataError(f"demo data {DEMO_ZIP} is missing (build it with scripts/make_demo_data.py)")
    version = hashlib.sha256(DEMO_ZIP.read_bytes()).hexdigest()[:12]
    demo_root = Path(cache_dir or default_cache_dir()) / 'demo'
    extracted = demo_root / f'fashion_mnist_demo-{version}'
    if not extracted.is_dir():
        demo_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix='.extracting-', dir=demo_root))
        with zipfile.ZipFile(DEMO_ZIP) as archive:
            archive.extractall(staging)
        try:
            staging.rename(extracted)
        except OSError:  # another process extracted it meanwhile
            shutil.rmtree(staging)
    return extracted / split
