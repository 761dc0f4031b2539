"""`--colour_augment_on device`: the workers draw every random choice of a view as the PIL path does and send
uint8 pixels; datasets.DeviceColour applies the colour steps batched. Each step against PIL's, whole views
against the PIL path with the same seed, how often each step is drawn, and training with it."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from helpers import command, read_log, run_training, subset_folder

import datasets.device_colour as device
import datasets.transforms as augmentation
from datasets import DataAugmentationDINO, DeviceColour, denormalize

DRAWS = 1500


def photo_like(width, height, seed=0):
    """Colour gradients + noise + a saturated patch (hue and saturation have something to turn)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([220 * x + 20, 200 * y + 30, 160 * (1 - x) + 40], -1) + rng.normal(0, 10, (height, width, 3))
    pixels[height // 4: height // 2, width // 4: width // 2] = (230, 40, 20)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def as_float(image):
    """PIL image -> 1 x C x H x W in [0, 1]."""
    pixels = torch.from_numpy(np.array(image)).float() / 255
    return (pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)).unsqueeze(0)


def levels(reference, ours):
    """|PIL - ours| in grey levels (0-255)."""
    return (as_float(reference) - ours).abs() * 255


@pytest.mark.parametrize('name,factor,worst', [
    ('brightness', 0.6, 1.0), ('brightness', 1.4, 1.0), ('contrast', 0.6, 1.0), ('contrast', 1.4, 1.0),
    ('saturation', 0.8, 1.5), ('saturation', 1.2, 1.5),  # + PIL's grey image, rounded, times |1 - factor|
    ('hue', -0.1, 10.0), ('hue', 0.03, 10.0), ('hue', 0.1, 10.0)])  # PIL: 8-bit hue and saturation, truncated
def test_each_jitter_step_is_pils_up_to_its_rounding(name, factor, worst):
    image = photo_like(48, 40)
    pil = getattr(augmentation, f'adjust_{name}')(image, factor)
    ours = getattr(device, f'adjust_{name}')(as_float(image), torch.tensor([factor]))
    difference = levels(pil, ours)
    # PIL truncates to uint8 after the step (and its HSV has 8-bit hue and saturation): at most `worst` levels
    assert difference.max() <= worst + 1e-3 and difference.mean() < 1.0


@pytest.mark.parametrize('factor', [-0.1, -0.02, 0.05, 0.1])
def test_hue_is_torchvisions_float_hue(factor):
    """Without PIL's 8-bit HSV: torchvision's tensor hue shift (its own rgb <-> hsv) turned by the same angle."""
    from torchvision.transforms.v2 import functional as TF
    image = as_float(photo_like(48, 40))
    turned = math.trunc(factor * 255) / 255  # the PIL path turns its 8-bit hue band by int(factor * 255)
    assert torch.allclose(device.adjust_hue(image, torch.tensor([factor])), TF.adjust_hue(image, turned), atol=2e-5)


@pytest.mark.parametrize('radius', [0.1, 0.7, 1.3, 2.0])
def test_gaussian_blur_is_pils_three_box_blurs_up_to_a_few_levels(radius):
    image = photo_like(48, 40)
    difference = levels(image.filter(ImageFilter.GaussianBlur(radius=radius)),
                        device.gaussian_blur(as_float(image), torch.tensor([radius])))
    assert difference.mean() < 1.0 and difference.max() < 8
    sharp = levels(image, device.gaussian_blur(as_float(image), torch.tensor([radius])))
    assert radius < 0.5 or sharp.mean() > 2 * difference.mean()  # it does blur


def test_grey_and_solarisation_are_pils():
    image = photo_like(48, 40)
    assert levels(image.convert('L'), device.grey(as_float(image))).max() <= 0.5 + 1e-3
    assert levels(ImageOps.solarize(image, threshold=128), device.solarize(as_float(image))).max() < 1e-3


