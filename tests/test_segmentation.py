"""The linear segmentation probe (eval_segmentation.py) and the scene benchmark (datasets/scenes.py): metrics
against a hand count, a perfect feature reaching mIoU 100, image and mask aligned under the joint views, 1 and 2
processes agreeing, one-line errors for bad data, and scenes that are deterministic with exact masks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_segmentation
import utils
from datasets import denormalize
from datasets.folder import DataError
from datasets.scenes import (BACKGROUND_MAX, GARMENT_THRESHOLD, SCENE_CLASSES, build_scenes, compose_scene,
                             load_garments)
from datasets.voc import IGNORE_INDEX, VOCSegmentation, segmentation_train_transform, segmentation_val_transform
from evaluation import parse_eval_args
from evaluation.linear import CachedFeatureBatches, train_one_epoch
from evaluation.segmentation import (LinearSegmenter, SegmentationValidation, dense_cross_entropy,
                                     eval_segmentation as run_probe)
from helpers import ROOT, TINY_MODEL, TINY_OPTS


def one_hot_features(classes, num_labels):
    """N x h x w class indices -> N x h x w x num_labels one-hot floats."""
    return F.one_hot(classes.long(), num_labels).float()


def identity_segmenter(num_labels, size):
    """A LinearSegmenter whose logits are its input features (identity weights, zero bias)."""
    segmenter = LinearSegmenter(num_labels, num_labels, (size, size))
    segmenter.linear.weight.data = torch.eye(num_labels)
    return segmenter


def test_miou_and_pixel_accuracy_match_a_hand_computed_confusion_matrix():
    truth = torch.tensor([[[0, 0, 1, 1], [2, IGNORE_INDEX, 1, 0]]], dtype=torch.uint8)   # 1 x 2 x 4
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 0]]])                            # class 3 never true
    # hand count over the 7 scored pixels (rows: truth 0, 1, 2): [2 1 0 0], [0 2 0 1], [0 0 1 0]
    # IoU: 0 -> 2/(3+2-2), 1 -> 2/(3+3-2), 2 -> 1/1; class 3 has no true pixel and is left out of the mean
    expected_iou = [2 / 3, 2 / 4, 1.0]
    # logits of the predicted class at the mask's own size (2 x 4 "tokens": bilinear resizing to 2 x 4 is exact)
    segmenter = identity_segmenter(4, 4)
    segmenter.mask_size = (2, 4)
    validation = SegmentationValidation(4, features=one_hot_features(predicted, 4), masks=truth)
    stats = validation.evaluate(segmenter, torch.device('cpu'))
    assert stats['miou'] == pytest.approx(100 * sum(expected_iou) / 3)
    assert stats['pixel_acc'] == pytest.approx(100 * 5 / 7)
    assert stats['iou'][:3] == pytest.approx([100 * v for v in expected_iou]) and stats['iou'][3] is None


def test_features_that_encode_the_class_reach_miou_100():
    # stripes of one token (rows in half the images, columns in the others): a pixel's bilinear mix of the
    # logits of its 2 x 2 nearest tokens gives its own token the most weight (0.625 against 0.375), whereas
    # at the corner of a random token layout two neighbours of one other class could outweigh it
    generator = torch.Generator().manual_seed(0)
    stripes = torch.randint(0, 5, (12, 4, 1), generator=generator).expand(12, 4, 4)
    token_classes = torch.cat([stripes[:6], stripes[6:].transpose(1, 2)])           # N x h x w
    masks = token_classes.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)  # N x 16 x 16
    features = one_hot_features(token_classes, 5) + 0.05 * torch.randn(12, 4, 4, 5, generator=generator)
    torch.manual_seed(0)
    segmenter = LinearSegmenter(5, 5, (16, 16))
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=0.5, momentum=0.9)
    batches = CachedFeatureBatches(features, masks, batch_size=4)
    for epoch in range(15):
        batches.set_epoch(epoch)
        train_one_epoch(segmenter, torch.nn.Identity(), optimizer, batches, epoch, torch.device('cpu'),
                        print_freq=1000, criterion=dense_cross_entropy)
    stats = SegmentationValidation(5, features=features, masks=masks).evaluate(segmenter, torch.device('cpu'))
    assert stats['miou'] == 100.0 and stats['pixel_acc'] == 100.0


def write_voc(root, images, masks, splits):
    """A VOC-layout folder: images / masks (H x W uint8 arrays) by id, and {split: [ids]}."""
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, image in images.items():
        Image.fromarray(image).save(root / 'JPEGImages' / f'{image_id}.png')
    for image_id, mask in masks.items():
        Image.fromarray(mask).save(root / 'SegmentationClass' / f'{image_id}.png')
    for split, ids in splits.items():
        (root / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(''.join(i + '\n' for i in ids))
    return root


def test_image_and_mask_stay_aligned_under_the_joint_views(tmp_path):
    # a mask drawn from the image itself: random 8 x 8 px blocks, black (class 0) or white (class 1)
    block_classes = np.random.default_rng(0).integers(0, 2, (8, 8))
    mask = np.kron(block_classes, np.ones((8, 8), int)).astype(np.uint8)          # 64 x 64
    root = write_voc(tmp_path, {'a': mask * 255}, {'a': mask}, {'train': ['a']})
    views = {'train': segmentation_train_transform(32), 'val': segmentation_val_transform(32)}
    for name, view in views.items():
        mirrored, seen = [], set()
        dataset = VOCSegmentation(root, 'train', view)
        for seed in range(12):
            torch.manual_seed(seed)
            image, view_mask = dataset[0]
            from_image = (denormalize(image)[0] > 0.5).long()                          # 32 x 32: the class shown
            assert view_mask.shape == (32, 32) and view_mask.dtype == torch.uint8
            agreement = (from_image == view_mask.long()).float().mean().item()
            # edge pixels only: 0.994-1 (train), 0.972 (val: 64 -> 37 px puts edges mid-pixel); torchvision's
            # default NEAREST for masks, off by up to a pixel, gave 0.92-0.98
            assert agreement > 0.965, (name, seed, agreement)
            # a flip of the mask alone would not hold: the check can fail
            mirrored.append((from_image == view_mask.long().flip(-1)).float().mean().item())
            seen.add(view_mask.numpy().tobytes())
        assert np.mean(mirrored) < 0.8
        assert len(seen) == (12 if name == 'train' else 1)  # random crops and flips; one centre crop


def test_scenes_are_deterministic_and_masks_are_the_garments_pixels(tmp_path):
    garments, labels = load_garments(None, 'test')
    image, mask, placed = compose_scene(np.random.default_rng(3), garments, labels)
    expected = np.zeros_like(mask)
    painted = np.zeros_like(image)
    for index, side, top, left in placed:  # the garments' own pixels, painted in order
        photo = np.asarray(Image.fromarray(garments[index]).resize((side, side), Image.BILINEAR))
        region = (slice(top, top + side), slice(left, left + side))
        expected[region][photo >= GARMENT_THRESHOLD] = labels[index] + 1
        painted[region][photo >= GARMENT_THRESHOLD] = photo[photo >= GARMENT_THRESHOLD]
    assert 2 <= len(placed) <= 4
    assert np.array_equal(mask, expected)
    assert np.array_equal(image[mask > 0], painted[mask > 0]) and image[mask == 0].max() <= BACKGROUND_MAX

    first = build_scenes(tmp_path / 'a', num_train=6, num_val=3, seed=5)
    again = build_scenes(tmp_path / 'b', num_train=6, num_val=3, seed=5)
    other = build_scenes(tmp_path / 'c', num_train=6, num_val=3, seed=6)
    files = sorted(p.relative_to(first) for p in first.rglob('*.png'))
    assert len(files) == 2 * 9 + 6 + 9  # images, masks, pretrain copies, largest-garment copies
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)
    for scene_id in (first / 'ImageSets/Segmentation/val.txt').read_text().split():
        scene = np.asarray(Image.open(first / 'JPEGImages' / f'{scene_id}.png'))
        scene_mask = np.asarray(Image.open(first / 'SegmentationClass' / f'{scene_id}.png'))
        assert scene_mask.max() <= 10 and (scene[scene_mask > 0] >= GARMENT_THRESHOLD).all()
        assert (scene[scene_mask == 0] <= BACKGROUND_MAX).all()


def test_scenes_take_the_number_and_sizes_of_garments_asked_for(tmp_path):
    garments, labels = load_garments(None, 'test')
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, mask, placed = compose_scene(rng, garments, labels, 64, (32, 56), per_canvas=(2, 3))
        assert 2 <= len(placed) <= 3 and all(32 <= side <= 56 for _, side, _, _ in placed)
    _, _, placed = compose_scene(rng, garments, labels, 64, (20, 40), per_canvas=(1, 1))
    assert len(placed) == 1
    with pytest.raises(DataError, match='garments per canvas'):
        build_scenes(tmp_path / 'bad', num_train=2, num_val=1, per_canvas=(3, 2))


def hidden_fractions(garments, placed, canvas_size=64):
    """The fraction of each placed garment's pixels that the garments painted after it cover (from the
    placements alone, not the generator's bookkeeping)."""
    footprints = []
    for index, side, top, left in placed:
        photo = np.asarray(Image.fromarray(garments[index]).resize((side, side), Image.BILINEAR))
        footprint = np.zeros((canvas_size, canvas_size), bool)
        footprint[top:top + side, left:left + side] = photo >= GARMENT_THRESHOLD
        footprints.append(footprint)
    return [(mine & np.any(footprints[k + 1:], axis=0)).sum() / mine.sum() if k + 1 < len(footprints) else 0.0
            for k, mine in enumerate(footprints)]


