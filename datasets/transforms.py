"""Multi-crop augmentations of self-supervised pre-training, selected by `--aug-opt`.

Every transform maps one PIL image to a list of tensors: the two global views first, then the local views
group by group, in the order of `local_crops_size` (e.g. numbers [6, 2] and sizes [96, 128] give
2 x 224, 6 x 96, 2 x 128). `crop_sizes()` tells the model side that layout.
"""
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, ImageStat
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
# (uint8 / 255 - mean) / std = uint8 * scale + shift
_NORMALIZE_SCALE, _NORMALIZE_SHIFT = 1 / (255 * _STD), -_MEAN / _STD


def to_normalized_tensor(image):
    """PIL image in RGB or 'L' -> 3 x H x W float, normalised with the ImageNet mean and std.

    The last step of every transform here (ToTensor + Normalize, in one pass over the uint8 pixels). A grey
    image's band is broadcast to the three channels, so the views of grey images are augmented on one band, not
    three identical ones, and come out exactly as their RGB copies would."""
    pixels = torch.from_numpy(np.array(image))                                       # H x W (x 3) uint8
    pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)   # 1|3 x H x W
    out = torch.empty(3, *pixels.shape[1:])
    return torch.addcmul(_NORMALIZE_SHIFT, pixels, _NORMALIZE_SCALE, out=out)       # 1 band: broadcast to 3


def to_uint8_tensor(image):
    """PIL image in RGB or 'L' -> 3 x H x W uint8 (a grey band repeated), as :func:`to_normalized_tensor` without
    the normalisation: what views whose colour steps run on the training device send."""
    pixels = torch.from_numpy(np.array(image))
    return pixels.expand(3, *pixels.shape) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def normalize(images):
    """... x 3 x H x W RGB in [0, 1] -> the backbone's input (ImageNet mean and std)."""
    return (images - _MEAN.to(images.device)) / _STD.to(images.device)


def denormalize(images):
    """The inverse of :func:`normalize`, clamped to [0, 1]."""
    return (images * _STD.to(images.device) + _MEAN.to(images.device)).clamp(0, 1)


def colour_jitter():
    """The colour part of DINO's view augmentation (PIL -> PIL): colour jitter (:class:`ColourJitter`) with
    probability 0.8, then grayscale with probability 0.2."""
    return [T.RandomApply([ColourJitter()], p=0.8), T.RandomGrayscale(p=0.2)]


def center_view(image_size, resize_size=None):
    """The evaluation view (PIL -> PIL): bicubic resize of the short side to ``resize_size`` (default
    ``image_size * 256 / 224``), then the central ``image_size`` square."""
    return T.Compose([T.Resize(resize_size or round(image_size * 256 / 224), interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size)])


def eval_transform(image_size, resize_size=None):
    """:func:`center_view`, normalised: the input of k-NN, linear-probe validation and analysis."""
    return T.Compose([center_view(image_size, resize_size), to_normalized_tensor])


