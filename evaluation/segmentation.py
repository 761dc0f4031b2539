"""Linear semantic segmentation on a frozen backbone (the dense protocol of DINOv2 and iBOT);
``eval_segmentation(args)`` runs eval_segmentation.py.

Features: the last stage's region tokens (the tokens EsViT's region loss trains), B x h x w x C; with
``--n_last_blocks n > 1`` (Swin) the token maps of the last n blocks, each average-pooled to the last stage's
grid, concatenated along the channels. A linear layer on each token (a 1 x 1 convolution) gives class
logits, upsampled bilinearly to the mask; cross-entropy ignores the pixels labelled 255. The backbone stays in
eval mode without gradients; only the linear layer learns (SGD, momentum 0.9, lr x total batch / 256, cosine
to 0), on random resized crops + flips of image and mask together, and is validated on the resized centre
crops every ``--val_freq`` epochs and after the last. ``--cache_features True`` computes the features of the
centre crops once and trains on them (no augmentation): a fast approximation for CPU runs.

Metrics, from the confusion matrix of all val pixels (summed over processes, ``torchmetrics``): the IoU of
each class, TP / (TP + FP + FN); mIoU, their mean over the classes present in the val ground truth
(background included); pixel accuracy, the fraction of non-ignored pixels predicted right.

The output directory holds ``checkpoint.pth.tar`` (classifier, optimizer, scheduler, epoch, best mIoU;
rerunning the command resumes), ``segmentation.json`` (miou, pixel_acc, per-class IoU, the arguments),
``log.txt``, TensorBoard under ``tb/`` and ``predictions.png``: a few val images, their ground truth and the
prediction side by side with a legend of the classes.
"""
import math
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchmetrics.classification import MulticlassConfusionMatrix

import utils
from datasets import WorkerLoader, build_loader, set_epoch, worker_nice
from datasets.scenes import demo_scenes_path
from datasets.voc import (IGNORE_INDEX, VOCSegmentation, segmentation_train_transform, segmentation_val_transform)
from .backbone import build_frozen_backbone
from .checkpoints import model_config
from .features import build_eval_loader, extract_features
from .linear import CachedFeatureBatches, feature_dim, probe_optimization, start_probe, train_one_epoch

NUM_PICTURES = 4  # val images drawn in predictions.png


# ---------------------------------------------------------------------------------------------------------
# features, classifier, metrics
# ---------------------------------------------------------------------------------------------------------
def token_grid(tokens):
    """B x L x C row-major tokens of a square map -> B x C x h x w."""
    B, L, C = tokens.shape
    side = math.isqrt(L)
    if side * side != L:
        raise utils.UserError(f"the backbone's {L} tokens do not form a square grid (use square crops)")
    return tokens.transpose(1, 2).reshape(B, C, side, side)


def dense_features(backbone, images, n_last_blocks=1):
    """The segmentation probe's features: B x 3 x S x S -> B x h x w x D (h x w: the last stage's grid)."""
    if n_last_blocks == 1:
        return token_grid(backbone.forward_features(images)[1]).permute(0, 2, 3, 1)
    if not hasattr(backbone, 'forward_return_n_last_block_tokens'):
        raise utils.UserError(f"--n_last_blocks {n_last_blocks} needs a backbone with per-block token maps (Swin); "
                              f"use --n_last_blocks 1 (the last stage's region tokens)")
    maps = [token_grid(tokens) for tokens in backbone.forward_return_n_last_block_tokens(images, n_last_blocks)]
    grid = maps[-1].shape[-2:]
    return torch.cat([F.adaptive_avg_pool2d(m, grid) for m in maps], dim=1).permute(0, 2, 3, 1)


class LinearSegmenter(nn.Module):
    """A linear layer on each token (weights N(0, 0.01), zero bias), logits upsampled bilinearly to the mask."""

    def __init__(self, dim, num_labels, mask_size):
        super().__init__()
        self.mask_size = mask_size
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, features):  # B x h x w x D -> B x num_labels x S x S
        logits = self.linear(features).permute(0, 3, 1, 2)  # B x L x h x w
        return F.interpolate(logits, size=self.mask_size, mode='bilinear', align_corners=False)


def dense_cross_entropy(logits, masks):
    """Cross-entropy of B x L x S x S logits against B x S x S masks (uint8 or int), pixels of 255 ignored."""
    return F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)


def segmentation_metrics(confusion):
    """From an L x L confusion matrix (rows: true class, columns: predicted; ignored pixels not counted):
    {'miou': mean IoU (%) over the classes with ground-truth pixels, 'pixel_acc': %, 'iou': [IoU % of each
    class, None for a class absent from the ground truth]}."""
    confusion = confusion.double()
    true_positives = confusion.diag()
    truth, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    iou = true_positives / (truth + predicted - true_positives).clamp(min=1)  # L
    present = truth > 0
    return {'miou': 100.0 * iou[present].mean().item() if present.any() else 0.0,
            'pixel_acc': 100.0 * (true_positives.sum() / confusion.sum().clamp(min=1)).item(),
            'iou': [100.0 * v if p else None for v, p in zip(iou.tolist(), present.tolist())]}


