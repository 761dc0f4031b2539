import argparse
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from datasets import (FASHION_MNIST_CLASSES, DataAugmentationDEIT, DataAugmentationDINO, DataError,
                      EpochRandomSampler, ImageFolderDataset, ZipImageFolder, build_dataset, build_loader,
                      build_transform, demo_data_path, fashion_mnist_folder, load_fashion_mnist, worker_nice)
from datasets.fashion_mnist import DEMO_SPLITS, FASHION_MNIST_DIR
from datasets.folder import load_image, load_rgb
from datasets.transforms import to_normalized_tensor
from datasets import eval_transform


def random_image(size, mode='RGB', seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def jpeg_bytes(seed, size=48):
    buffer = io.BytesIO()
    random_image(size, seed=seed).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 3 images in mixed formats and modes, plus a nested sub-folder and a non-image file."""
    root = tmp_path / 'train'
    for class_index, name in enumerate(['cat', 'dog', 'emu']):
        (root / name / 'nested').mkdir(parents=True)
        random_image(20, 'RGB', seed=class_index).save(root / name / 'a.png')
        random_image(24, 'L', seed=10 + class_index).save(root / name / 'b.png')
        random_image(30, 'RGBA', seed=20 + class_index).save(root / name / 'nested' / 'c.png')
    (root / 'cat' / 'notes.txt').write_text('not an image and not an image extension')
    return root


def small_tensor(image):
    return to_normalized_tensor(image.resize((16, 16)))


def zip_folder(folder, zip_path, prefix=''):
    with zipfile.ZipFile(zip_path, 'w') as archive:
        for path in sorted(folder.rglob('*')):
            if path.is_file():
                archive.write(path, str(Path(prefix) / path.relative_to(folder)))
    return zip_path


def dino_args(**overrides):
    args = dict(aug_opt='dino_aug', global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                local_crops_number=[2], local_crops_size=[32], blur_radius=(0.1, 2.0), use_dense_prediction=True,
                region_matching='feature')
    return argparse.Namespace(**{**args, **overrides})


# ---------------------------------------------------------------- multi-crop transforms

def test_dino_multicrop_full_size_groups():
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [6, 2], [96, 128])
    crops = transform(random_image(256))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6 + [(3, 128, 128)] * 2
    assert transform.crop_sizes() == [224, 224] + [96] * 6 + [128] * 2
    assert len(transform) == 10
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_dino_multicrop_small_cpu_sizes_from_a_28px_image():
    transform = build_transform(dino_args(), global_crops_size=64)
    crops = transform(random_image(28))
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    assert -2.2 < min(c.min() for c in crops) and max(c.max() for c in crops) < 2.7  # ImageNet-normalised
    no_local = build_transform(dino_args(local_crops_number=0, local_crops_size=32), global_crops_size=64)
    assert no_local.crop_sizes() == [64, 64]


def test_dino_views_differ_and_solarize_blur_only_where_configured():
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [1], [32], global_crops_size=64)
    views = transform.global_views + transform.local_views
    assert [(v.blur_p, v.solarize_p) for v in views] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    assert [v.scale for v in views] == [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4)]  # how often: tests/test_augmentation.py
    image = random_image(80)
    torch.manual_seed(0)
    a, b, _ = transform(image)
    assert not torch.equal(a, b)


def test_grey_images_are_augmented_on_one_band_into_the_views_of_their_rgb_copy():
    grey_png = io.BytesIO()
    random_image(28, 'L', seed=5).save(grey_png, format='PNG')
    grey = load_image(grey_png)
    assert grey.mode == 'L' and load_rgb(grey_png).mode == 'RGB'
    dino = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [2], [32], global_crops_size=64)
    for transform in (dino, eval_transform(64)):
        for seed in range(12):  # enough draws for jitter, grayscale, blur and solarisation to happen
            torch.manual_seed(seed)
            from_grey = transform(grey)
            torch.manual_seed(seed)
            from_rgb = transform(grey.convert('RGB'))
            for view_grey, view_rgb in zip(*(v if isinstance(v, list) else [v] for v in (from_grey, from_rgb))):
                assert view_grey.shape == view_rgb.shape and view_grey.shape[0] == 3
                assert torch.equal(view_grey, view_rgb)
    assert not torch.equal(*dino(grey)[:2])


def test_deit_aug_and_unknown_option():
    from engine import parse_args
    deit_args = parse_args(['--aug-opt', 'deit_aug', '--local_crops_number', '2', '--local_crops_size', '32',
                            '--data_path', 'unused'])
    transform = build_transform(deit_args, global_crops_size=64)
    assert isinstance(transform, DataAugmentationDEIT)
    assert [tuple(c.shape) for c in transform(random_image(40))] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in transform(random_image(40, 'L'))] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    with pytest.raises(ValueError, match='dino_aug, deit_aug'):
        build_transform(dino_args(aug_opt='mocov2_aug'))
    with pytest.raises(ValueError, match='same length'):
        DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [6, 2], [96])


# ---------------------------------------------------------------- folder and zip datasets

def test_folder_and_zip_give_identical_samples(image_folder, tmp_path):
    folder = ImageFolderDataset(image_folder, transform=ToTensor())
    archive = build_dataset(zip_folder(image_folder, tmp_path / 'train.zip'), ToTensor(), zip_mode=True)
    assert folder.classes == archive.classes == ['cat', 'dog', 'emu']
    assert len(folder) == len(archive) == 9
    assert [str(Path(p).relative_to(image_folder)) for p, _ in folder.samples] == [p for p, _ in archive.samples]
    assert folder.targets == archive.targets
    for index in range(len(folder)):
        (image_f, target_f), (image_z, target_z) = folder[index], archive[index]
        assert torch.equal(image_f, image_z) and target_f == target_z
        grey = Path(folder.samples[index][0]).name == 'b.png'  # RGBA and RGB come out in RGB, L stays L
        assert image_f.shape[0] == (1 if grey else 3)


def test_build_dataset_zip_mode_finds_train_zip_and_prefix(image_folder, tmp_path):
    zip_folder(image_folder, tmp_path / 'train.zip')
    assert len(build_dataset(tmp_path, zip_mode=True)) == 9
    prefixed = zip_folder(image_folder, tmp_path / 'both.zip', prefix='train')
    assert build_dataset(prefixed, zip_mode=True, zip_prefix='train').classes == ['cat', 'dog', 'emu']
    assert build_dataset(prefixed, zip_mode=True).classes == ['train']


def test_zip_dataset_with_two_workers_counts_bad_images_across_workers(image_folder, tmp_path):
    (image_folder / 'dog' / 'broken.jpg').write_bytes(jpeg_bytes(1)[:400])
    dataset = ZipImageFolder(zip_folder(image_folder, tmp_path / 'train.zip'),
                             transform=small_tensor)
    dataset.read_image(dataset.samples[0][0])  # a ZipFile opened in the parent must not leak into workers
    assert pickle.loads(pickle.dumps(dataset))._archive is None  # what spawned workers receive
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    images, targets = zip(*[(images, targets) for images, targets in loader])
    assert torch.cat(images).shape == (10, 3, 16, 16)
    broken = [p for p, _ in dataset.samples].index('dog/broken.jpg')
    expected = dataset.targets[:broken] + [dataset.targets[broken + 1]] + dataset.targets[broken + 1:]
    assert torch.cat(targets).tolist() == expected
    assert dataset.num_bad_images == 1 and dataset.bad_images == ['dog/broken.jpg']


def test_bad_images_are_skipped_counted_and_logged_once(image_folder, caplog):
    (image_folder / 'cat' / 'truncated.jpg').write_bytes(jpeg_bytes(0)[:500])
    (image_folder / 'emu' / 'text.jpg').write_text('this is not a JPEG')
    dataset = ImageFolderDataset(image_folder, transform=to_normalized_tensor)
    assert len(dataset) == 11
    with caplog.at_level(logging.WARNING, logger='datasets.folder'):
        for _ in range(2):
            items = [dataset[i] for i in range(len(dataset))]
    assert all(image.shape[0] == 3 for image, _ in items)
    assert dataset.num_bad_images == 2
    assert sorted(Path(p).name for p in dataset.bad_images) == ['text.jpg', 'truncated.jpg']
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and any('truncated.jpg' in w for w in warnings)
    truncated = [Path(p).name for p, _ in dataset.samples].index('truncated.jpg')
    assert torch.equal(dataset[truncated][0], dataset[truncated + 1][0])  # replaced by the next sample


def test_bad_image_fail_mode_raises_naming_the_file(image_folder, tmp_path):
    (image_folder / 'cat' / 'truncated.jpg').write_bytes(jpeg_bytes(0)[:500])
    for dataset in (ImageFolderDataset(image_folder, on_bad_image='fail'),
                    ZipImageFolder(zip_folder(image_folder, tmp_path / 'train.zip'), on_bad_image='fail')):
        index = [Path(p).name for p, _ in dataset.samples].index('truncated.jpg')
        with pytest.raises(DataError, match='truncated.jpg') as error:
            dataset[index]
        assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match='on_bad_image'):
        ImageFolderDataset(image_folder, on_bad_image='ignore')


def test_unusable_paths_raise_data_error_naming_the_path(tmp_path):
    missing, empty, no_images = tmp_path / 'missing', tmp_path / 'empty', tmp_path / 'no_images'
    empty.mkdir()
    (no_images / 'cls').mkdir(parents=True)
    (no_images / 'cls' / 'readme.txt').write_text('x')
    for path in (missing, empty, no_images):
        with pytest.raises(DataError, match=str(path)) as error:
            build_dataset(path, zip_mode=False)
        assert '\n' not in str(error.value)
    with pytest.raises(DataError, match=str(missing / 'train.zip')):
        build_dataset(missing, zip_mode=True)
    text_zip = tmp_path / 'text.zip'
    with zipfile.ZipFile(text_zip, 'w') as archive:
        archive.writestr('cls/readme.txt', 'x')
    with pytest.raises(DataError, match=str(text_zip)):
        build_dataset(text_zip, zip_mode=True)


# ---------------------------------------------------------------- loader

def test_loader_batches_multicrop_views_and_reshuffles_per_epoch(image_folder):
    dataset = ImageFolderDataset(image_folder, transform=build_transform(dino_args(), global_crops_size=64))
    loader = build_loader(dataset, batch_size=4, num_workers=0, distributed=False, seed=3)
    assert isinstance(loader.sampler, EpochRandomSampler) and len(loader) == 2  # 9 images, drop_last
    views, targets = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append(list(loader.sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(9))


class WorkerNiceness(torch.utils.data.Dataset):
    """Each item: the niceness of the process that loads it, and a random draw (the augmentation stream)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor([os.nice(0), torch.randint(1000, ()).item()])


def test_cpu_runs_load_data_in_workers_at_the_lowest_priority():
    assert worker_nice(torch.device('cpu')) == 19 and worker_nice(torch.device('cuda')) == 0
    parent = os.nice(0)
    batches = {}
    for nice in (0, 19):
        loader = build_loader(WorkerNiceness(), batch_size=2, num_workers=2, distributed=False, seed=1, nice=nice)
        batches[nice] = torch.cat(list(loader))
    assert batches[19][:, 0].tolist() == [min(parent + 19, 19)] * 4 and batches[0][:, 0].tolist() == [parent] * 4
    assert torch.equal(batches[19][:, 1], batches[0][:, 1])  # same samples, same augmentation draws
    assert os.nice(0) == parent


def test_loader_distributed_uses_distributed_sampler(image_folder, tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        loader = build_loader(ImageFolderDataset(image_folder, transform=ToTensor()), batch_size=2,
                              num_workers=0, distributed=True, seed=0)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert sorted(loader.sampler) == list(range(9)) and len(loader) == 4
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- demo and Fashion-MNIST

def test_demo_data_extracts_once_with_ten_classes(tmp_path):
    for split, (_, per_class) in DEMO_SPLITS.items():
        root = demo_data_path(split, cache_dir=tmp_path)
        dataset = ImageFolderDataset(root)
        assert dataset.classes == sorted(FASHION_MNIST_CLASSES)
        assert np.bincount(dataset.targets).tolist() == [per_class] * 10
        image, _ = dataset[0]
        assert image.size == (28, 28) and image.mode == 'L'
    marker = root / dataset.classes[0]
    stamp = marker.stat().st_mtime_ns
    assert demo_data_path('val', cache_dir=tmp_path) == root and marker.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match='train'):
        demo_data_path('test', cache_dir=tmp_path)


def test_demo_zip_reads_like_its_extracted_folder(tmp_path):
    from datasets.fashion_mnist import DEMO_ZIP
    folder = ImageFolderDataset(demo_data_path('val', cache_dir=tmp_path), transform=ToTensor())
    archive = ZipImageFolder(DEMO_ZIP, prefix='val', transform=ToTensor())
    assert folder.targets == archive.targets and len(archive) == 1000
    for index in (0, 517, 999):
        assert torch.equal(folder[index][0], archive[index][0])


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason='apt-get install dataset-fashion-mnist')
def test_fashion_mnist_folder_export_matches_idx(tmp_path):
    images, labels = load_fashion_mnist(None, 'test')
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    out = fashion_mnist_folder(None, 'test', tmp_path / 'test', per_class=3)
    dataset = ImageFolderDataset(out)
    assert len(dataset) == 30 and dataset.classes == sorted(FASHION_MNIST_CLASSES)
    for path, target in dataset.samples:
        index = int(Path(path).stem)
        assert dataset.classes[target] == FASHION_MNIST_CLASSES[labels[index]]
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image), images[index])
