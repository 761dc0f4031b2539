"""DINO's multi-crop augmentation keeps the original's output distribution: crop areas and aspect ratios, how
often each step is applied, the colour jitter of torchvision, and reduced-size JPEG decoding that never leaves
a crop smaller than its view."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

import datasets.transforms as augmentation
from datasets import DataAugmentationDINO, denormalize
from datasets.folder import load_image
from helpers import command, run_training

DRAWS = 1500


def photo_like(width, height, seed=0):
    """A smooth colour image (gradients + noise), so that no view has equal channels unless made grey."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([200 * x + 30, 180 * y + 40, 120 * (x + y) / 2 + 60], -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def reference_crop_fractions(scale, width, height, n, seed=0):
    """Area fractions and log aspect ratios of torchvision's RandomResizedCrop.get_params, re-implemented here
    with numpy (accept-reject over 10 tries, then the centre fallback; the original uses torchvision's)."""
    rng = np.random.default_rng(seed)
    area, log_ratio = width * height, (math.log(3 / 4), math.log(4 / 3))
    fractions, ratios = [], []
    for _ in range(n):
        for _ in range(10):
            target, ratio = area * rng.uniform(*scale), math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            w, h = width, height
        fractions.append(w * h / area)
        ratios.append(math.log(w / h))
    return np.array(fractions), np.array(ratios)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, 'right') / len(a)
                  - np.searchsorted(np.sort(b), grid, 'right') / len(b)).max()


class Recorder:
    """Counts calls of the augmentation's steps (wrapped in place) and records the crop boxes."""

    def __init__(self, monkeypatch):
        self.counts, self.boxes = dict.fromkeys(['flip', 'jitter', 'blur', 'solarize'], 0), []
        resize, transpose, blur = Image.Image.resize, Image.Image.transpose, Image.Image.filter
        jitter, solarize = augmentation.ColourJitter.apply, ImageOps.solarize

        def counted(name, function):
            def run(*args, **kwargs):
                self.counts[name] += 1
                return function(*args, **kwargs)
            return run

        def recording_resize(image, size, *args, box=None, **kwargs):
            self.boxes.append((image.size, box))
            return resize(image, size, *args, box=box, **kwargs)
        monkeypatch.setattr(Image.Image, 'resize', recording_resize)
        monkeypatch.setattr(Image.Image, 'transpose', counted('flip', transpose))
        monkeypatch.setattr(Image.Image, 'filter', counted('blur', blur))
        monkeypatch.setattr(augmentation.ColourJitter, 'apply', counted('jitter', jitter))
        monkeypatch.setattr(ImageOps, 'solarize', counted('solarize', solarize))


@pytest.mark.parametrize('view_index,blur_p,solarize_p', [(0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0)])
def test_each_step_is_applied_as_often_as_the_original_specifies(view_index, blur_p, solarize_p, monkeypatch):
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [1], [16], global_crops_size=16)
    view = (transform.global_views + transform.local_views)[view_index]
    image = photo_like(48, 40)
    recorder = Recorder(monkeypatch)
    torch.manual_seed(view_index)
    pixels = [denormalize(view(image)) for _ in range(DRAWS)]              # 3 x S x S in [0, 1]
    grey = sum(bool((p - p[0]).abs().max() < 1e-5) for p in pixels)
    expected = {'flip': 0.5, 'jitter': 0.8, 'blur': blur_p, 'solarize': solarize_p}
    tolerance = 4 * math.sqrt(0.25 / DRAWS)  # 4 standard deviations of a frequency
    for step, p in expected.items():
        assert recorder.counts[step] / DRAWS == pytest.approx(p, abs=tolerance), step
    assert grey / DRAWS == pytest.approx(0.2, abs=tolerance)


@pytest.mark.parametrize('blur_radius', [(0.1, 2.0), (0.03, 0.57)])
def test_blur_radius_is_uniform_in_its_range_on_both_colour_paths(blur_radius, monkeypatch):
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [1], [16], global_crops_size=16, blur_radius=blur_radius)
    on_device = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [1], [16], global_crops_size=16,
                                     blur_radius=blur_radius, colour_on_device=True)
    radii, filter_ = [], Image.Image.filter
    monkeypatch.setattr(Image.Image, 'filter', lambda image, f: radii.append(f.radius) or filter_(image, f))
    image = photo_like(48, 40)
    torch.manual_seed(0)
    for _ in range(DRAWS):
        transform.global_views[0](image)                       # blurred with probability 1
    torch.manual_seed(0)
    device_radii = [on_device.global_views[0](image)[1][augmentation.ViewColour.SIZE - 2].item()
                    for _ in range(DRAWS)]
    expected = np.random.default_rng(0).uniform(*blur_radius, DRAWS)
    assert ks_distance(np.array(radii), expected) < 1.95 * math.sqrt(2 / DRAWS)
    assert min(radii) >= blur_radius[0] and max(radii) <= blur_radius[1]
    assert device_radii == pytest.approx(radii, abs=1e-6)      # the same draws, sent to the device


