"""A dense benchmark from real images: Fashion-MNIST garments composed on canvases, with exact masks.

    root = build_scenes(out_dir, num_train=2000, num_val=500, seed=0, source=None, classes=None, canvas_size=64)
    root = demo_scenes_path()    # the scenes of the embedded demo data, built once in the cache

Each canvas (``canvas_size`` px, grey) has a smooth random background (values 0..BACKGROUND_MAX) and 2 to 4
garments: real 28 x 28 Fashion-MNIST photos rescaled (bilinear) to a random side in ``garment_sizes``, at
random positions (they may overlap; a later garment covers an earlier one; ``max_overlap`` < 1 bounds the
fraction of each garment that the later ones hide). A garment's pixels are those of its
rescaled photo of value >= GARMENT_THRESHOLD; exactly there the canvas takes the photo's value and the mask the
garment's class, label + 1 (1..10); everywhere else the mask is 0 (background). Train canvases use garments
of the source's train split, val canvases those of its test split. Everything follows from ``seed``.

Written under ``out_dir``:

- the Pascal VOC layout: ``JPEGImages/<id>.png`` (lossless), ``SegmentationClass/<id>.png`` (grey class
  indices), ``ImageSets/Segmentation/{train,val}.txt``; ``classes.txt``: the name of each mask value;
- ``pretrain/scenes/<id>.png``: the train canvases without labels, an ImageFolder for main_esvit.py;
- ``largest/{train,val}/<class>/<id>.png``: the canvases in class folders of their largest visible garment,
  for eval_knn.py and ``run_analysis.py --measure_correspondence``.

The copies are hard links where the file system allows. ``source`` None: the embedded demo subset
(datasets/fashion_mnist.py: 200 train and 100 test photos per class); a folder: the full Fashion-MNIST IDX
files there (``'full'``: /usr/share/datasets/fashion-mnist). ``classes``: the label indices whose garments are
used (default: all 10).
"""
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .fashion_mnist import (DEMO_ZIP, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, default_cache_dir, demo_data_path,
                            load_fashion_mnist)
from .folder import DataError

GARMENT_THRESHOLD = 32   # a rescaled photo's pixel of this value or more belongs to the garment
BACKGROUND_MAX = 40      # the background's values lie in 0..BACKGROUND_MAX (below most garment pixels)
GARMENTS_PER_CANVAS = (2, 4)
PLACEMENT_TRIES = 50   # random positions tried per garment under a max_overlap
SCENE_SPLITS = {'train': 'train', 'val': 'test'}  # scene split: the Fashion-MNIST split of its garments
SCENE_CLASSES = ('background',) + FASHION_MNIST_CLASSES  # mask value -> name


def demo_garments(split):
    """(images N x 28 x 28 uint8, labels N) of the embedded demo split ('train' or 'test')."""
    root = demo_data_path('train' if split == 'train' else 'val')
    images, labels = [], []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        for path in sorted((root / name).glob('*.png')):
            images.append(np.asarray(Image.open(path).convert('L')))
            labels.append(label)
    return np.stack(images), np.array(labels)


def load_garments(source, split):
    """The garment photos of ``split`` ('train' | 'test') from ``source`` (see the module docstring)."""
    if source is None:
        return demo_garments(split)
    return load_fashion_mnist(FASHION_MNIST_DIR if source == 'full' else source, split)


def smooth_background(rng, size):
    """size x size uint8 in 0..BACKGROUND_MAX: bilinearly upsampled 4 x 4 noise (a soft, varying texture)."""
    coarse = Image.fromarray(rng.integers(0, BACKGROUND_MAX + 1, (4, 4), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR))


def compose_scene(rng, garments, labels, canvas_size=64, garment_sizes=(20, 40), per_canvas=GARMENTS_PER_CANVAS,
                  max_overlap=1.0):
    """One canvas: (image S x S uint8, mask S x S uint8 with 0 = background and label + 1 on each garment's
    pixels, [(index into garments, side, top, left)] of the garments in painting order); ``per_canvas``: the
    least and most garments on it. ``max_overlap`` < 1: each garment is placed at the first of up to
    PLACEMENT_TRIES random positions (and sides) that hides at most that fraction of every garment already
    there, else at the try that hides the least; 1: the first position drawn (garments may hide each other)."""
    image = smooth_background(rng, canvas_size).copy()
    mask = np.zeros((canvas_size, canvas_size), np.uint8)
    owner = np.full((canvas_size, canvas_size), -1, np.int16)  # S x S: which placed garment shows at a pixel
    full_areas = np.zeros(0, np.int64)  # the pixel count of each placed garment
    placed = []
    for _ in range(rng.integers(per_canvas[0], per_canvas[1] + 1)):
        index = rng.integers(len(garments))
        best = None
        visible = np.bincount(owner.ravel() + 1, minlength=len(placed) + 1)[1:]  # pixels of each placed garment shown
        for _ in range(PLACEMENT_TRIES if max_overlap < 1 else 1):
            side = int(rng.integers(garment_sizes[0], garment_sizes[1] + 1))
            top, left = (int(v) for v in rng.integers(0, canvas_size - side + 1, size=2))
            photo = np.asarray(Image.fromarray(garments[index]).resize((side, side), Image.BILINEAR))  # side x side
            pixels = photo >= GARMENT_THRESHOLD
            hidden = np.bincount(owner[top:top + side, left:left + side][pixels] + 1, minlength=len(placed) + 1)[1:]
            # the largest fraction of a placed garment hidden once this one is painted
            worst = ((full_areas - visible + hidden) / full_areas).max() if placed else 0.0
            if best is None or worst < best[0]:
                best = (worst, side, top, left, photo, pixels)
            if worst <= max_overlap:
                break
        _, side, top, left, photo, pixels = best
        image[top:top + side, left:left + side][pixels] = photo[pixels]
        mask[top:top + side, left:left + side][pixels] = labels[index] + 1
        owner[top:top + side, left:left + side][pixels] = len(placed)
        full_areas = np.append(full_areas, max(int(pixels.sum()), 1))
        placed.append((int(index), side, top, left))
    return image, mask, placed


