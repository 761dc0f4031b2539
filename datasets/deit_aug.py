"""DeiT augmentation for multi-crop pre-training (``--aug-opt deit_aug``), as the original's
DataAugmentationDEIT: timm's training transform (random resized crop at timm's scale (0.08, 1), flip, RandAugment
or another auto-augment policy, colour jitter when no policy is set, random erasing) for each view.

Differences from the original, which could not run: its build.py used ``create_transform`` without importing it
and iterated over ``range(local_crops_number)``, a list. Here the local views are sized by --local_crops_size
(the original: 96 always) and the global views by the yaml's image size (the original: 224 always).

    transform = deit_from_args(args, global_crops_size=224)
    transform(pil_image) -> [global1, global2, *locals]  # tensors 3 x S x S, S = transform.crop_sizes()[i]
"""
from timm.data import create_transform

import utils
from .transforms import MultiCropTransform, local_crop_groups

INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos')  # timm's names
RANDOM_ERASING_MODES = ('pixel', 'rand', 'const')


def deit_view(size, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
              re_mode='pixel', re_count=1):
    """timm's training transform of one view (PIL RGB -> normalised 3 x size x size tensor); ``auto_augment``
    'none' or '' disables the policy."""
    if interpolation not in INTERPOLATIONS:
        raise utils.UserError(f"--train-interpolation {interpolation}: expected one of {', '.join(INTERPOLATIONS)}")
    if re_mode not in RANDOM_ERASING_MODES:
        raise utils.UserError(f"--remode {re_mode}: expected one of {', '.join(RANDOM_ERASING_MODES)}")
    policy = None if auto_augment in (None, '', 'none') else auto_augment
    try:
        return create_transform(input_size=size, is_training=True, color_jitter=color_jitter, auto_augment=policy,
                                interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=re_count)
    except (AssertionError, KeyError, ValueError) as error:
        raise utils.UserError(f"--aa {auto_augment}: not a timm auto-augment policy ({error})") from None


class DataAugmentationDEIT(MultiCropTransform):
    """:func:`deit_view` for the two global views and each group of local views, of the image in RGB (timm's
    steps expect three bands)."""

    def __init__(self, local_crops_number, local_crops_size=96, global_crops_size=224, **view_options):
        local_groups = local_crop_groups(local_crops_number, local_crops_size)
        super().__init__([deit_view(global_crops_size, **view_options) for _ in range(2)],
                         [deit_view(size, **view_options) for _, size in local_groups], global_crops_size,
                         local_groups)

    def __call__(self, image):
        return super().__call__(image.convert('RGB'))


def deit_from_args(args, global_crops_size):
    """The transform of main_esvit.py's flags (--color-jitter --aa --train-interpolation --reprob --remode
    --recount; --resplit has no effect: it concerns AugMix split batches, which neither the original nor DeiT
    builds)."""
    return DataAugmentationDEIT(args.local_crops_number, args.local_crops_size, global_crops_size,
                                color_jitter=args.color_jitter, auto_augment=args.aa,
                                interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                                re_count=args.recount)
