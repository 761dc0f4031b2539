"""Linear probe: a linear classifier trained on the frozen backbone's features (DINO's protocol).

    python eval_linear.py --pretrained_weights output/demo/checkpoint.pth --output_dir output/demo/linear
    torchrun --nproc_per_node=8 eval_linear.py --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --data_path imagenet \\
        --pretrained_weights out/checkpoint.pth --n_last_blocks 4 --output_dir out/linear MODEL.NUM_CLASSES 0

The protocol (features, training, resume) is described in evaluation/linear.py.
"""
import argparse

import utils
from evaluation import backbone_args_parser, eval_linear, parse_eval_args, probe_args_parser


def get_args_parser():
    p = argparse.ArgumentParser('EsViT linear probe', parents=[backbone_args_parser(), probe_args_parser()],
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--n_last_blocks', default=4, type=int,
                   help='concatenate the pooled outputs of the last n blocks (transformers)')
    p.add_argument('--avgpool_patchtokens', default=False, type=utils.bool_flag,
                   help='also concatenate the average-pooled region tokens of the last stage (the original sets it '
                        'for ViT-Base, not for DeiT-Small); adds num_features to the feature dimension')
    return p


if __name__ == '__main__':
    utils.run_main(eval_linear, parse_eval_args(get_args_parser()))
