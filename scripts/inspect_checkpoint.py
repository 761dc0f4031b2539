"""What a checkpoint file holds, in a few lines: its layout (this project's, the original's or a DINO-style
training checkpoint, a classifier's, a bare or exported backbone), epoch, the arguments that matter, the model
and the parameter count of each part.

    python scripts/inspect_checkpoint.py output/demo/checkpoint.pth
    python scripts/inspect_checkpoint.py released/checkpoint.pth --all_args True

The file is opened as the evaluation opens it (weights_only, memory-mapped: a large file is not read whole).
"""
import argparse
import os
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from evaluation.checkpoints import (checkpoint_layout, is_state_dict, model_flags, safetensors_metadata,  # noqa: E402
                                    stored_args, trained_model)

# the stored arguments worth a glance (--all_args prints every one)
KEY_ARGS = ('use_dense_prediction', 'out_dim', 'norm_last_layer', 'local_crops_number', 'local_crops_size',
            'batch_size_per_gpu', 'world_size', 'accum_iter', 'epochs', 'lr', 'min_lr', 'warmup_epochs',
            'optimizer', 'weight_decay', 'weight_decay_end', 'momentum_teacher', 'teacher_temp',
            'warmup_teacher_temp_epochs', 'clip_grad', 'use_fp16', 'seed', 'data_path')
NOT_WEIGHTS = ('running_mean', 'running_var', 'num_batches_tracked', 'relative_position_index', 'attn_mask')


def count(state_dict):
    """Millions of learnable values: floating tensors other than running statistics and rebuilt buffers, each
    storage counted once (ViL's shared weights have two names)."""
    seen, total = set(), 0
    for key, value in state_dict.items():
        place = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.is_floating_point() and not key.endswith(NOT_WEIGHTS) and place not in seen:
            seen.add(place)
            total += value.numel()
    return f"{total / 1e6:.2f}M"


def parts(state_dict):
    """'backbone 27.52M, head 2.36M, head_dense 2.36M' of a multi-crop wrapper's (or a backbone's) state dict."""
    state_dict = utils.strip_prefix(state_dict)
    groups = {'backbone': {}, 'head': {}, 'head_dense': {}}
    for key, value in state_dict.items():
        groups[next((g for g in ('head_dense', 'head') if key.startswith(g + '.')), 'backbone')][key] = value
    return ', '.join(f"{name} {count(group)}" for name, group in groups.items() if group)


def inspect(path, all_args=False):
    """The lines printed for the checkpoint file ``path``."""
    content = utils.load_checkpoint(path, mmap=True)
    layout = checkpoint_layout(content, path)
    epoch = f", epochs done: {content['epoch']}" if isinstance(content, dict) and 'epoch' in content else ''
    if isinstance(content, dict) and content.get('epoch_images'):
        epoch += f" + {content['epoch_images']} images"
    lines = [f"{path}: {layout}{epoch}, {os.path.getsize(path) / 1e6:.1f} MB"]
    try:
        model = trained_model(path)
        lines.append(f"  model: {model_flags(model) + f'  (from {model.note})' if model else 'not recorded (evaluate it with --arch / --cfg)'}")
    except utils.UserError as e:
        lines.append(f"  model: {e}")
    args = stored_args(content)
    if args:
        shown = sorted(args) if all_args else [k for k in KEY_ARGS if k in args]
        lines += textwrap.wrap(', '.join(f"{k} {args[k]}" for k in shown), width=116, initial_indent='  args: ',
                               subsequent_indent='        ')
    metadata = safetensors_metadata(path)
    lines += [f"  {key}: {metadata[key]}" for key in ('exported_from', 'load') if key in metadata]
    if is_state_dict(content):
        lines.append(f"  weights: {parts(content)} ({len(content)} tensors)")
    for key in ('teacher', 'student', 'model', 'state_dict'):
        if isinstance(content, dict) and is_state_dict(content.get(key)):
            lines.append(f"  {key}: {parts(content[key])}")
    if isinstance(content, dict):
        lines += training_state(content)
    return lines


def training_state(content):
    """Lines on the optimizer, the loss centers and the loss scaler of a training checkpoint."""
    lines = []
    optimizer = content.get('optimizer')
    if isinstance(optimizer, dict) and optimizer.get('param_groups'):
        groups = optimizer['param_groups']
        first = groups[0]
        lines.append(f"  optimizer: {len(groups)} param groups of {sum(len(g['params']) for g in groups)} tensors, "
                     f"state for {len(optimizer.get('state', {}))}; lr {first.get('lr', 0):.3g}, weight decay "
                     f"{first.get('weight_decay', 0):.3g} at the last step")
    extras = [f"{k} {'x'.join(map(str, v.shape))}" for k, v in (content.get('dino_loss') or {}).items()
              if torch.is_tensor(v)]
    if isinstance(content.get('fp16_scaler'), dict):
        extras.append(f"fp16 loss scale {content['fp16_scaler'].get('scale')}")
    if extras:
        lines.append(f"  loss state: {', '.join(extras)}")
    return lines


def get_args_parser():
    p = argparse.ArgumentParser('What a checkpoint file holds', formatter_class=utils.HelpFormatter)
    p.add_argument('checkpoint', type=str, help='a .pth or .safetensors file')
    p.add_argument('--all_args', default=False, type=utils.bool_flag,
                   help='True: print every stored argument; False (default): the ones that matter')
    return p


def main(args):
    print('\n'.join(inspect(args.checkpoint, args.all_args)))


if __name__ == '__main__':
    utils.run_main(main, get_args_parser().parse_args())