def largest_garment(mask):
    """The label (0..9) of the garment with the most visible pixels of a scene mask."""
    counts = np.bincount(mask.ravel(), minlength=len(SCENE_CLASSES))[1:]
    return int(counts.argmax())


def _link(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_scenes(out_dir, num_train=2000, num_val=500, seed=0, source=None, classes=None, canvas_size=64,
                 garment_sizes=(20, 40), per_canvas=GARMENTS_PER_CANVAS, max_overlap=1.0):
    """Write the scene benchmark to ``out_dir`` (see the module docstring) and return it; a complete build
    with the same settings is kept as it is."""
    out_dir = Path(out_dir)
    classes = sorted(set(range(len(FASHION_MNIST_CLASSES)) if classes is None else classes))
    if not classes or not set(classes) <= set(range(len(FASHION_MNIST_CLASSES))):
        raise DataError(f"scene classes {classes} must be Fashion-MNIST label indices 0..9")
    if not garment_sizes[0] <= garment_sizes[1] <= canvas_size:
        raise DataError(f"garment sizes {garment_sizes} must be ordered and fit the {canvas_size} px canvas")
    if not 1 <= per_canvas[0] <= per_canvas[1]:
        raise DataError(f"garments per canvas {per_canvas} must be ordered and at least 1")
    if not 0 <= max_overlap <= 1:
        raise DataError(f"max overlap {max_overlap} must lie in 0..1 (the fraction of a garment others may hide)")
    signature = (f"scenes num_train={num_train} num_val={num_val} seed={seed} source={source} classes={classes} "
                 f"canvas={canvas_size} sizes={tuple(garment_sizes)} per_canvas={tuple(per_canvas)} "
                 f"max_overlap={max_overlap} demo={DEMO_ZIP.stat().st_size} v2\n")
    marker = out_dir / '.complete'
    if marker.is_file() and marker.read_text() == signature:
        return out_dir
    # written beside out_dir and renamed at the end: processes started together (torchrun) do not collide
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f'.{out_dir.name}.building-{os.getpid()}')
    shutil.rmtree(staging, ignore_errors=True)
    _write_scenes(staging, num_train, num_val, seed, source, classes, canvas_size, garment_sizes, per_canvas,
                  max_overlap)
    (staging / '.complete').write_text(signature)
    if marker.is_file() and marker.read_text() == signature:  # another process finished first
        shutil.rmtree(staging)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:  # another process renamed its build meanwhile
        shutil.rmtree(staging)
    return out_dir


def _write_scenes(out_dir, num_train, num_val, seed, source, classes, canvas_size, garment_sizes, per_canvas,
                  max_overlap):
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation', 'pretrain/scenes'):
        (out_dir / folder).mkdir(parents=True)
    (out_dir / 'classes.txt').write_text(''.join(name + '\n' for name in SCENE_CLASSES))
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        garments, labels = load_garments(source, SCENE_SPLITS[split])
        keep = np.isin(labels, classes)
        garments, labels = garments[keep], labels[keep]
        ids = [f'{split}_{i:05d}' for i in range(count)]
        for scene_id in ids:
            image, mask, _ = compose_scene(rng, garments, labels, canvas_size, garment_sizes, per_canvas,
                                          max_overlap)
            image_path = out_dir / 'JPEGImages' / f'{scene_id}.png'
            Image.fromarray(image).save(image_path)
            Image.fromarray(mask).save(out_dir / 'SegmentationClass' / f'{scene_id}.png')
            if split == 'train':
                _link(image_path, out_dir / 'pretrain' / 'scenes' / f'{scene_id}.png')
            _link(image_path, out_dir / 'largest' / split / FASHION_MNIST_CLASSES[largest_garment(mask)]
                  / f'{scene_id}.png')
        (out_dir / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(''.join(i + '\n' for i in ids))


def demo_scenes_path(cache_dir=None):
    """The scene benchmark of the embedded demo data (2,000 train and 500 val canvases, seed 0), built once
    under the cache directory (see datasets/fashion_mnist.py)."""
    return build_scenes(Path(cache_dir or default_cache_dir()) / 'demo' / 'scenes')
