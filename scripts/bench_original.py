"""Time the ORIGINAL microsoft/esvit training step on the configuration scripts/benchmark.py times ours with,
for a side-by-side comparison on the same machine (same synthetic crops, schedule position, timing loop and JSON keys).

    python scripts/bench_original.py --original_repo /tmp/orig_esvit --batch_size 4 --global_size 224 \\
        --local_size 96 --local_crops_number 8 --out_dim 65536 --steps 5 --warmup 2 --json orig.json

``--original_repo`` is a checkout of microsoft/esvit; its modules are imported from there, nothing of it is
copied here. It needs main_esvit.py, utils.py, config/, models/ (swin_transformer.py, vision_transformer.py,
registry.py, build.py, an ``__init__.py`` importing them) and the Swin yaml given by --cfg. Two import-time
shims are installed here, the checkout itself is not edited: timm >= 0.9 renamed
``timm.data.transforms._pil_interp`` (main_esvit.py imports it), and the original's ``datasets`` package (its
image-folder / TSV / blob-storage loaders) is replaced by a stub, as the data pipeline is not timed.

What is timed is one iteration of the original ``train_one_epoch`` (fp32, no mixup), built as its
``train_esvit`` builds the Swin branch: ``build_model`` from the yaml with ``MODEL.NUM_CLASSES 0``, DINOHead
view and region heads (student heads not weight-normalised, as scripts/benchmark.py runs ours with
``--norm_last_layer false``), the teacher loaded with the student's weights, without gradients and left in
train mode, the student in DistributedDataParallel (``--ddp``) over a 1-process group that also serves the
``dist.all_reduce`` of the loss's center update. Split as scripts/benchmark.py splits ours:

- forward: lr / weight decay of the step, teacher on the 2 global crops, student on all crops, (D)DINOLoss,
  the original's ``math.isfinite(loss.item())`` check;
- backward: ``optimizer.zero_grad()``, ``loss.backward()``;
- optimizer: the original's per-tensor ``utils.clip_gradients`` of the student (its fp32 branch passes an
  undefined ``model`` there, its fp16 branch the student), ``cancel_gradients_last_layer``, AdamW step, and
  the original's per-parameter EMA loop of the teacher.
"""
import argparse
import json
import math
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the original's defaults, and the schedule position scripts/benchmark.py times ours at
# (--epochs 10 --warmup_epochs 1, 100 iterations per epoch, epoch 1, iterations 100 + step)
EPOCHS, ITERS_PER_EPOCH, WARMUP_EPOCHS, EPOCH, FIRST_IT = 10, 100, 1, 1, 100
LR, MIN_LR, WEIGHT_DECAY, WEIGHT_DECAY_END, MOMENTUM_TEACHER = 0.0005, 1e-6, 0.04, 0.4, 0.996
TEACHER_TEMP, CLIP_GRAD, FREEZE_LAST_LAYER = 0.04, 3.0, 1