def test_views_equal_the_pil_paths_views_with_the_same_seed_up_to_rounding():
    image = photo_like(200, 150)
    on_workers = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [4], [24], global_crops_size=56)
    on_device = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [4], [24], global_crops_size=56, colour_on_device=True)
    colour = DeviceColour('cpu')
    means, differences = [], []
    for seed in range(30):
        torch.manual_seed(seed)
        reference = on_workers(image)
        after_workers = torch.rand(1)
        torch.manual_seed(seed)
        sent = on_device(image)
        assert torch.equal(torch.rand(1), after_workers)  # the same random draws, no more, no fewer
        assert all(p.dtype == torch.uint8 and d.shape == (12,) for p, d in sent)
        views = colour([(pixels[None], draws[None]) for pixels, draws in sent])
        for expected, view in zip(reference, views):
            difference = (denormalize(expected) - denormalize(view[0])).abs() * 255
            means.append(float(difference.mean()))
            differences.append(difference.flatten())
            assert difference.mean() < 3, seed
    # rounding: PIL rounds after every step (its hue to 1/255 of the circle), the device stays float
    assert np.mean(means) < 1.5 and torch.quantile(torch.cat(differences)[::3], 0.99) < 12


@pytest.mark.parametrize('view_index,blur_p,solarize_p', [(0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0)])
def test_each_step_is_drawn_as_often_as_the_original_specifies(view_index, blur_p, solarize_p):
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [1], [16], global_crops_size=16, colour_on_device=True)
    view = (transform.global_views + transform.local_views)[view_index]
    image = photo_like(48, 40)
    torch.manual_seed(view_index)
    draws = torch.stack([view(image)[1] for _ in range(DRAWS)])
    tolerance = 4 * math.sqrt(0.25 / DRAWS)
    frequencies = {'jitter': draws[:, device.JITTER].mean(), 'grey': draws[:, device.GREY].mean(),
                   'blur': (draws[:, device.BLUR_RADIUS] > 0).float().mean(),
                   'solarize': draws[:, device.SOLARIZE].mean()}
    for step, p in {'jitter': 0.8, 'grey': 0.2, 'blur': blur_p, 'solarize': solarize_p}.items():
        assert float(frequencies[step]) == pytest.approx(p, abs=tolerance), step
    jittered = draws[draws[:, device.JITTER] > 0]
    assert all(sorted(order) == [0, 1, 2, 3] for order in jittered[:, device.ORDER].long().tolist())
    brightness, hue = jittered[:, device.FACTORS][:, 0], jittered[:, device.FACTORS][:, 3]
    assert 0.6 <= brightness.min() and brightness.max() <= 1.4 and -0.1 <= hue.min() and hue.max() <= 0.1
    radii = draws[:, device.BLUR_RADIUS][draws[:, device.BLUR_RADIUS] > 0]
    assert 0.1 <= radii.min() and radii.max() <= 2.0


def test_a_batch_is_coloured_image_by_image():
    """Batched with different steps per image = each image alone (the masks pick the right images)."""
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), [2], [16], global_crops_size=32, colour_on_device=True)
    torch.manual_seed(0)
    samples = [transform(photo_like(64, 48, seed)) for seed in range(12)]
    batch = [(torch.stack([s[v][0] for s in samples]), torch.stack([s[v][1] for s in samples])) for v in range(4)]
    colour = DeviceColour('cpu')
    together = colour(batch)
    for i, sample in enumerate(samples):
        alone = colour([(pixels[None], draws[None]) for pixels, draws in sample])
        for v in range(4):
            assert (together[v][i] - alone[v][0]).abs().max() < 1e-4  # float sums in another order


@pytest.fixture(scope='module')
def data8(tiny_data, tmp_path_factory):
    return subset_folder(tiny_data, tmp_path_factory.mktemp('data8'), per_class=2)


def test_training_with_the_colour_on_the_device_follows_the_workers_run(data8, tmp_path):
    """The same run, colour steps in the workers or on the device: the same draws, pixels equal up to rounding,
    so the losses agree to rounding."""
    losses = {}
    for where in ('workers', 'device'):
        out = tmp_path / where
        run_training(command('--data_path', data8, '--epochs', '3', '--colour_augment_on', where,
                             '--output_dir', str(out), '--knn_freq', '0'))
        losses[where] = [entry['train_loss'] for entry in read_log(out)]
    assert losses['device'] == pytest.approx(losses['workers'], rel=2e-3)
    assert losses['workers'][-1] < losses['workers'][0]


def test_device_colour_with_deit_aug_is_a_one_line_error(tmp_path):
    import utils
    with pytest.raises(utils.UserError, match='--colour_augment_on device needs --aug-opt dino_aug'):
        run_training(command('--aug-opt', 'deit_aug', '--colour_augment_on', 'device', '--output_dir',
                             str(tmp_path)))
