"""Pack an image folder (class folders or unlabelled) or a text file of image paths into WebDataset tar shards,
for main_esvit.py --data_path 'OUT/train-{000000..00000N}.tar'.

    python scripts/make_shards.py --data_path imagenet/train --output 'shards/train-%06d.tar' --images_per_shard 5000

Keys are the images' indices in the source's order (so the shards' augmentation seeds are those of the folder),
files are copied unchanged, labels of class folders go to .cls. Shards of equal size, as many as a multiple of
processes x loader workers, give every image once per epoch.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from datasets import build_dataset  # noqa: E402
from datasets.shards import write_shards  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('Pack images into WebDataset tar shards', formatter_class=utils.HelpFormatter)
    p.add_argument('--data_path', required=True, help='class folders, an unlabelled folder or a .txt list of paths')
    p.add_argument('--output', required=True, help="shard path with a %%d field, e.g. 'shards/train-%%06d.tar'")
    p.add_argument('--images_per_shard', default=5000, type=int, help='images in each shard')
    return p


def make_shards(args):
    if '%' not in args.output or args.images_per_shard < 1:
        raise utils.UserError(f"--output {args.output} needs a %d field and --images_per_shard "
                              f"{args.images_per_shard} must be positive")
    dataset = build_dataset(args.data_path, labelled=False)
    shards = write_shards(dataset, args.output, args.images_per_shard)
    print(f"{len(dataset.samples)} images in {len(shards)} shards: {shards[0]} ... {shards[-1]}")


if __name__ == '__main__':
    utils.run_main(make_shards, get_args_parser().parse_args())