def test_scenes_bound_the_overlap_asked_for(tmp_path):
    garments, labels = load_garments(None, 'test')
    unbounded, bounded = [], []
    for seed in range(30):
        _, _, placed = compose_scene(np.random.default_rng(seed), garments, labels, 64, (24, 32), (3, 3))
        unbounded += hidden_fractions(garments, placed)
        _, _, placed = compose_scene(np.random.default_rng(seed), garments, labels, 64, (24, 32), (3, 3),
                                     max_overlap=0.1)
        bounded += hidden_fractions(garments, placed)
        assert len(placed) == 3 and all(24 <= side <= 32 for _, side, _, _ in placed)
    assert max(unbounded) > 0.3 and max(bounded) <= 0.1  # three small garments fit 64 px with little overlap
    # unbounded (the default), each garment takes the first position drawn: the draws of the plain generator
    rng, expected = np.random.default_rng(7), []
    rng.integers(0, BACKGROUND_MAX + 1, (4, 4), dtype=np.uint8)  # the background
    for _ in range(rng.integers(2, 4)):
        index, side = int(rng.integers(len(garments))), int(rng.integers(32, 57))
        top, left = (int(v) for v in rng.integers(0, 64 - side + 1, size=2))
        expected.append((index, side, top, left))
    assert compose_scene(np.random.default_rng(7), garments, labels, 64, (32, 56), (2, 3))[2] == expected
    with pytest.raises(DataError, match='max overlap'):
        build_scenes(tmp_path / 'bad', num_train=2, num_val=1, max_overlap=1.5)


