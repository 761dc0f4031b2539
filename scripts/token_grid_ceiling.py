"""The mIoU that a grid of tokens allows at best on a VOC-layout split: every token of `--token_px` x `--token_px`
mask pixels predicts the majority class of its pixels (an oracle that knows the answer), the prediction is the
token's class on all its pixels. Read beside eval_segmentation.py's mIoU, whose linear probe predicts one class
per last-stage token (upsampled bilinearly): how much of the gap to 100 is the grid's, how much the features'.

    python scripts/token_grid_ceiling.py --data_path output/scenes_big/data --token_px 16 8
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from datasets.voc import IGNORE_INDEX, VOCSegmentation  # noqa: E402
from evaluation.segmentation import segmentation_metrics  # noqa: E402


def block_majority(mask, token_px, num_labels):
    """H x W class indices -> the same mask with each token_px x token_px block set to its majority class
    (ignored pixels do not vote; a block of ignored pixels stays ignored). H and W: multiples of token_px."""
    height, width = mask.shape
    blocks = mask.reshape(height // token_px, token_px, width // token_px, token_px).swapaxes(1, 2)
    blocks = blocks.reshape(height // token_px, width // token_px, -1)                 # h x w x token_px^2
    votes = np.stack([(blocks == c).sum(-1) for c in range(num_labels)], -1)           # h x w x L
    majority = np.where(votes.max(-1) > 0, votes.argmax(-1), IGNORE_INDEX)
    return majority.repeat(token_px, 0).repeat(token_px, 1)


def ceiling(masks, token_px, num_labels):
    """segmentation_metrics of the block-majority oracle over ``masks`` ({path: H x W class indices})."""
    confusion = MulticlassConfusionMatrix(num_labels, ignore_index=IGNORE_INDEX, validate_args=False)  # as the probe's
    for path, mask in masks.items():
        if mask.shape[0] % token_px or mask.shape[1] % token_px:
            raise utils.UserError(f"{path} is {mask.shape[1]}x{mask.shape[0]}, not a multiple of --token_px {token_px}")
        mask = mask.astype(np.int64)
        confusion.update(torch.from_numpy(block_majority(mask, token_px, num_labels)), torch.from_numpy(mask))
    return segmentation_metrics(confusion.compute())


def get_args_parser():
    p = argparse.ArgumentParser('Token-grid ceiling of a segmentation split', formatter_class=utils.HelpFormatter)
    p.add_argument('--data_path', required=True, help='VOC layout (JPEGImages, SegmentationClass, ImageSets)')
    p.add_argument('--split', default='val', help='ImageSets/Segmentation/<split>.txt')
    p.add_argument('--token_px', default=[16], type=int, nargs='+',
                   help='mask pixels per token side, e.g. 16 for the scene Swin at 64 px (4x4 tokens), 8 at 128 px')
    p.add_argument('--num_labels', default=None, type=int, help='classes (default: the largest index in the masks + 1)')
    p.add_argument('--json', default=None, help='also write the results here')
    return p


def main(args):
    dataset = VOCSegmentation(args.data_path, args.split)
    num_labels = args.num_labels or dataset.check() + 1
    masks = {dataset.samples[i][1]: np.asarray(dataset.load(i)[1]) for i in range(len(dataset))}  # read once
    results = {}
    for token_px in args.token_px:
        metrics = ceiling(masks, token_px, num_labels)
        results[token_px] = metrics
        print(f"{token_px} px tokens: block-majority mIoU {metrics['miou']:.2f}, pixel accuracy "
              f"{metrics['pixel_acc']:.2f}, per class " + ' '.join(f'{v:.1f}' for v in metrics['iou'] if v is not None))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    utils.run_main(main, get_args_parser().parse_args())
