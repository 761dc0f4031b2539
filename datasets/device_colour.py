"""The colour half of DINO's view augmentation, batched on the training device (`--colour_augment_on device`).

The DataLoader workers decode, crop, resize and flip, and draw every random choice of each view exactly as the
PIL path draws it (datasets/transforms.py, ``DINOView(colour_on_device=True)``); what reaches the device per
view is its uint8 pixels and its :class:`~datasets.transforms.ViewColour` draws. :class:`DeviceColour` applies
the draws in the original's order: colour jitter (brightness, contrast, saturation and hue in the drawn order),
grayscale, Gaussian blur, solarisation, then normalises. A worker then spends its time on decoding and resizing
only, and sends a quarter of the bytes (uint8, not float32).

The pixels are the PIL path's up to rounding: PIL rounds to uint8 after every step and approximates the
Gaussian by three box blurs, here the values stay float and the kernel is a sampled Gaussian of the same
standard deviation (tests/test_device_colour.py bounds the difference; the random draws are the same ones).

    colour = DeviceColour(device)
    views = colour(crops)   # crops as collated: [(B x 3 x S x S uint8, B x 12 draws)] -> [B x 3 x S x S float]
"""
import functools
import math

import torch
import torch.nn.functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD, ViewColour

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's convert('L')
SOLARIZE_THRESHOLD = 128 / 255        # ImageOps.solarize(threshold=128) inverts the levels >= 128
# columns of ViewColour.as_tensor()
JITTER, ORDER, FACTORS, GREY, BLUR_RADIUS, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11


def grey(images):
    """B x 3 x H x W in [0, 1] -> B x 1 x H x W luma."""
    return torch.einsum('bchw,c->bhw', images, images.new_tensor(GREY_WEIGHTS)).unsqueeze(1)


def adjust_brightness(images, factors):
    """A blend with black (ImageEnhance.Brightness); ``factors``: B."""
    return (images * factors.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(images, factors):
    """A blend with the image's mean grey level, rounded to a uint8 level as ImageEnhance.Contrast rounds it."""
    mean = torch.floor(grey(images).mean((1, 2, 3), keepdim=True) * 255 + 0.5) / 255
    return torch.lerp(mean, images, factors.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_saturation(images, factors):
    """A blend with the grey image (ImageEnhance.Color)."""
    return torch.lerp(grey(images), images, factors.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue(images, factors):
    """The hue circle turned by ``int(factor * 255) / 255`` as the PIL path turns its 8-bit hue band; value and
    saturation kept (the hexcone HSV of PIL and colorsys)."""
    r, g, b = images.unbind(1)
    value, _ = images.max(1)
    chroma = value - images.min(1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), 0)
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    shift = torch.trunc(factors * 255) / 255
    hue = torch.remainder(hue / 6 + shift.view(-1, 1, 1), 1.0) * 6                 # B x H x W in [0, 6)
    # hsv -> rgb: channel n is value - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6, n = 5, 3, 1
    k = torch.remainder(hue.unsqueeze(1) + hue.new_tensor([5., 3., 1.]).view(1, 3, 1, 1), 6)
    out_chroma = (value * saturation).unsqueeze(1)
    return value.unsqueeze(1) - out_chroma * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_STEPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColourJitter.steps' order


def gaussian_blur(images, sigmas, radius=None):
    """Separable Gaussian of standard deviation ``sigmas`` (B, one per image; PIL's ``GaussianBlur(radius)``
    takes the same) with the edge pixels repeated, as PIL's box blurs repeat them. ``radius``: the taps on
    each side, at least 3 x the largest sigma (default: that, read from ``sigmas``)."""
    n, c, h, w = images.shape
    radius = radius or math.ceil(3 * float(sigmas.max()))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    # each kernel cut at its own 3 sigma, whatever the batch's widest
    kernels = torch.exp(-0.5 * (taps / sigmas.view(-1, 1)) ** 2) * (taps.abs() <= torch.ceil(3 * sigmas.view(-1, 1)))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)      # B*C x taps
    padded = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode='replicate')
    rows = F.conv2d(padded, kernels.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(rows, kernels.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


def solarize(images):
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


class DeviceColour:
    """Applies the colour draws of a batch of views on ``device`` and normalises (see the module docstring).
    The draws stay on the host: which images take which step is known there, so no step waits for the
    device."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, crops):
        """``crops``: [(B x 3 x S x S uint8, B x 12 draws)] as collated -> [B x 3 x S x S float], normalised.
        Views of one size go through together."""
        out = [None] * len(crops)
        for size in dict.fromkeys(pixels.shape[-2:] for pixels, _ in crops):
            group = [i for i, (pixels, _) in enumerate(crops) if pixels.shape[-2:] == size]
            pixels = torch.cat([crops[i][0] for i in group]).to(self.device, non_blocking=True)
            draws = torch.cat([crops[i][1] for i in group]).cpu()
            views = self.apply(pixels.float().div_(255), draws).sub_(self.mean).div_(self.std)
            for i, view in zip(group, views.split([crops[i][0].shape[0] for i in group])):
                out[i] = view
        return out

    def apply(self, images, draws):
        """``images``: N x 3 x S x S in [0, 1] on the device; ``draws``: N x 12 on the host."""
        assert draws.shape[1] == ViewColour.SIZE
        jittered = draws[:, JITTER] > 0
        order, factors = draws[:, ORDER].long(), draws[:, FACTORS]
        for position in range(4):
            for step, adjust in enumerate(JITTER_STEPS):
                images = self._on(images, jittered & (order[:, position] == step), adjust, factors[:, step])
        images = self._on(images, draws[:, GREY] > 0, lambda x: grey(x).expand(-1, 3, -1, -1))
        blurred = draws[:, BLUR_RADIUS] > 0
        if blurred.any():  # the kernel width from the host's radii: no wait for the device
            radius = math.ceil(3 * float(draws[blurred, BLUR_RADIUS].max()))
            images = self._on(images, blurred, functools.partial(gaussian_blur, radius=radius), draws[:, BLUR_RADIUS])
        return self._on(images, draws[:, SOLARIZE] > 0, solarize)

    def _on(self, images, selected, step, *per_image):
        """``step`` on the images of the host mask ``selected`` (with their entries of ``per_image``)."""
        index = selected.nonzero().flatten()
        if len(index) == 0:
            return images
        if len(index) < len(images):
            index_on_device = self._copy(index)
            part = step(images[index_on_device], *(self._copy(v[index]) for v in per_image))
            return images.index_copy(0, index_on_device, part)
        return step(images, *(self._copy(v) for v in per_image))

    def _copy(self, host_tensor):
        """To the device without waiting for it: a copy from pageable memory would wait for the stream."""
        if self.device.type == 'cuda':
            return host_tensor.pin_memory().to(self.device, non_blocking=True)
        return host_tensor.to(self.device)
