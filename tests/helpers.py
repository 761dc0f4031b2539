"""What several test files share: the repository root, tiny models and training command lines, a trainer and a
config built the way the CLI builds them. Test files import this module, never each other."""
import argparse
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('ESVIT_REFERENCE_DIR', ROOT.parent / 'shared' / 'reference'))

# A tiny Swin (2 blocks, 16 channels) at 32 px global crops: a training epoch takes a few seconds.
TINY_MODEL = ['--cfg', 'experiments/cpu/swin_demo.yaml', '--arch', 'swin']
TINY_OPTS = ['MODEL.SPEC.DEPTHS', '[1, 1]', 'MODEL.SPEC.NUM_HEADS', '[1, 2]', 'MODEL.SPEC.DIM_EMBED', '16',
             'TRAIN.IMAGE_SIZE', '[32, 32]']
# its training flags (16 px local crops, V+R); exact comparisons: not --precision auto, which is bf16 on some CPUs
TINY = TINY_MODEL + ['--out_dim', '256', '--local_crops_number', '2', '--local_crops_size', '16',
                     '--batch_size_per_gpu', '8', '--num_workers', '0', '--warmup_epochs', '0', '--lr', '0.005',
                     '--use_dense_prediction', 'True', '--norm_last_layer', 'false', '--print_freq', '100',
                     '--saveckp_freq', '1', '--momentum_teacher', '0.9', '--precision', 'fp32']


def command(*flags, view_only=False):
    """The tiny run's main_esvit.py command line with extra flags (the trailing config overrides come last)."""
    base = [a if not (view_only and a == 'True') else 'False' for a in TINY]
    return base + list(flags) + TINY_OPTS


def run_training(argv):
    """main_esvit.py's run in this process, from the repository root; returns its arguments."""
    from engine import parse_args, train_esvit
    os.chdir(ROOT)
    args = parse_args(argv)
    train_esvit(args)
    return args


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def make_config(cfg=None, opts=()):
    """A merged, frozen config from a yaml (relative to the repo root) and trailing opts, without the --arch
    checks of ``config.load_config``."""
    from config import get_default_config, update_config
    config = get_default_config()
    update_config(config, argparse.Namespace(cfg=str(ROOT / cfg) if cfg else None, opts=list(opts)))
    return config


def build_trainer(arch, cfg, tmp_path, extra=(), steps_per_epoch=8):
    """A Trainer of ``arch`` (V+R, 128 prototypes, batch 4, 2 local crops of 32 px, fp32) as main_esvit.py
    builds it."""
    import utils
    from config import load_config
    from engine import build_trainer as build, parse_args
    argv = ['--arch', arch, '--out_dim', '128', '--use_dense_prediction', 'True', '--local_crops_number', '2',
            '--local_crops_size', '32', '--batch_size_per_gpu', '4', '--warmup_epochs', '0', '--lr', '0.01',
            '--norm_last_layer', 'false', '--momentum_teacher', '0.9', '--epochs', '4',
            '--output_dir', str(tmp_path), '--precision', 'fp32', *extra]
    if cfg:
        argv += ['--cfg', str(ROOT / cfg)]
    args = parse_args(argv)
    utils.init_distributed_mode(args)
    torch.manual_seed(0)
    return build(args, load_config(args), steps_per_epoch)


def subset_folder(source, root, per_class):
    """``root`` (created) with the first ``per_class`` images of each class folder of ``source``; returns it as str."""
    import shutil
    for cls in sorted(os.listdir(source)):
        os.makedirs(os.path.join(root, cls))
        for name in sorted(os.listdir(os.path.join(source, cls)))[:per_class]:
            shutil.copy(os.path.join(source, cls, name), os.path.join(root, cls, name))
    return str(root)

