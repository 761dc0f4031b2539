"""Attention maps, view-to-view token correspondences and a correspondence score of a pretrained backbone.

    python run_analysis.py --arch swin_tiny --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml \\
        --pretrained_weights ckpt.pth --image_path photo.jpg --output_dir out --learning ssl --seed 0 \\
        --vis_attention True --vis_correspondence True MODEL.NUM_CLASSES 0
    python run_analysis.py --arch swin_tiny --cfg ... --pretrained_weights ckpt.pth --data_path imagenet \\
        --output_dir out --measure_correspondence True MODEL.NUM_CLASSES 0

Pictures of one image go to OUTPUT_DIR/<image name>/ with an index.html (and index.json) listing them; the
correspondence score goes to OUTPUT_DIR/<data folder name>/measure_correspondence.json (analysis/run.py).
"""
import argparse

import utils
from analysis.run import analyze


def point(text):
    """argparse type of a query point 'y,x', fractions of the image height and width."""
    try:
        y, x = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'y,x' (fractions of the image), got {text!r}") from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(f"query point {text!r} must lie in [0, 1] x [0, 1]")
    return y, x


def get_args_parser():
    p = argparse.ArgumentParser('EsViT analysis: attention maps and correspondences', add_help=False)
    p.add_argument('--cfg', default=None, type=str,
                   help="experiment yaml of the model (default: the one --pretrained_weights was trained with)")
    p.add_argument('--arch', default=None, type=str,
                   help="swin_tiny, cvt_tiny, vil_2262, deit_small, resnet50, ... (default: the checkpoint's)")
    p.add_argument('--patch_size', default=8, type=int,
                   help="patch size of a ViT --arch (deit_tiny, deit_small, vit_base): 16 or 8 (default, as the "
                        "original's), as the checkpoint was trained: --patch_size 16 for a deit_small/16 run")
    p.add_argument('--pretrained_weights', default='', type=str,
                   help="checkpoint of any layout eval_knn.py reads (default: random init)")
    p.add_argument('--checkpoint_key', default='teacher', type=str, help='entry of the checkpoint to load')
    p.add_argument('--learning', default='ssl', choices=['ssl', 'supervised'],
                   help="ssl: load --checkpoint_key; supervised: the checkpoint's 'model' entry")
    p.add_argument('--seed', default=8, type=int, help='seed of the random views')
    p.add_argument('--output_dir', default='.', type=str, help='where the pictures and json files go')
    p.add_argument('--image_path', default=None, type=str, help='image for --vis_attention / --vis_correspondence')
    p.add_argument('--image_path2', default=None, type=str,
                   help='second view for --vis_correspondence (default: a random crop of --image_path)')
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder for --measure_correspondence (its val/ subfolder when there is one)')
    p.add_argument('--image_size', default=224, type=int, help='side of the (square) network input')
    p.add_argument('--threshold', default=0.6, type=float,
                   help='attention masks keep the fewest tokens holding this fraction of the attention')

    p.add_argument('--vis_attention', default=False, type=utils.bool_flag,
                   help='draw the attention of the last blocks on --image_path')
    p.add_argument('--n_last_blocks', default=2, type=int, help='blocks drawn by --vis_attention')
    p.add_argument('--query_point', dest='query_points', default=None, type=point, action='append',
                   help="a query token of --vis_attention as 'y,x' fractions of the image; repeat for several "
                        "(default: 0.5,0.5 0.3,0.3 0.7,0.7)")
    p.add_argument('--vis_correspondence', default=False, type=utils.bool_flag,
                   help='draw the most similar token pairs between two views of --image_path')
    p.add_argument('--measure_correspondence', default=False, type=utils.bool_flag,
                   help='score token matching against a flipped view over --data_path')
    p.add_argument('--top_k', default=10, type=int, help='most similar token pairs drawn or scored per image')
    p.add_argument('--max_images', default=0, type=int, help='--measure_correspondence on at most this many (0: all)')
    p.add_argument('--batch_size_per_gpu', default=64, type=int, help='images per batch of --measure_correspondence')
    p.add_argument('--num_workers', default=4, type=int,
                   help='DataLoader workers of --measure_correspondence (at most the CPUs available)')
    add_original_only_args(p)
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def add_original_only_args(p):
    """Flags of the original's analyze_models.py kept so that its command lines parse; see parse_args."""
    p.add_argument('--use_saved_aug', default=False, type=utils.bool_flag,
                   help="the original's saved augmented view pairs; not supported (True is an error): give the "
                        "second view with --image_path2 (default: False)")
    p.add_argument('--vis_entropy', default=False, type=utils.bool_flag,
                   help="the original's attention-entropy pictures; not supported (True is an error) "
                        "(default: False)")
    p.add_argument('--rank', default=0, type=int, help='accepted and ignored, as in the original (default: 0)')


def parse_args(argv=None):
    parser = argparse.ArgumentParser('EsViT analysis', parents=[get_args_parser()],
                                     formatter_class=utils.HelpFormatter)
    args = parser.parse_args(argv)
    for flag in ('use_saved_aug', 'vis_entropy'):
        if getattr(args, flag):
            parser.error(f"--{flag} True is not supported here (see --help)")
    return args


if __name__ == '__main__':
    utils.run_main(analyze, parse_args())
