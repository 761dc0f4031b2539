"""Linear semantic segmentation on a frozen backbone: a linear layer on the last stage's region tokens.

    python eval_segmentation.py --pretrained_weights output/demo/checkpoint.pth --cache_features True \\
        --output_dir output/demo/segmentation                      # the demo scenes (datasets/scenes.py)
    torchrun --nproc_per_node=8 eval_segmentation.py --pretrained_weights out/checkpoint.pth \\
        --data_path VOCdevkit/VOC2012 --num_labels 21 --image_size 448 --output_dir out/segmentation

The data (Pascal VOC layout), the protocol, metrics and outputs are described in evaluation/segmentation.py.
"""
import argparse

import utils
from evaluation import backbone_args_parser, eval_segmentation, parse_eval_args, probe_args_parser


def get_args_parser():
    p = argparse.ArgumentParser('EsViT linear segmentation', parents=[backbone_args_parser(), probe_args_parser()],
                                formatter_class=utils.HelpFormatter)
    p.set_defaults(batch_size_per_gpu=16, epochs=20, lr=0.1)
    p.add_argument('--n_last_blocks', default=1, type=int,
                   help='1: the last stage\'s region tokens; n > 1 (Swin): the token maps of the last n blocks, '
                        'pooled to the last stage\'s grid and concatenated')
    return p


if __name__ == '__main__':
    utils.run_main(eval_segmentation, parse_eval_args(get_args_parser()))
