"""EsViT pretraining: a student and its EMA teacher, multi-crop views, view-level and region-level losses.

    python main_esvit.py --output_dir out --epochs 1                       # the CPU demo
    torchrun --nproc_per_node=8 main_esvit.py --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --data_path imagenet/train \\
        --output_dir out --use_dense_prediction True MODEL.NUM_CLASSES 0

The options and their help are in engine/args.py (`python main_esvit.py --help`), the run in engine/loop.py.
"""
import utils
from engine import parse_args, train_esvit

if __name__ == '__main__':
    args = parse_args()
    utils.setup_cpu_runtime(args.malloc, args.flush_denormal)
    utils.run_main(train_esvit, args)
