"""Mixup / CutMix of the student's views (``--use_mixup``), the original's use of timm's ``Mixup``.

The "classes" are the images of the (per-process) batch: timm mixes image b with image B-1-b of the same view,
and the target row b of a mixed view says how much of each image of the batch it holds. The loss then compares
mixed student view b with the same mixture of the teacher's distributions (engine/losses.py).

Differences from the original, whose path was broken in two places: (1) timm mixes in place, and the original
mixed the very tensors it had given the teacher, so the teacher saw the mixed global views too; here the
student gets mixed copies and the teacher the clean views. (2) Its region-level loss (V+R) ignored the targets;
here the region term of a mixed view is the mixture of its region terms against both source images.
Its view loss also weighted teacher i against student j with ``target[i, j]`` instead of ``target[j, i]``: the
same for --mixup-mode batch and pair (symmetric targets), not for elem.

    view_mixup = build_view_mixup(args)            # None without --use_mixup
    student_crops, targets = view_mixup(crops)     # targets: V x B x B, row b of view v sums to 1
"""
import torch
from timm.data import Mixup

import utils


class ViewMixup:
    """timm's Mixup applied to each of the first ``num_views`` views (globals first); the other views get the
    identity as target."""

    def __init__(self, batch_size, num_views, **mixup_options):
        self.batch_size, self.num_views = batch_size, num_views
        self.mixup = Mixup(num_classes=batch_size, **mixup_options)

    def __call__(self, crops):
        """[V views, B x 3 x S x S each] -> (the student's views, V x B x B mixing targets: row b = the share of
        every image of the batch in image b of the view)."""
        batch = crops[0].shape[0]
        if batch != self.batch_size:
            raise ValueError(f"mixup was built for batches of {self.batch_size}, got {batch}")
        images = torch.arange(batch, device=crops[0].device)
        student_crops, targets = [], []
        for v, crop in enumerate(crops):
            if v < self.num_views:
                crop, target = self.mixup(crop.clone(), images)  # clone: timm mixes in place
            else:
                target = torch.eye(batch, device=crop.device)
            student_crops.append(crop)
            targets.append(target)
        return student_crops, torch.stack(targets)


def build_view_mixup(args):
    """The ViewMixup of --use_mixup and the mixup / cutmix flags, or None (no mixup: --use_mixup False, or
    --mixup 0, --cutmix 0 and no --cutmix-minmax, as the original)."""
    active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if not (args.use_mixup and active):
        return None
    if args.batch_size_per_gpu % 2:
        raise utils.UserError(f"--use_mixup mixes image pairs of a batch: --batch_size_per_gpu "
                              f"{args.batch_size_per_gpu} must be even")
    if args.cutmix_minmax is not None and len(args.cutmix_minmax) != 2:
        raise utils.UserError(f"--cutmix-minmax takes two ratios (min max), got {args.cutmix_minmax}")
    return ViewMixup(args.batch_size_per_gpu, args.num_mixup_views, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                     cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                     mode=args.mixup_mode, label_smoothing=args.smoothing)