def test_blur_radius_out_of_order_is_a_one_line_error(tmp_path):
    import utils
    with pytest.raises(utils.UserError, match=r'--blur_radius 2.0 0.1: need 0 < MIN <= MAX'):
        run_training(command('--blur_radius', '2', '0.1', '--output_dir', str(tmp_path)))


@pytest.mark.parametrize('scale,size', [((0.4, 1.0), (60, 45)), ((0.05, 0.4), (45, 60))])
def test_crop_areas_and_aspect_ratios_follow_torchvisions_random_resized_crop(scale, size, monkeypatch):
    view = augmentation.DINOView(32, scale, blur_p=0.0)  # no crop of these sizes is resized from a reduced image
    recorder = Recorder(monkeypatch)
    image = photo_like(*size)
    torch.manual_seed(1)
    for _ in range(DRAWS):
        view(image)
    fractions = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (w * h) for (w, h), b in recorder.boxes])
    ratios = np.log([(b[2] - b[0]) / (b[3] - b[1]) for _, b in recorder.boxes])
    expected_fractions, expected_ratios = reference_crop_fractions(scale, *size, n=DRAWS)
    critical = 1.95 * math.sqrt(2 / DRAWS)  # KS at the 0.1 % level
    assert ks_distance(fractions, expected_fractions) < critical
    assert ks_distance(ratios, expected_ratios) < critical
    assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for (w, h), b in recorder.boxes)


def test_colour_jitter_is_torchvisions_up_to_rounding():
    image = photo_like(40, 30)
    for seed in range(40):
        torch.manual_seed(seed)
        ours = np.asarray(augmentation.ColourJitter()(image), dtype=int)
        torch.manual_seed(seed)
        reference = np.asarray(T.ColorJitter(0.4, 0.4, 0.2, 0.1)(image), dtype=int)
        assert np.abs(ours - reference).max() <= 1, seed


def test_reduced_size_jpeg_decoding_leaves_every_crop_at_least_its_view_size():
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [8], [96])
    buffer = io.BytesIO()
    photo_like(1600, 1200).save(buffer, format='JPEG', quality=90)
    full, reduced = load_image(io.BytesIO(buffer.getvalue())), load_image(buffer, transform.decode_size)
    assert full.size == (1600, 1200) and reduced.size == (800, 600)  # the smallest local crop allows 1/2, not 1/4
    for view in transform.global_views + transform.local_views:
        assert view.min_source_side(*reduced.size) >= view.size
        assert view.min_source_side(*reduced.size) / 2 < view.size or view.size == 224
    small = io.BytesIO()
    photo_like(500, 375).save(small, format='JPEG')
    assert load_image(small, transform.decode_size).size == (500, 375)  # an ImageNet-sized photo: full size
    views = transform(reduced)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8


def test_views_are_resized_from_a_reduced_image_only_where_the_box_keeps_the_view_size(monkeypatch):
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [8], [24], global_crops_size=56)
    image = photo_like(400, 300)
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    for _ in range(20):
        transform(image)
    sizes = [56, 56] + [24] * 8
    reduced = 0
    for ((w, h), box), size in zip(recorder.boxes, sizes * 20):
        if (w, h) != image.size:
            reduced += 1
            assert min(box[2] - box[0], box[3] - box[1]) >= size - 1e-9  # still a downscale to the view
    assert reduced > 0
    # the trade-off: a box average then bicubic, against bicubic from the full image (grey levels 0..255)
    box = (40, 30, 360, 270)
    direct = np.asarray(image.resize((56, 56), Image.BICUBIC, box=box), dtype=float)
    halved = np.asarray(image.reduce(2).resize((56, 56), Image.BICUBIC, box=[c / 2 for c in box]), dtype=float)
    assert np.abs(direct - halved).mean() < 1.5


def test_crop_boxes_say_where_each_view_pixel_comes_from(monkeypatch):
    """--region_matching position trusts the boxes: on an image whose red and green bands are its pixel's x and
    y, every view pixel must show the image point its box predicts (flips and reduced-size sources included)."""
    monkeypatch.setattr(augmentation.DINOView, 'apply_colour', lambda self, view, colour: view)
    ramp = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)),
                                      np.zeros((256, 256), np.uint8)], axis=-1))
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [3, 2], [32, 16], global_crops_size=64,
                                     with_boxes=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(10):
        crops, boxes = transform(image)
        assert boxes.shape == (7, 5) and [c.shape[-1] for c in crops] == transform.crop_sizes()
        for view, (top, left, height, width, flipped) in zip(crops, boxes.tolist()):
            size = view.shape[-1]
            pixels = denormalize(view) * 255                                      # 3 x S x S: x, y, 0
            centres = (torch.arange(size) + 0.5) / size
            across = 1 - centres if flipped else centres
            expected_x = (left + across * width) * 256 - 0.5                      # a pixel's value is its index
            expected_y = (top + centres * height) * 256 - 0.5
            inner = slice(1, size - 1)  # bicubic edges clamp at the crop border
            assert (pixels[0, 0, inner] - expected_x[inner]).abs().max() < 2.5
            assert (pixels[1, inner, 0] - expected_y[inner]).abs().max() < 2.5
            flips += int(flipped)
    assert 0 < flips < 70
    assert not isinstance(DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 16, 64)(image), augmentation.BoxedViews)
