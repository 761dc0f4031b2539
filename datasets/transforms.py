"""Multi-crop augmentations of self-supervised pre-training, selected by `--aug-opt`.

Every transform maps one PIL image to a list of tensors: the two global views first, then the local views
group by group, in the order of `local_crops_size` (e.g. numbers [6, 2] and sizes [96, 128] give
2 x 224, 6 x 96, 2 x 128). `crop_sizes()` tells the model side that layout.
"""
from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_normalized_tensor(image):
    """PIL image in RGB or 'L' -> 3 x H x W float, normalised with the ImageNet mean and std.

    The last step of every transform here (ToTensor + Normalize). A grey image's band is broadcast to the
    three channels by the subtraction, so the views of grey images are augmented on one band, not three
    identical ones, and come out exactly as their RGB copies would."""
    return (TF.to_tensor(image) - _MEAN).div_(_STD)


def normalize(images):
    """... x 3 x H x W RGB in [0, 1] -> the backbone's input (ImageNet mean and std)."""
    return (images - _MEAN.to(images.device)) / _STD.to(images.device)


def denormalize(images):
    """The inverse of :func:`normalize`, clamped to [0, 1]."""
    return (images * _STD.to(images.device) + _MEAN.to(images.device)).clamp(0, 1)


def colour_jitter():
    """The colour part of DINO's view augmentation (PIL -> PIL): colour jitter with probability 0.8, then
    grayscale with probability 0.2."""
    return [T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)]


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


class PILGaussianBlur:
    """Gaussian blur of a PIL image, sigma (PIL's radius, in pixels) uniform in `sigma`.

    PIL's blur is ~7x faster on one core than torchvision's GaussianBlur (a dense 2-D convolution of the
    tensor) and is the blur of the original code, with no kernel truncation.
    """

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        radius = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


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


class DataAugmentationDINO(MultiCropTransform):
    """DINO multi-crop: bicubic random resized crops, flip, colour jitter, grayscale, blur, solarisation.

    Blur is applied with probability 1.0 to the first global view, 0.1 to the second (which is also
    solarised with probability 0.2) and 0.5 to the local views. All steps but the last act on the PIL
    image (one band for a grey image: hue, saturation and grayscale are then identities), converted to a
    tensor once per view.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, local_crops_size=96,
                 global_crops_size=224):
        flip_and_color_jitter = [T.RandomHorizontalFlip(p=0.5), *colour_jitter()]

        def view(size, scale, blur_p, solarize_p=0.0):
            steps = [
                T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                *flip_and_color_jitter,
                T.RandomApply([PILGaussianBlur()], p=blur_p),
            ]
            if solarize_p:
                steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
            steps.append(to_normalized_tensor)
            return T.Compose(steps)

        local_groups = local_crop_groups(local_crops_number, local_crops_size)
        global_views = [view(global_crops_size, global_crops_scale, blur_p=1.0),
                        view(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2)]
        local_views = [view(size, local_crops_scale, blur_p=0.5) for _, size in local_groups]
        super().__init__(global_views, local_views, global_crops_size, local_groups)


def _dino_from_args(args, global_crops_size):
    return DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                args.local_crops_size, global_crops_size)


def _deit_from_args(args, global_crops_size):
    from .deit_aug import deit_from_args  # datasets/deit_aug.py builds on MultiCropTransform
    return deit_from_args(args, global_crops_size)


AUGMENTATIONS = {'dino_aug': _dino_from_args, 'deit_aug': _deit_from_args}


def build_transform(args, global_crops_size=224):
    """The `--aug-opt` multi-crop transform from parsed arguments (argument names of main_esvit.py)."""
    if args.aug_opt not in AUGMENTATIONS:
        raise ValueError(f"unknown --aug-opt '{args.aug_opt}'; supported: {', '.join(AUGMENTATIONS)} "
                         f"(mocov2_aug and basic_aug are named in the original help but never implemented)")
    return AUGMENTATIONS[args.aug_opt](args, global_crops_size)