def probe_train_transform(image_size):
    """The linear probe's training view: random resized crop (bilinear, as DINO's probe), flip, normalised."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), to_normalized_tensor])


def _as_list(value):
    return list(value) if isinstance(value, Sequence) else [value]


def local_crop_groups(local_crops_number, local_crops_size):
    """[(count, size)] of the local views; ints are accepted for a single group."""
    numbers, sizes = _as_list(local_crops_number), _as_list(local_crops_size)
    if len(numbers) != len(sizes):
        raise ValueError(f"local_crops_number {numbers} and local_crops_size {sizes} must have the same length")
    if any(count < 0 for count in numbers):
        raise ValueError(f"local_crops_number {numbers} must not be negative")
    return [(int(count), int(size)) for count, size in zip(numbers, sizes)]


class MultiCropTransform:
    """Applies two global views and the local view groups to one image; subclasses build the views."""

    def __init__(self, global_views, local_views, global_crops_size, local_groups):
        assert len(global_views) == 2 and len(local_views) == len(local_groups)
        self.global_views = global_views
        self.local_views = local_views
        self.global_crops_size = global_crops_size
        self.local_groups = local_groups

    def __call__(self, image):
        crops = [view(image) for view in self.global_views]
        for view, (count, _) in zip(self.local_views, self.local_groups):
            crops.extend(view(image) for _ in range(count))
        return crops

    def crop_sizes(self):
        """Side length of every returned crop, in order."""
        local_sizes = [size for count, size in self.local_groups for _ in range(count)]
        return [self.global_crops_size] * 2 + local_sizes

    def __len__(self):
        return 2 + sum(count for count, _ in self.local_groups)

    def __repr__(self):
        return f"{type(self).__name__}(crop_sizes={self.crop_sizes()})"


RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as the original uses


def _lut(values):
    """A 256-entry lookup table of ``values`` (floats, truncated as PIL's blend truncates) clipped to uint8."""
    return [min(255, max(0, int(v))) for v in values]


def _per_band(image, table):
    return table * len(image.getbands())


def adjust_brightness(image, factor):
    """As ImageEnhance.Brightness (a blend with black): ``pixel * factor``, one table lookup."""
    return image.point(_per_band(image, _lut(i * factor for i in range(256))))


def adjust_contrast(image, factor):
    """As ImageEnhance.Contrast (a blend with the rounded mean grey level): one table lookup."""
    grey = image if image.mode == 'L' else image.convert('L')
    mean = int(ImageStat.Stat(grey).mean[0] + 0.5)
    return image.point(_per_band(image, _lut(mean + factor * (i - mean) for i in range(256))))


def adjust_saturation(image, factor):
    """As ImageEnhance.Color (a blend with the grey image); the identity on one grey band."""
    if image.mode == 'L':
        return image
    return Image.blend(image.convert('L').convert(image.mode), image, factor)


def adjust_hue(image, factor):
    """As torchvision's PIL hue: HSV with the hue band shifted by ``int(factor * 255)`` modulo 256 (here one
    table lookup on the band instead of a numpy round trip); the identity on one grey band."""
    if image.mode == 'L':
        return image
    h, s, v = image.convert('HSV').split()
    shift = int(factor * 255)
    return Image.merge('HSV', (h.point([(i + shift) % 256 for i in range(256)]), s, v)).convert(image.mode)


class ColourJitter:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) on a PIL image: the same random factors and order (drawn by
    ``T.ColorJitter.get_params``) and the same pixels up to rounding, with brightness and contrast as table
    lookups. ``draw()`` and ``apply()`` split the random part from the pixels (the views draw in the DataLoader
    workers and may apply on the training device, datasets/device_colour.py)."""
    brightness, contrast, saturation, hue = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
    steps = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by the drawn order

    def draw(self):
        """(order, factors): a permutation of the 4 steps (0 brightness, 1 contrast, 2 saturation, 3 hue) and
        the 4 factors (hue: a shift in [-0.1, 0.1] of the hue circle)."""
        order, *factors = T.ColorJitter.get_params(self.brightness, self.contrast, self.saturation, self.hue)
        return order.tolist(), [float(f) for f in factors]

    def apply(self, image, order, factors):
        for index in order:
            image = self.steps[index](image, factors[index])
        return image

    def __call__(self, image):
        return self.apply(image, *self.draw())


class HalvingPyramid:
    """An image and its halves (``Image.reduce(2)``: 2 x 2 box averages), each computed once, when first asked."""

    def __init__(self, image, max_level=3):
        self.levels, self.max_level = [image], max_level

    @property
    def base(self):
        return self.levels[0]

    def level(self, k):
        while len(self.levels) <= k:
            self.levels.append(self.levels[-1].reduce(2))
        return self.levels[k]


class ViewColour(NamedTuple):
    """The random colour choices of one view, drawn in the order of the original's transforms: colour jitter
    (``jitter``: (order, factors) of :meth:`ColourJitter.draw`, or None), grayscale, Gaussian blur radius
    (0: none) and solarisation."""
    jitter: tuple | None
    grey: bool
    blur_radius: float
    solarize: bool

    # as_tensor() layout: [jitter?, order x 4, factor x 4 (brightness, contrast, saturation, hue), grey?,
    # blur radius, solarize?]
    SIZE = 12

    def as_tensor(self):
        order, factors = self.jitter or ([0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0])
        return torch.tensor([float(self.jitter is not None), *order, *factors, float(self.grey), self.blur_radius,
                             float(self.solarize)])


class DINOView:
    """One view of DINO's augmentation, PIL image -> normalised 3 x size x size tensor: a bicubic random resized
    crop (scale ``scale``, ratio 3/4..4/3), horizontal flip (p 0.5), colour jitter (p 0.8), grayscale (p 0.2),
    Gaussian blur of radius uniform in ``blur_radius`` (p ``blur_p``; the original's (0.1, 2) px), solarisation at
    128 (p ``solarize_p``).

    The original's steps, probabilities and PIL operations, with fewer copies: the crop box is drawn on the image
    as the original draws it, then resized straight from the image (``resize(box=...)``) or from the image's
    half, quarter or eighth (:class:`HalvingPyramid`, shared by the views of an image) where the box there still
    has at least the view's size (the trade-off of decoding a JPEG at reduced size), brightness and contrast are
    table lookups, a grayscale view stays one band (its blur and solarisation then work on one band;
    :func:`to_normalized_tensor` broadcasts it), and the uint8 pixels become the normalised tensor in one pass.

    With ``colour_on_device`` the view stops after the crop and flip: it returns (3 x size x size uint8, its
    :class:`ViewColour` as a tensor), the same random draws, for datasets/device_colour.py to apply batched on
    the training device."""

    def __init__(self, size, scale, blur_p, solarize_p=0.0, colour_on_device=False, blur_radius=(0.1, 2.0)):
        self.size, self.scale, self.blur_p, self.solarize_p = int(size), tuple(scale), blur_p, solarize_p
        self.blur_radius = tuple(blur_radius)
        self.colour_on_device = colour_on_device
        self.jitter = ColourJitter()

    def __call__(self, image):
        """``image``: a PIL image or a :class:`HalvingPyramid` of one."""
        return self.view_and_box(image)[0]

    def view_and_box(self, image):
        """(the view, its box): where the view's pixels come from, for matching the tokens of two views by
        position (``--region_matching position``). box: [top, left, height, width] of the crop as fractions of
        the image's height and width, then 1.0 if the view was flipped left-right, else 0.0."""
        pyramid = image if isinstance(image, HalvingPyramid) else HalvingPyramid(image)
        (top, left, height, width), view = self.resized_crop(pyramid)
        flip, jitter, grey, blur, radius, solarize = torch.rand(6).tolist()
        if flip < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        base = pyramid.base
        box = torch.tensor([top / base.height, left / base.width, height / base.height, width / base.width,
                            float(flip < 0.5)])
        colour = ViewColour(jitter=self.jitter.draw() if jitter < 0.8 else None, grey=grey < 0.2,
                            blur_radius=self._radius(radius) if blur < self.blur_p else 0.0,
                            solarize=solarize < self.solarize_p)
        if self.colour_on_device:
            return (to_uint8_tensor(view), colour.as_tensor()), box
        return to_normalized_tensor(self.apply_colour(view, colour)), box

    def _radius(self, uniform):
        low, high = self.blur_radius
        return low + (high - low) * uniform

    def resized_crop(self, pyramid):
        """(top, left, height, width) of a random resized crop box on ``pyramid.base`` and the crop, resized from
        the level of ``pyramid`` that still has the view's size in the box."""
        top, left, height, width = T.RandomResizedCrop.get_params(pyramid.base, self.scale, RESIZED_CROP_RATIO)
        k = 0
        while k < pyramid.max_level and min(width, height) >= self.size * 2 ** (k + 1):
            k += 1
        source = pyramid.level(k)
        shrink = source.width / pyramid.base.width  # 2^-k up to the rounding up of odd sizes
        box = (left * shrink, top * shrink, min((left + width) * shrink, source.width),
               min((top + height) * shrink, source.height))
        return (top, left, height, width), source.resize((self.size, self.size), Image.BICUBIC, box=box)

    def apply_colour(self, view, colour):
        """The colour steps of ``colour`` (a :class:`ViewColour`) on a PIL view, in the original's order."""
        if colour.jitter is not None:
            view = self.jitter.apply(view, *colour.jitter)
        if colour.grey and view.mode != 'L':
            view = view.convert('L')
        if colour.blur_radius:
            view = view.filter(ImageFilter.GaussianBlur(radius=colour.blur_radius))
        if colour.solarize:
            view = ImageOps.solarize(view, threshold=128)
        return view

    def min_source_side(self, width, height):
        """The shortest side a crop of a width x height image can have (area ``scale[0]``, the extreme ratio)."""
        return math.sqrt(self.scale[0] * width * height * RESIZED_CROP_RATIO[0])

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, blur_p={self.blur_p}, "
                f"solarize_p={self.solarize_p}, blur_radius={self.blur_radius}, "
                f"colour_on_device={self.colour_on_device})")


