"""Weighted k-NN classification on the frozen backbone's features (DINO's protocol).

    python eval_knn.py --pretrained_weights output/demo/checkpoint.pth         # the demo model, demo data
    torchrun --nproc_per_node=8 eval_knn.py --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --data_path imagenet \\
        --pretrained_weights out/checkpoint.pth --checkpoint_key teacher MODEL.NUM_CLASSES 0

Features are the backbone's pooled output, L2-normalised, of the Resize + CenterCrop view of every image
of ``data_path/train`` (the bank) and ``data_path/val``. A test image's class scores are the sum over its
k most cosine-similar bank images of ``exp(similarity / T)`` for their class. Top-1/top-5 per k are printed
and written to ``knn.json``. The protocol itself is in evaluation/knn.py.
"""
import argparse

import utils
from evaluation import backbone_args_parser, eval_knn, parse_eval_args


def get_args_parser():
    p = argparse.ArgumentParser('EsViT k-NN evaluation', parents=[backbone_args_parser()],
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int, help='the k values')
    p.add_argument('--temperature', default=0.07, type=float, help='T of the vote weights exp(similarity / T)')
    p.add_argument('--dump_features', default=None, type=str, help='save the features and labels in this folder')
    p.add_argument('--load_features', default=None, type=str, help='use the features saved in this folder')
    p.add_argument('--output_dir', default=None, type=str,
                   help='where knn.json goes (default: the --dump_features or --load_features folder, else .)')
    p.add_argument('--use_cuda', default=True, type=utils.bool_flag,
                   help='keep the features on the GPU for the vote; False: in CPU memory, for banks that do not '
                        'fit (default: True)')
    return p


if __name__ == '__main__':
    utils.run_main(eval_knn, parse_eval_args(get_args_parser()))