class RankShard(Sampler):
    """Indices ``rank, rank + world, ...``: each sample in exactly one process, no padding (uneven shards), so
    a sum over processes counts every pixel once."""

    def __init__(self, length):
        self.indices = range(utils.get_rank(), length, utils.get_world_size())

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SegmentationValidation:
    """The metrics of the whole val set under the current classifier: from cached (features N x h x w x D,
    masks N x S x S), each process taking its share, or from ``encode(images)`` over this process's share."""

    def __init__(self, num_labels, loader=None, encode=None, features=None, masks=None):
        self.num_labels, self.loader, self.encode = num_labels, loader, encode
        self.features, self.masks = features, masks

    def batches(self, batch_size=64):
        if self.loader is not None:
            yield from self.loader
            return
        share = list(RankShard(len(self.features)))
        for start in range(0, len(share), batch_size):
            indices = share[start:start + batch_size]
            yield self.features[indices], self.masks[indices]

    @torch.no_grad()
    def evaluate(self, classifier, device):
        classifier.eval()
        confusion = MulticlassConfusionMatrix(self.num_labels, ignore_index=IGNORE_INDEX,
                                              validate_args=False).to(device)
        for inputs, masks in self.batches():
            inputs = inputs.to(device)
            features = self.encode(inputs) if self.encode is not None else inputs
            confusion.update(classifier(features).argmax(dim=1), masks.to(device).long())
        return segmentation_metrics(confusion.compute())  # summed over processes


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def segmentation_datasets(args):
    """(train set, val set, num_labels) of ``args.data_path`` (default: the demo scenes), checked: every mask has
    its image's size and classes below ``--num_labels`` (default: the largest class index + 1)."""
    root = args.data_path or str(demo_scenes_path())
    val_view = segmentation_val_transform(args.image_size, args.resize_size)
    train_view = val_view if args.cache_features else segmentation_train_transform(args.image_size)
    train_set, val_set = VOCSegmentation(root, 'train', train_view), VOCSegmentation(root, 'val', val_view)
    largest = max(train_set.check(args.num_labels), val_set.check(args.num_labels))
    return train_set, val_set, args.num_labels or largest + 1


def class_names(root, num_labels):
    """The names in ``root/classes.txt`` (one a line, by index; the scenes write one), else the indices."""
    path = os.path.join(root, 'classes.txt')
    names = open(path).read().split() if os.path.isfile(path) else []
    return [names[i] if i < len(names) else str(i) for i in range(num_labels)]


def build_segmentation_data(args, encode, train_set, val_set, num_labels):
    """(train batches, encode for training, validation); with ``--cache_features`` the features of both sets
    are computed once (centre crops) and training gets them as they are."""
    device = args.device
    if not args.cache_features:
        val_loader = WorkerLoader(val_set, sampler=RankShard(len(val_set)), batch_size=args.batch_size_per_gpu,
                                  num_workers=args.num_workers, nice=worker_nice(device))
        train_loader = build_loader(train_set, args.batch_size_per_gpu, args.num_workers, utils.is_dist(),
                                    seed=args.seed, drop_last=False, nice=worker_nice(device))
        return train_loader, encode, SegmentationValidation(num_labels, val_loader, encode)
    forward = lambda _, images: encode(images)  # noqa: E731 (extract_features calls forward(model, images))
    print("Caching the features of the val and train sets (centre crops, no augmentation)...")
    val_features, val_masks = extract_features(None, build_eval_loader(val_set, args.batch_size_per_gpu,
                                                                       args.num_workers), device, forward=forward)
    validation = SegmentationValidation(num_labels, features=val_features, masks=val_masks)
    if args.evaluate:
        return None, None, validation
    train_loader = build_eval_loader(train_set, args.batch_size_per_gpu, args.num_workers)
    train_features, train_masks = extract_features(None, train_loader, device, forward=forward)
    return CachedFeatureBatches(train_features, train_masks, args.batch_size_per_gpu, args.seed), nn.Identity(), \
        validation


# ---------------------------------------------------------------------------------------------------------
# pictures and results
# ---------------------------------------------------------------------------------------------------------
def class_colours(num_labels):
    """num_labels x 3 floats: matplotlib's tab20 colours (background black)."""
    from matplotlib import colormaps
    colours = np.array([colormaps['tab20'](i % 20)[:3] for i in range(num_labels)])
    colours[0] = 0.0
    return colours