class BoxedViews(NamedTuple):
    """The views of one image with their crop boxes (``DataAugmentationDINO(with_boxes=True)``); the DataLoader
    batches both fields: crops [V x (B x 3 x S x S)], boxes B x V x 5 (see :meth:`DINOView.view_and_box`)."""
    crops: list
    boxes: torch.Tensor


class DataAugmentationDINO(MultiCropTransform):
    """DINO multi-crop: bicubic random resized crops, flip, colour jitter, grayscale, blur, solarisation.

    Blur is applied with probability 1.0 to the first global view, 0.1 to the second (which is also
    solarised with probability 0.2) and 0.5 to the local views (:class:`DINOView`), its radius uniform in
    ``blur_radius`` pixels of the view. All steps but the last act
    on the PIL image (one band for a grey image: hue, saturation and grayscale are then identities).

    ``decode_size(width, height)`` tells an image loader how far a JPEG may be decoded at reduced size
    (``PIL.Image.draft``, see ``datasets.folder.load_image``) with every crop it can draw still downscaled to
    its view.

    With ``colour_on_device`` every view is (uint8 pixels, colour draws) and the colour steps are left to
    ``datasets.DeviceColour`` on the training device (`--colour_augment_on device`).

    With ``with_boxes`` it returns :class:`BoxedViews`: the views and where each was cropped
    (`--region_matching position`).
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, local_crops_size=96,
                 global_crops_size=224, colour_on_device=False, blur_radius=(0.1, 2.0), with_boxes=False):
        local_groups = local_crop_groups(local_crops_number, local_crops_size)
        on_device = dict(colour_on_device=colour_on_device, blur_radius=blur_radius)
        global_views = [DINOView(global_crops_size, global_crops_scale, blur_p=1.0, **on_device),
                        DINOView(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2, **on_device)]
        local_views = [DINOView(size, local_crops_scale, blur_p=0.5, **on_device) for _, size in local_groups]
        super().__init__(global_views, local_views, global_crops_size, local_groups)
        self.with_boxes = with_boxes

    def __call__(self, image):
        pyramid = HalvingPyramid(image)
        if not self.with_boxes:
            return super().__call__(pyramid)
        views = self.global_views + [view for view, (count, _) in zip(self.local_views, self.local_groups)
                                     for _ in range(count)]
        crops, boxes = zip(*(view.view_and_box(pyramid) for view in views))
        return BoxedViews(list(crops), torch.stack(boxes))

    def decode_size(self, width, height):
        """The smallest (width, height) a width x height image may be decoded at: reduced by the largest factor
        that leaves the smallest possible crop of every view at least its view's size."""
        views = self.global_views + [v for v, (count, _) in zip(self.local_views, self.local_groups) if count]
        factor = min(1.0, max(view.size / view.min_source_side(width, height) for view in views))
        return math.ceil(width * factor), math.ceil(height * factor)


