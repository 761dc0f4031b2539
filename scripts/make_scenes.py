"""Write the scene benchmark (datasets/scenes.py): Fashion-MNIST garments on canvases, VOC layout + exact masks.

    python scripts/make_scenes.py --output_dir output/scenes/data --source full --num_train 4000 --num_val 1000
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from datasets.scenes import build_scenes  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('Scene benchmark', formatter_class=utils.HelpFormatter)
    p.add_argument('--output_dir', required=True,
                   help='where the VOC layout (JPEGImages, SegmentationClass, ImageSets) and the unlabelled copies go')
    p.add_argument('--source', default='demo',
                   help="demo: the embedded subset; full: /usr/share/datasets/fashion-mnist; or a folder of IDX files")
    p.add_argument('--num_train', default=2000, type=int, help='train scenes')
    p.add_argument('--num_val', default=500, type=int, help="val scenes (made of the source's test-split garments)")
    p.add_argument('--seed', default=0, type=int, help='the scenes are a function of the seed')
    p.add_argument('--classes', default=None, type=int, nargs='+', help='Fashion-MNIST labels used (default: all)')
    p.add_argument('--canvas_size', default=64, type=int,
                   help='side of each scene; 64 px gives the scene Swin 4x4 last-stage tokens')
    p.add_argument('--garment_sizes', default=[20, 40], type=int, nargs=2, metavar=('MIN', 'MAX'),
                   help="""range of a garment's side in px (28 x 28 photos rescaled); larger garments cover more
        last-stage tokens each (a 16 px token of the scene Swin then lies on one garment more often)""")
    p.add_argument('--garments_per_canvas', default=[2, 4], type=int, nargs=2, metavar=('MIN', 'MAX'),
                   help='least and most garments on a canvas (fewer: less overlap, more of each garment visible)')
    p.add_argument('--max_overlap', default=1.0, type=float,
                   help="""the largest fraction of a garment that the garments painted after it may hide (each is
        placed at the first of 50 random positions that keeps to it, else the best of them); 1: no bound. What
        pretraining gains on the dense probe hardly depends on it, but on the garments per canvas (README,
        Fifth study)""")
    return p


def main(args):
    root = build_scenes(args.output_dir, args.num_train, args.num_val, args.seed,
                        None if args.source == 'demo' else args.source, args.classes, args.canvas_size,
                        tuple(args.garment_sizes), tuple(args.garments_per_canvas), args.max_overlap)
    print(f"Scenes written to {root}")


if __name__ == '__main__':
    utils.run_main(main, get_args_parser().parse_args())