# ---------------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------------
TINY_SEG = TINY_MODEL + ['--image_size', '32', '--resize_size', '32', '--num_workers', '0', '--cache_features',
                         'True', '--epochs', '2', '--lr', '1.0', '--print_freq', '1000']


@pytest.fixture(scope='module')
def tiny_scenes(tmp_path_factory):
    """8 train and 5 val scenes of 32 px."""
    return build_scenes(tmp_path_factory.mktemp('scenes') / 'scenes', num_train=8, num_val=5, canvas_size=32,
                        garment_sizes=(12, 20))


def seg_command(data, out, *flags):
    return TINY_SEG + ['--data_path', str(data), '--output_dir', str(out), *flags] + TINY_OPTS


def test_one_and_two_processes_give_the_same_miou(tiny_scenes, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                             '--master_port=29563', 'eval_segmentation.py']
                            + seg_command(tiny_scenes, tmp_path / 'two', '--batch_size_per_gpu', '2'),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = run_probe(parse_eval_args(eval_segmentation.get_args_parser(),
                                      seg_command(tiny_scenes, tmp_path / 'one', '--batch_size_per_gpu', '4')))
    one, two = (json.loads((tmp_path / n / 'segmentation.json').read_text()) for n in ('one', 'two'))
    assert one['miou'] == pytest.approx(stats['miou']) and 0 < one['miou'] < 100
    assert two['miou'] == pytest.approx(one['miou'], abs=1e-6)
    assert two['pixel_acc'] == pytest.approx(one['pixel_acc'], abs=1e-6)
    assert list(one['per_class_iou']) == list(SCENE_CLASSES)  # named by the scenes' classes.txt
    assert (tmp_path / 'one' / 'predictions.png').is_file() and os.listdir(tmp_path / 'one' / 'tb')
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'one' / 'log.txt').read_text().splitlines()] == [0, 1]

    # --evaluate validates the saved classifier again: the same figures
    args = parse_eval_args(eval_segmentation.get_args_parser(),
                           seg_command(tiny_scenes, tmp_path / 'one', '--batch_size_per_gpu', '4', '--evaluate'))
    again = run_probe(args)
    assert again['miou'] == pytest.approx(one['miou']) and again['pixel_acc'] == pytest.approx(one['pixel_acc'])