def matches_by_position(args):
    """Whether the region loss matches tokens by position (``--region_matching position`` of a V+R run): its views
    then come with their crop boxes. A view-only run ignores the option, as it ignores --region_loss_weight."""
    return args.use_dense_prediction and args.region_matching == 'position'


def _dino_from_args(args, global_crops_size, colour_on_device):
    return DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                args.local_crops_size, global_crops_size, colour_on_device=colour_on_device,
                                blur_radius=args.blur_radius,
                                with_boxes=matches_by_position(args))


def _deit_from_args(args, global_crops_size, colour_on_device):
    if colour_on_device:
        raise ValueError("--colour_augment_on device needs --aug-opt dino_aug (deit_aug's views are timm's "
                         "transforms, applied in the DataLoader workers)")
    from .deit_aug import deit_from_args  # datasets/deit_aug.py builds on MultiCropTransform
    return deit_from_args(args, global_crops_size)


AUGMENTATIONS = {'dino_aug': _dino_from_args, 'deit_aug': _deit_from_args}


def build_transform(args, global_crops_size=224, colour_on_device=False):
    """The `--aug-opt` multi-crop transform from parsed arguments (argument names of main_esvit.py); with
    ``colour_on_device`` (dino_aug only) its views leave the colour steps to ``datasets.DeviceColour``."""
    if args.aug_opt not in AUGMENTATIONS:
        raise ValueError(f"unknown --aug-opt '{args.aug_opt}'; supported: {', '.join(AUGMENTATIONS)} "
                         f"(mocov2_aug and basic_aug are named in the original help but never implemented)")
    return AUGMENTATIONS[args.aug_opt](args, global_crops_size, colour_on_device)