def predictions_figure(images, masks, predictions, names):
    """A matplotlib figure: one row per image (H x W x 3 floats), its ground truth and prediction (H x W class
    indices, 255 drawn white), and a legend of the classes that occur."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colours = class_colours(len(names))

    def paint(mask):
        picture = np.ones((*mask.shape, 3))
        valid = mask != IGNORE_INDEX
        picture[valid] = colours[mask[valid]]
        return picture

    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.4 * rows + 0.8), squeeze=False)
    for row, (image, mask, prediction) in enumerate(zip(images, masks, predictions)):
        for ax, picture, title in zip(axes[row], (image, paint(mask), paint(prediction)),
                                      ('image', 'ground truth', 'prediction')):
            ax.imshow(picture, interpolation='nearest')
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    seen = sorted(set(np.unique(np.stack(masks))) | set(np.unique(np.stack(predictions))) - {IGNORE_INDEX})
    fig.legend(handles=[Patch(color=colours[c], label=names[c]) for c in seen], loc='lower center',
               ncol=min(len(seen), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (2.4 * rows + 0.8) + 0.02, 1, 1))
    return fig


@torch.no_grad()
def draw_predictions(classifier, encode, val_set, names, device, path):
    """predictions.png of the first NUM_PICTURES val images; returns the picture as H x W x 3 uint8."""
    from datasets import denormalize
    classifier.eval()
    samples = [val_set[i] for i in range(min(NUM_PICTURES, len(val_set)))]
    images = torch.stack([image for image, _ in samples]).to(device)
    predictions = classifier(encode(images)).argmax(dim=1).cpu().numpy()
    fig = predictions_figure(denormalize(images).permute(0, 2, 3, 1).cpu().numpy(),
                             [mask.numpy() for _, mask in samples], list(predictions), names)
    fig.savefig(path, dpi=100)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt
    plt.close(fig)
    return picture


def save_results(args, stats, names, epoch):
    """segmentation.json: miou, pixel_acc, the IoU of each class by name, the epoch and the arguments."""
    utils.save_json({'miou': stats['miou'], 'pixel_acc': stats['pixel_acc'],
                     'per_class_iou': dict(zip(names, stats['iou'])), 'epoch': epoch,
                     'args': utils.plain_args(args)}, os.path.join(args.output_dir, 'segmentation.json'))


# ---------------------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------------------
def eval_segmentation(args):
    start_probe(args)
    device = args.device

    # ============ frozen backbone and data ============
    train_set, val_set, num_labels = segmentation_datasets(args)
    backbone = build_frozen_backbone(model_config(args), args.pretrained_weights, args.checkpoint_key).to(device)
    encode = partial(dense_features, backbone, n_last_blocks=args.n_last_blocks)  # images -> B x h x w x D
    dim = feature_dim(lambda images: encode(images)[:, 0, 0], args.image_size, device)  # D of one token
    names = class_names(train_set.root, num_labels)
    print(f"Data loaded: {len(train_set)} train and {len(val_set)} val images of {train_set.root}, {num_labels} "
          f"classes; features of dimension {dim}.")
    train_batches, train_encode, validation = build_segmentation_data(args, encode, train_set, val_set, num_labels)

    # ============ the linear classifier ============
    classifier = LinearSegmenter(dim, num_labels, (args.image_size, args.image_size)).to(device)
    # best_acc of the checkpoint: the best mIoU
    trained, optimizer, scheduler, checkpoint_path, start_epoch, best_miou = probe_optimization(args, classifier)
    log = utils.TrainingLog(args.output_dir, enabled=utils.is_main_process(), first_epoch=start_epoch)
    if args.evaluate and start_epoch == 0:
        raise utils.UserError(f"--evaluate needs a trained classifier in {checkpoint_path}")

    # ============ training ============
    stats = None
    for epoch in range(start_epoch, 0 if args.evaluate else args.epochs):
        if args.cache_features:
            train_batches.set_epoch(epoch)
        else:
            set_epoch(train_batches, epoch)
        train_stats = train_one_epoch(trained, train_encode, optimizer, train_batches, epoch, device,
                                      args.print_freq, criterion=dense_cross_entropy)
        scheduler.step()
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        log.scalars(epoch, **{'train/loss': train_stats['loss'], 'train/lr': train_stats['lr']})
        stats = None
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validation.evaluate(classifier, device)
            best_miou = max(best_miou, stats['miou'])
            print(f"Epoch {epoch}: mIoU {stats['miou']:.2f}% pixel accuracy {stats['pixel_acc']:.2f}% on the "
                  f"{len(val_set)} val images (best mIoU {best_miou:.2f}%)")
            log_stats.update(val_miou=stats['miou'], val_pixel_acc=stats['pixel_acc'])
            log.scalars(epoch, **{'val/miou': stats['miou'], 'val/pixel_acc': stats['pixel_acc']})
        log.epoch(log_stats)
        utils.save_checkpoint({'epoch': epoch + 1, 'state_dict': classifier.state_dict(),
                               'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                               'best_acc': best_miou, 'args': utils.plain_args(args)}, checkpoint_path)
    if stats is None:  # --evaluate, or a finished run's command again
        stats = validation.evaluate(classifier, device)
    epoch = start_epoch if args.evaluate else max(start_epoch, args.epochs)  # epochs the classifier trained
    if utils.is_main_process():
        save_results(args, stats, names, epoch)
        picture = draw_predictions(classifier, encode, val_set, names, device,
                                   os.path.join(args.output_dir, 'predictions.png'))
        log.image('val/predictions', picture, epoch)
    log.close()
    print(f"Linear segmentation on frozen features: mIoU {stats['miou']:.2f}%, pixel accuracy "
          f"{stats['pixel_acc']:.2f}% on the {len(val_set)} val images (last epoch; best mIoU {best_miou:.2f}%)")
    return stats