def bad_voc(tmp_path, case):
    image = np.zeros((16, 16), np.uint8)
    masks = {'big': np.zeros((20, 16), np.uint8), 'high': np.full((16, 16), 7, np.uint8)}
    if case == 'split':
        return write_voc(tmp_path, {'a': image}, {'a': image}, {'train': ['a']}), 'val.txt'
    mask = masks[case]
    return write_voc(tmp_path, {'a': image}, {'a': mask}, {'train': ['a'], 'val': ['a']}), 'a.png'


@pytest.mark.parametrize('case', ['split', 'big', 'high'])
def test_bad_data_is_a_one_line_error(tmp_path, capsys, case):
    root, culprit = bad_voc(tmp_path, case)
    args = parse_eval_args(eval_segmentation.get_args_parser(),
                           seg_command(root, tmp_path / 'out', '--num_labels', '5'))
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(run_probe, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and culprit in lines[0], lines
    assert {'split': 'not found', 'big': '16x20', 'high': 'class 7'}[case] in lines[0]


def test_token_grid_ceiling_is_the_block_majority_oracle(tmp_path):
    # one 4 x 4 mask, 2 px tokens: blocks (top-left, top-right, bottom-left, bottom-right) hold
    # [0 0 0 1] -> 0, [1 1 1 255] -> 1 (255 does not vote), [2 2 0 0] -> 0 (a tie goes to the lower class),
    # [255 x 4] -> stays ignored
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, IGNORE_INDEX], [2, 2, 255, 255], [0, 0, 255, 255]], dtype=np.uint8)
    write_voc(tmp_path, {'a': np.zeros((4, 4, 3), np.uint8)}, {'a': mask}, {'val': ['a']})
    out = tmp_path / 'ceiling.json'
    done = subprocess.run([sys.executable, 'scripts/token_grid_ceiling.py', '--data_path', str(tmp_path),
                           '--token_px', '2', '1', '--json', str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    two, one = json.loads(out.read_text())['2'], json.loads(out.read_text())['1']
    # scored pixels (truth -> oracle): 0 -> 0 x5, 1 -> 0 x1, 1 -> 1 x3, 2 -> 0 x2
    # IoU: 0 -> 5 / (5 + 3), 1 -> 3 / 4, 2 -> 0 / 2
    assert two['iou'] == pytest.approx([100 * 5 / 8, 100 * 3 / 4, 0.0])
    assert two['miou'] == pytest.approx(100 * (5 / 8 + 3 / 4) / 3) and two['pixel_acc'] == pytest.approx(100 * 8 / 11)
    assert one['miou'] == 100.0                                       # 1 px tokens: the mask itself
    done = subprocess.run([sys.executable, 'scripts/token_grid_ceiling.py', '--data_path', str(tmp_path),
                           '--token_px', '3'], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and 'a.png' in done.stderr