def get_args(argv=None):
    p = argparse.ArgumentParser('Original EsViT (microsoft/esvit) training-step benchmark',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--original_repo', required=True, help='a checkout of microsoft/esvit')
    p.add_argument('--arch', default='swin_tiny', help='a Swin arch (only the Swin branch of train_esvit is built)')
    p.add_argument('--cfg', default='experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml',
                   help='the yaml, relative to --original_repo')
    p.add_argument('--batch_size', type=int, default=4, help='images per step')
    p.add_argument('--global_size', type=int, default=224, help='side of the 2 global crops')
    p.add_argument('--local_size', type=int, nargs='+', default=[96], help='sides of the local crops')
    p.add_argument('--local_crops_number', type=int, nargs='+', default=[8], help='local crops of each size')
    p.add_argument('--out_dim', type=int, default=65536, help='prototypes of the DINO heads')
    p.add_argument('--use_dense_prediction', type=str.lower, choices=['true', 'false'], default='true',
                   help='true: view + region losses (DDINOLoss), false: view only (DINOLoss)')
    p.add_argument('--ddp', type=str.lower, choices=['true', 'false'], default='true',
                   help='wrap the student in DistributedDataParallel as train_esvit does')
    p.add_argument('--steps', type=int, default=5, help='timed steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('opts', nargs=argparse.REMAINDER, help='config overrides KEY VALUE ... (after MODEL.NUM_CLASSES 0)')
    args = p.parse_args(argv)
    args.use_dense_prediction = args.use_dense_prediction == 'true'
    args.ddp = args.ddp == 'true'
    if 'swin' not in args.arch:
        p.error(f"--arch {args.arch}: only the Swin branch of the original's train_esvit is reproduced")
    if not os.path.isfile(os.path.join(args.original_repo, 'main_esvit.py')):
        p.error(f"--original_repo {args.original_repo}: no main_esvit.py there (a microsoft/esvit checkout is needed)")
    return args


def install_import_shims():
    """Let the original's main_esvit.py import on timm 1.x without a data pipeline (see the module docstring)."""
    import timm.data.transforms as timm_transforms
    if not hasattr(timm_transforms, '_pil_interp'):
        timm_transforms._pil_interp = timm_transforms.str_to_pil_interp

    def build_dataloader(*args, **kwargs):
        raise NotImplementedError('bench_original.py times the training step on synthetic crops only')

    datasets_stub = types.ModuleType('datasets')
    datasets_stub.build_dataloader = build_dataloader
    sys.modules['datasets'] = datasets_stub


def import_original(repo):
    """The original's modules, imported from ``repo`` first on sys.path (this script imports none of ours by the
    names main_esvit / utils / models / config, so nothing is shadowed)."""
    sys.path.insert(0, os.path.abspath(repo))
    install_import_shims()
    import main_esvit
    import utils
    from config import config, update_config
    from models import build_model
    from models.vision_transformer import DINOHead
    return types.SimpleNamespace(main_esvit=main_esvit, utils=utils, config=config, update_config=update_config,
                                 build_model=build_model, DINOHead=DINOHead)


def import_benchmark_helpers():
    """scripts/bench_common.py (synthetic_crops / time_steps / matmul_peak / peak_memory_mb): it imports none of
    this project's modules, so nothing clashes with the original's main_esvit / utils / config / models."""
    sys.path.insert(1, os.path.join(ROOT, 'scripts'))
    import bench_common
    return bench_common


def build_student_teacher(orig, args, device):
    """The Swin branch of the original's train_esvit; returns (student (DDP or not), student_without_ddp, teacher)."""
    cfg_args = types.SimpleNamespace(
        cfg=os.path.join(args.original_repo, args.cfg), rank=0,
        opts=['MODEL.NUM_CLASSES', '0', *(args.opts or []),
              'TRAIN.IMAGE_SIZE', f'[{args.global_size}, {args.global_size}]'])
    orig.update_config(orig.config, cfg_args)
    student = orig.build_model(orig.config, use_dense_prediction=args.use_dense_prediction)
    teacher = orig.build_model(orig.config, is_teacher=True, use_dense_prediction=args.use_dense_prediction)
    student.head = orig.DINOHead(student.num_features, args.out_dim, use_bn=False, norm_last_layer=False)
    teacher.head = orig.DINOHead(teacher.num_features, args.out_dim, False)
    if args.use_dense_prediction:
        student.head_dense = orig.DINOHead(student.num_features, args.out_dim, use_bn=False, norm_last_layer=False)
        teacher.head_dense = orig.DINOHead(teacher.num_features, args.out_dim, False)
    student, teacher = student.to(device), teacher.to(device)
    student_without_ddp = student
    if args.ddp:
        student = nn.parallel.DistributedDataParallel(
            student_without_ddp, device_ids=[device.index] if device.type == 'cuda' else None)
    teacher.load_state_dict(student_without_ddp.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, student_without_ddp, teacher


class OriginalStep:
    """One iteration of the original train_one_epoch (fp32, no mixup), in the phases scripts/benchmark.py times."""

    def __init__(self, orig, args, student, student_without_ddp, teacher):
        self.utils = orig.utils
        self.student, self.student_without_ddp, self.teacher = student, student_without_ddp, teacher
        loss_class = orig.main_esvit.DDINOLoss if args.use_dense_prediction else orig.main_esvit.DINOLoss
        self.loss_fn = loss_class(args.out_dim, sum(args.local_crops_number) + 2, TEACHER_TEMP, TEACHER_TEMP, 0,
                                  EPOCHS).to(next(student.parameters()).device)
        self.optimizer = torch.optim.AdamW(orig.utils.get_params_groups(student))
        self.lr = orig.utils.cosine_scheduler(LR * args.batch_size / 256., MIN_LR, EPOCHS, ITERS_PER_EPOCH,
                                              warmup_epochs=WARMUP_EPOCHS)
        self.wd = orig.utils.cosine_scheduler(WEIGHT_DECAY, WEIGHT_DECAY_END, EPOCHS, ITERS_PER_EPOCH)
        self.momentum = orig.utils.cosine_scheduler(MOMENTUM_TEACHER, 1, EPOCHS, ITERS_PER_EPOCH)

    def forward_loss(self, crops, it):
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group['lr'] = self.lr[it]
            if i == 0:  # only the first group is regularized
                param_group['weight_decay'] = self.wd[it]
        teacher_output = self.teacher(crops[:2])  # only the 2 global views pass through the teacher
        student_output = self.student(crops)
        loss = self.loss_fn(student_output, teacher_output, EPOCH, None)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the original's loss is {loss.item()} at iteration {it}")
        return loss

    def backward(self, loss):
        self.optimizer.zero_grad()
        loss.backward()

    def optimizer_step(self, it):
        self.utils.clip_gradients(self.student, CLIP_GRAD)
        self.utils.cancel_gradients_last_layer(EPOCH, self.student, FREEZE_LAST_LAYER)
        self.optimizer.step()
        with torch.no_grad():  # the original's EMA loop: one mul_ / add_ per parameter
            m = self.momentum[it]
            for param_q, param_k in zip(self.student_without_ddp.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def benchmark(args):
    load_before = os.getloadavg()
    orig = import_original(args.original_repo)
    helpers = import_benchmark_helpers()
    device = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', store=dist.HashStore(), rank=0, world_size=1)
    orig.utils.fix_random_seeds(0)
    student, student_without_ddp, teacher = build_student_teacher(orig, args, device)
    step = OriginalStep(orig, args, student, student_without_ddp, teacher)
    crops = helpers.synthetic_crops(args, device)
    phases, cpu_seconds, faults = helpers.time_steps(lambda it: step.forward_loss(crops, it), step.backward,
                                                     step.optimizer_step, args, device, first_it=FIRST_IT)

    with FlopCounterMode(display=False) as counter:
        step.backward(step.forward_loss(crops, FIRST_IT))
    flops = counter.get_total_flops()
    peak = helpers.matmul_peak(device, torch.float32)
    step_time = sum(phases.values())
    result = {
        'implementation': 'microsoft/esvit (original)', 'ddp': args.ddp,
        'arch': args.arch, 'precision': 'fp32', 'compile': False, 'train_args': '',
        'batch_size': args.batch_size, 'crops': f"2x{args.global_size}+" + '+'.join(
            f"{n}x{s}" for n, s in zip(args.local_crops_number, args.local_size)),
        'out_dim': args.out_dim, 'dense': args.use_dense_prediction, 'device': str(device),
        'threads': torch.get_num_threads(),
        'images_per_s': args.batch_size / step_time, 'seconds_per_step': step_time,
        **{f'{name}_s': seconds for name, seconds in phases.items()},
        'malloc': 'system', 'cpu_seconds_per_step': cpu_seconds, 'minor_faults_per_step': faults,
        'peak_memory_mb': helpers.peak_memory_mb(device), 'gflop_per_step': flops / 1e9,
        'achieved_gflops': flops / 1e9 / step_time, 'matmul_peak_gflops': peak / 1e9,
        'fraction_of_peak': flops / step_time / peak,
        'load_average_before': load_before, 'load_average_after': os.getloadavg(),
    }
    dist.destroy_process_group()
    return result


if __name__ == '__main__':
    arguments = get_args()
    report = json.dumps(benchmark(arguments), indent=1)
    print(report)
    if arguments.json:
        with open(arguments.json, 'w') as f:
            f.write(report + '\n')
