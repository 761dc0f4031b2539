"""Export the backbone of a checkpoint for other code: in timm's or torchvision's keys (their network of it loads
the file with strict=True and gives the same features), or in this project's keys with the config.yaml that
rebuilds it.

    python scripts/export_backbone.py --pretrained_weights out/checkpoint.pth --output swin_tiny.safetensors
    python scripts/export_backbone.py --pretrained_weights resnet/checkpoint.pth --format torchvision \\
        --output resnet50.pth
    python scripts/export_backbone.py --pretrained_weights released/checkpoint.pth --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window14_224.yaml --format timm \\
        --output swin_tiny_w14.safetensors MODEL.NUM_CLASSES 0

The model is the one the checkpoint was trained with (this project's and the original's checkpoints store
their arguments) unless --arch / --cfg / KEY VALUE say otherwise. It prints the Python call that builds the
library's network; e.g. for Swin-T/7 ``timm.create_model('swin_tiny_patch4_window7_224', num_classes=0,
norm_layer=partial(torch.nn.LayerNorm, eps=1e-06))`` (without the norm layer: timm's eps 1e-5, features within
~1e-5).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from evaluation import build_frozen_backbone, model_config  # noqa: E402
from evaluation.checkpoints import EXPORT_FORMATS, export_backbone  # noqa: E402
from models.interop import library_formats  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('Export a pretrained backbone (timm, torchvision or this project\'s keys)',
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--pretrained_weights', required=True, type=str,
                   help="checkpoint of any layout eval_knn.py reads (this project's, the original's, DINO-style, bare)")
    p.add_argument('--checkpoint_key', default='teacher', type=str,
                   help='entry of a training checkpoint to export: teacher (default; the one EsViT evaluates) or student')
    p.add_argument('--arch', default=None, type=str, help="as in main_esvit.py (default: the checkpoint's)")
    p.add_argument('--cfg', default=None, type=str, help="the model's yaml (default: the checkpoint's)")
    p.add_argument('--patch_size', default=16, type=int, help='kept for command-line compatibility (ViT only)')
    p.add_argument('--format', default=None, choices=EXPORT_FORMATS,
                   help="keys of the output: timm (Swin, ResNets), torchvision (ResNets) or state_dict (this "
                        "project's; every model, with config.yaml beside it). Default: timm where timm has the "
                        "model, else state_dict")
    p.add_argument('--output', required=True, type=str,
                   help='the file to write, .safetensors (recommended: no pickle) or .pth; config.yaml goes beside it')
    p.add_argument('--verify', default=True, type=utils.bool_flag,
                   help="True (default) / False: before writing, check that the library's network loads the weights "
                        "strictly and gives this backbone's features on random images (a few seconds on a CPU)")
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def main(args):
    config = model_config(args)
    backbone = build_frozen_backbone(config, args.pretrained_weights, args.checkpoint_key)
    fmt = args.format or (library_formats(config) or ('state_dict',))[0]
    source = {'exported_from': f"{os.path.abspath(args.pretrained_weights)} ('{args.checkpoint_key}')",
              'model': f"MODEL.NAME {config.MODEL.NAME}, --arch {args.arch} --cfg {args.cfg} {' '.join(args.opts)}"}
    print(export_backbone(backbone, config, fmt, args.output, metadata=source, verify=args.verify))


if __name__ == '__main__':
    utils.run_main(main, get_args_parser().parse_args())
