"""EsViT pretraining: a student and its EMA teacher, multi-crop views, view-level and region-level losses.

    python main_esvit.py --output_dir out --epochs 1                       # the CPU demo
    torchrun --nproc_per_node=8 main_esvit.py --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --data_path imagenet/train \\
        --output_dir out --use_dense_prediction True MODEL.NUM_CLASSES 0
"""
import argparse
import datetime
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

import utils
from config import get_default_config, save_config, update_config
from datasets import build_dataset, build_loader, build_transform, demo_data_path, set_epoch, worker_nice
from models import (DDINOLoss, DINOHead, DINOLoss, MultiCropWrapper, build_model, convert_sync_batchnorm,
                    model_name_for_arch)

DEMO_CFG = 'experiments/cpu/swin_demo.yaml'
# What a bare `python main_esvit.py` trains: the small Swin on the embedded Fashion-MNIST subset. Batch 16
# (lr 1e-3 x 16/256): on 2 CPU cores a step is mostly fixed cost, so smaller batches give more steps per minute;
# teacher momentum 0.98 learnt more in a few thousand steps than 0.99 or 0.97 (README, Fashion-MNIST).
DEMO_DEFAULTS = dict(arch='swin_tiny', use_dense_prediction=True, out_dim=4096, head_hidden_dim=512,
                     head_bottleneck_dim=128, local_crops_number=[4],
                     local_crops_size=[32], local_crops_scale=[0.2, 0.5], global_crops_scale=[0.5, 1.0],
                     batch_size_per_gpu=16, lr=0.001, warmup_epochs=0, momentum_teacher=0.98,
                     weight_decay=0.04, weight_decay_end=0.1, norm_last_layer=False, num_workers=2,
                     epochs=5, saveckp_freq=0)


def get_args_parser():
    p = argparse.ArgumentParser('EsViT', add_help=False)
    p.add_argument('--cfg', default=None, type=str, help='experiment yaml (MODEL.NAME, MODEL.SPEC, TRAIN.IMAGE_SIZE)')

    # model
    p.add_argument('--arch', default=None, type=str, help="""swin_tiny/small/base/large, cvt_tiny, vil_2262/1281/14121
        or a torchvision ResNet name; must agree with the yaml's MODEL.NAME (default: the yaml's family)""")
    p.add_argument('--patch_size', default=16, type=int, help='kept for command-line compatibility (ViT only)')
    p.add_argument('--out_dim', default=65536, type=int, help='output dimension of the DINO heads')
    p.add_argument('--norm_last_layer', default=True, type=utils.bool_flag,
                   help='weight-normalise the last layer of the heads with a frozen gain')
    p.add_argument('--momentum_teacher', default=0.996, type=float,
                   help='base EMA momentum of the teacher, raised to 1 with a cosine schedule')
    p.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag)
    p.add_argument('--head_hidden_dim', default=2048, type=int, help='width of the heads\' hidden layers')
    p.add_argument('--head_bottleneck_dim', default=256, type=int,
                   help='width of the heads\' last hidden layer, before the out_dim prototypes')
    p.add_argument('--use_dense_prediction', default=False, type=utils.bool_flag,
                   help='add the region-level matching loss (EsViT V+R)')

    # teacher temperature
    p.add_argument('--warmup_teacher_temp', default=0.04, type=float)
    p.add_argument('--teacher_temp', default=0.04, type=float)
    p.add_argument('--warmup_teacher_temp_epochs', default=0, type=int)

    # optimisation
    p.add_argument('--use_fp16', default=True, type=utils.bool_flag,
                   help='mixed precision with --precision auto: fp16 + GradScaler on CUDA, bf16 on a CPU where it is faster')
    p.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                   help='auto (with --use_fp16) = fp16 on CUDA; on CPU bf16 where a bf16 matmul is at least 1.5x '
                        'as fast as float32 (measured at start), else fp32')
    p.add_argument('--weight_decay', default=0.04, type=float)
    p.add_argument('--weight_decay_end', default=0.4, type=float)
    p.add_argument('--clip_grad', default=3.0, type=float, help='gradient clipping norm, 0 disables')
    p.add_argument('--clip_mode', default='per_tensor', choices=['per_tensor', 'global'],
                   help="per_tensor clips each parameter's gradient (the original); global clips their joint norm")
    p.add_argument('--batch_size_per_gpu', default=64, type=int)
    p.add_argument('--accum_iter', default=1, type=int,
                   help='micro-batches per optimizer step (gradient accumulation): the effective batch is '
                        'batch_size_per_gpu x processes x accum_iter, and lr scales with it')
    p.add_argument('--epochs', default=100, type=int)
    p.add_argument('--freeze_last_layer', default=1, type=int,
                   help='epochs during which the last layer of the heads stays fixed')
    p.add_argument('--lr', default=0.0005, type=float, help='peak lr for a total batch of 256 (scaled linearly)')
    p.add_argument('--warmup_epochs', default=10, type=int)
    p.add_argument('--min_lr', default=1e-6, type=float)
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd', 'lars'])
    p.add_argument('--fused_optimizer', default=True, type=utils.bool_flag,
                   help='fused AdamW / SGD kernels (False: the per-tensor loop)')

    # multi-crop
    p.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.))
    p.add_argument('--local_crops_number', type=int, nargs='+', default=(8,),
                   help='local crops of each size in --local_crops_size, e.g. 6 2')
    p.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4))
    p.add_argument('--local_crops_size', type=int, nargs='+', default=(96,), help='e.g. 96 128')
    p.add_argument('--aug-opt', type=str, default='dino_aug', help='augmentation policy (dino_aug)')

    # data
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root (or zip with --zip_mode); default: the embedded demo data')
    p.add_argument('--dataset', default='imagenet1k', type=str)
    p.add_argument('--zip_mode', default=False, type=utils.bool_flag)
    p.add_argument('--on_bad_image', default='skip', choices=['skip', 'fail'],
                   help='a corrupt image is replaced by another sample and logged (skip) or stops the run')

    # misc
    p.add_argument('--pretrained_weights_ckpt', default='', type=str,
                   help='start from this checkpoint (e.g. a view-only run continued with V+R)')
    p.add_argument('--output_dir', default='.', type=str)
    p.add_argument('--saveckp_freq', default=5, type=int, help='also keep checkpoint{epoch:04}.pth every N epochs')
    p.add_argument('--saveckp_iters', default=0, type=int,
                   help='also write checkpoint.pth every N optimizer steps inside an epoch; a resume continues '
                        'from that step (0: only at the end of each epoch)')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--num_workers', default=10, type=int)
    p.add_argument('--nice_workers', default=True, type=utils.bool_flag,
                   help='on a CPU run, DataLoader workers at the lowest priority (nice 19), so that they do not '
                        'preempt the OpenMP threads of the step (1.5x faster demo steps on 2 cores)')
    p.add_argument('--print_freq', default=10, type=int)
    p.add_argument('--knn_freq', default=None, type=int,
                   help='k-NN accuracy of the teacher every N epochs and after the last; 0: never '
                        '(default 0, the demo: after the last epoch)')
    p.add_argument('--vis_freq', default=0, type=int,
                   help="log an attention picture of the first training image to TensorBoard every N epochs (0: never)")
    p.add_argument('--compile', default=False, type=utils.bool_flag,
                   help='torch.compile the backbones (forward_features); faster steps after a slow first one')
    p.add_argument('--tcmalloc', default=True, type=utils.bool_flag,
                   help='restart with tcmalloc preloaded when it is installed (faster CPU steps; False: glibc malloc)')
    p.add_argument('--flush_denormal', default=True, type=utils.bool_flag,
                   help='flush float32 denormals to zero on the CPU (tiny softmax tails otherwise slow matmuls 100x)')
    p.add_argument('--knn_data_path', default=None, type=str,
                   help='folder with train/ and val/ for --knn_freq (default for the demo: the demo data)')
    p.add_argument('--dist_url', default='env://', type=str)
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help='set by torch.distributed.launch')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def parse_args(argv=None):
    parser = argparse.ArgumentParser('EsViT', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.cfg is None and args.arch is None and args.data_path is None:
        parser.set_defaults(**DEMO_DEFAULTS, cfg=DEMO_CFG)
        args = parser.parse_args(argv)
        args.demo = True
    if args.knn_freq is None:
        args.knn_freq = args.epochs if getattr(args, 'demo', False) else 0
    return args


# ---------------------------------------------------------------------------------------------------------
def load_config(args):
    """Merge the yaml and trailing opts; check --arch against the yaml's family."""
    if args.cfg is None and args.arch:
        model_name = model_name_for_arch(args.arch)
        args.opts = ['MODEL.NAME', model_name] + list(args.opts or [])
    config = update_config(get_default_config(), args)
    model_name_for_arch(args.arch, config.MODEL.NAME)
    return config


def build_student_teacher(args, config):
    """Student and teacher networks (backbone + view head + region head), same initial weights."""
    def network(is_teacher):
        backbone = build_model(config, is_teacher=is_teacher, use_dense_prediction=args.use_dense_prediction)
        def head():
            return DINOHead(backbone.num_features, args.out_dim, use_bn=args.use_bn_in_head,
                            norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                            bottleneck_dim=args.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head(), head() if args.use_dense_prediction else None)

    student, teacher = network(False), network(True)
    if args.compile:  # compiles the method only: module types and state-dict keys stay as they are
        for net in (student, teacher):
            net.backbone.forward_features = torch.compile(net.backbone.forward_features)
    if utils.get_world_size() > 1 and utils.has_batchnorms(student):
        student = convert_sync_batchnorm(student, args.device)
        teacher = convert_sync_batchnorm(teacher, args.device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student.to(args.device), teacher.to(args.device)


def build_loss(args):
    ncrops = sum(args.local_crops_number) + 2
    common = (args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
              args.warmup_teacher_temp_epochs, args.epochs)
    if args.use_dense_prediction:
        return DDINOLoss(*common, local_crops_number=args.local_crops_number).to(args.device)
    return DINOLoss(*common).to(args.device)


def build_optimizer(args, student):
    groups = utils.get_params_groups(student)
    fused = args.fused_optimizer or None  # one kernel over all tensors (CPU and CUDA), same update
    if args.optimizer == 'adamw':
        return torch.optim.AdamW(groups, fused=fused)
    if args.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=0, momentum=0.9, fused=fused)
    return utils.LARS(groups)


BF16_MIN_SPEEDUP = 1.5


def resolve_precision(args):
    """(autocast dtype or None, whether a GradScaler is needed). ``--precision auto`` with ``--use_fp16`` is the
    original's mixed precision: fp16 + GradScaler on CUDA; on a CPU, bf16 autocast where a bf16 matmul runs at
    least BF16_MIN_SPEEDUP times as fast as a float32 one in every process (measured: 2.5x on an AMD EPYC with
    AVX-512-BF16, 0.5x on a Xeon without AMX, over 5x with AMX), float32 elsewhere."""
    precision = args.precision
    if precision == 'auto':
        if not args.use_fp16:
            precision = 'fp32'
        elif args.device.type == 'cuda':
            precision = 'fp16'
        else:
            speedup = utils.bf16_matmul_speedup()
            slow = utils.any_process(speedup < BF16_MIN_SPEEDUP, args.device)
            precision = 'fp32' if slow else 'bf16'
            print(f"--precision auto: {precision} on this CPU (a bf16 matmul runs {speedup:.1f}x as fast as "
                  f"float32; --precision fp32 or bf16 to choose)")
    if precision == 'fp16' and args.device.type != 'cuda':
        raise utils.UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    return dtype, precision == 'fp16'


def images_per_step(args):
    """The effective batch: images of one optimizer step over all processes and accumulated micro-batches."""
    return args.batch_size_per_gpu * utils.get_world_size() * args.accum_iter


class Schedules:
    """Per-optimizer-step lr, weight decay and teacher momentum."""

    def __init__(self, args, iters_per_epoch):
        self.iters_per_epoch = iters_per_epoch
        self.lr = utils.cosine_scheduler(args.lr * images_per_step(args) / 256., args.min_lr, args.epochs,
                                         iters_per_epoch, warmup_epochs=args.warmup_epochs)
        self.wd = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
        self.momentum = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, iters_per_epoch)


# ---------------------------------------------------------------------------------------------------------
class Trainer:
    """One EsViT training step and epoch; also what scripts/benchmark.py times."""

    def __init__(self, args, student, teacher, loss_fn, optimizer, schedules):
        self.args = args
        self.student, self.teacher, self.loss_fn, self.optimizer = student, teacher, loss_fn, optimizer
        self.schedules = schedules
        self.autocast_dtype, use_scaler = resolve_precision(args)
        self.scaler = torch.amp.GradScaler('cuda') if use_scaler else None
        student_without_ddp = getattr(student, 'module', student)
        teacher_without_ddp = getattr(teacher, 'module', teacher)
        # EMA pairs: every floating parameter of the student with its teacher twin
        pairs = list(zip(student_without_ddp.parameters(), teacher_without_ddp.parameters()))
        self.ema_student = [s for s, _ in pairs]
        self.ema_teacher = [t for _, t in pairs]
        self.loss_fn.defer_center_update = True  # the centers move once per optimizer step (optimizer_step)
        self.stop = utils.GracefulStop()          # active around the training loop (train_esvit)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.args.device.type, dtype=self.autocast_dtype)

    def forward_loss(self, crops, epoch, it):
        """Student on all crops, teacher on the two globals: the loss (a 0-d tensor). A loss that is not finite
        in any process raises NonFiniteLoss in every process, before anything is updated."""
        crops = [c.to(self.args.device, non_blocking=True) for c in crops]
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(crops[:2])   # only the 2 global views pass through the teacher
            student_output = self.student(crops)
            loss = self.loss_fn(student_output, teacher_output, epoch)
        loss_value = loss.item()
        if utils.any_process(not math.isfinite(loss_value), self.args.device):
            raise NonFiniteLoss(loss_value, epoch, it)
        return loss

    def backward(self, loss):
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def optimizer_step(self, epoch, it):
        """lr and weight decay of step ``it``, gradient clipping, the update, the teacher EMA and the centers'
        update; the gradients are cleared for the next step."""
        args = self.args
        for i, group in enumerate(self.optimizer.param_groups):
            group['lr'] = float(self.schedules.lr[it])
            if i == 0:  # only the first group is regularised
                group['weight_decay'] = float(self.schedules.wd[it])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if args.clip_grad:
            utils.clip_gradients(self.student, args.clip_grad, args.clip_mode)
        utils.cancel_gradients_last_layer(epoch, self.student, args.freeze_last_layer)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        utils.ema_update(self.ema_teacher, self.ema_student, float(self.schedules.momentum[it]))
        self.loss_fn.update_center()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, *micro_batches, epoch, it):
        """One optimizer step on the crops of one batch, or of K micro-batches (--accum_iter K) whose losses
        are averaged: DDP averages the gradients over processes once, on the last micro-batch. Returns the
        loss averaged over micro-batches and processes."""
        loss_sum = 0.
        for i, crops in enumerate(micro_batches):
            accumulate = i < len(micro_batches) - 1 and hasattr(self.student, 'no_sync')
            with self.student.no_sync() if accumulate else nullcontext():
                loss = self.forward_loss(crops, epoch, it) / len(micro_batches)
                self.backward(loss)
            loss_sum += loss.detach()
        self.optimizer_step(epoch, it)
        return utils.global_mean(loss_sum)

    def save_position(self, epoch, step):
        """checkpoint.pth after ``step`` optimizer steps of ``epoch``."""
        state = checkpoint_state(self.student, self.teacher, self.optimizer, epoch, self.args, self.loss_fn,
                                 self.scaler, epoch_images=step * images_per_step(self.args))
        utils.save_checkpoint(state, os.path.join(self.args.output_dir, 'checkpoint.pth'))

    def train_one_epoch(self, data_loader, epoch, log):
        """Train ``epoch``, or its rest after a mid-epoch resume (see ``set_epoch``): one optimizer step per
        --accum_iter micro-batches. checkpoint.pth records the position every --saveckp_iters steps and,
        when any process received SIGTERM / SIGINT, after the current step; :class:`Stopped` is raised then."""
        for network in (self.student, self.teacher):
            backbone = getattr(network, 'module', network).backbone
            if hasattr(backbone, 'set_epoch'):  # schedule-dependent backbones (ViL's attention-mode switch)
                backbone.set_epoch(epoch, self.args.epochs)
        args = self.args
        steps_per_epoch = self.schedules.iters_per_epoch
        step = steps_per_epoch - len(data_loader) // args.accum_iter  # > 0 when resumed inside this epoch
        metric_logger = utils.MetricLogger()
        header = f'Epoch: [{epoch}/{args.epochs}]'
        micro_batches = []
        for crops, _ in metric_logger.log_every(data_loader, args.print_freq, header,
                                                args.batch_size_per_gpu * utils.get_world_size()):
            if not micro_batches and utils.any_process(self.stop.signum is not None, args.device):
                self.save_position(epoch, step)
                raise Stopped(self.stop.signum, epoch, step)
            micro_batches.append(crops)
            if len(micro_batches) < args.accum_iter:
                continue
            it = steps_per_epoch * epoch + step  # global optimizer step
            utils.fix_random_seeds(args.seed + 1_000_003 * it + args.rank)  # stochastic layers replay after a resume
            loss = self.step(*micro_batches, epoch=epoch, it=it)
            micro_batches, step = [], step + 1
            if args.saveckp_iters and step % args.saveckp_iters == 0 and step < steps_per_epoch:
                self.save_position(epoch, step)
            lr, wd = self.optimizer.param_groups[0]['lr'], self.optimizer.param_groups[0]['weight_decay']
            metric_logger.update(loss=loss, lr=lr, wd=wd)
            log.scalars(it, **{'train/loss': loss, 'train/lr': lr, 'train/wd': wd,
                               'train/momentum': self.schedules.momentum[it],
                               'train/teacher_temp': self.loss_fn.teacher_temp(epoch),
                               'train/images_per_s': metric_logger.meters['img_per_s'].median})
        metric_logger.synchronize_between_processes()
        print("Averaged stats:", metric_logger)
        return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


class NonFiniteLoss(Exception):
    def __init__(self, value, epoch, it):
        super().__init__(f"loss is {value} at epoch {epoch}, iteration {it}")


class Stopped(Exception):
    """SIGTERM / SIGINT (``signum``; None where another process received it) ended the training."""

    def __init__(self, signum, epoch, step):
        self.signum = signum or signal.SIGTERM
        cause = signal.Signals(signum).name if signum else 'a signal to another process'
        super().__init__(f"stopped by {cause} at epoch {epoch}, step {step}")


# ---------------------------------------------------------------------------------------------------------
def checkpoint_state(student, teacher, optimizer, epoch, args, loss_fn, scaler, epoch_images=0):
    """The original's checkpoint layout: student keys under ``module.``, teacher keys under ``module.`` only
    for models with BatchNorm (the original wrapped that teacher in DDP), ``args`` as plain data. A checkpoint
    inside ``epoch`` also has ``epoch_images``: the images of the epoch's (world-size independent) order done."""
    student = getattr(student, 'module', student)
    teacher = getattr(teacher, 'module', teacher)
    teacher_prefix = 'module.' if utils.has_batchnorms(teacher) else ''
    state = {
        'student': {f'module.{k}': v for k, v in student.state_dict().items()},
        'teacher': {f'{teacher_prefix}{k}': v for k, v in teacher.state_dict().items()},
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
        'args': utils.plain_args(args),
        'dino_loss': loss_fn.state_dict(),
    }
    if scaler is not None:
        state['fp16_scaler'] = scaler.state_dict()
    if epoch_images:
        state['epoch_images'] = epoch_images
    return state


def restore(path, student, teacher, optimizer, loss_fn, scaler, continuation=False):
    """Load a checkpoint into the running objects; returns its (epoch, epoch_images). With ``continuation``
    (a view-only run continued with the region loss) the new ``head_dense`` and ``center_grid`` keep their
    fresh values and the optimizer state is rebuilt."""
    ckpt = utils.load_checkpoint(path)
    for name, module in (('student', student), ('teacher', teacher)):
        module = getattr(module, 'module', module)
        weights = utils.strip_prefix(ckpt[name])
        if continuation:  # only the region head may be added (or dropped); anything else must match
            fresh = module.state_dict()
            weights = {k: v for k, v in weights.items() if k in fresh or not k.startswith('head_dense.')}
            weights.update({k: v for k, v in fresh.items() if k.startswith('head_dense.') and k not in weights})
        utils.load_state_dict_checked(module, weights, f"checkpoint {path} ({name})")
    loss_state = dict(ckpt.get('dino_loss', {}))
    if continuation:
        loss_state.update({k: v for k, v in loss_fn.state_dict().items() if k not in loss_state})
    loss_fn.load_state_dict(loss_state)
    if not continuation:
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and 'fp16_scaler' in ckpt:
            scaler.load_state_dict(ckpt['fp16_scaler'])
    return int(ckpt.get('epoch', 0)), int(ckpt.get('epoch_images', 0))


def train_esvit(args):
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)  # every process builds the same networks (the teacher is not in DDP)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise utils.UserError(f"cannot create output dir {args.output_dir}: {e.strerror}") from None
    if not os.access(args.output_dir, os.W_OK):
        raise utils.UserError(f"output dir {args.output_dir} is not writable")
    if args.accum_iter < 1 or args.saveckp_iters < 0:
        raise utils.UserError(f"--accum_iter {args.accum_iter} must be at least 1 and --saveckp_iters "
                              f"{args.saveckp_iters} not negative")
    if len(args.local_crops_number) != len(args.local_crops_size):
        raise utils.UserError(f"--local_crops_number {args.local_crops_number} and --local_crops_size "
                              f"{args.local_crops_size} must have the same length")
    config = load_config(args)
    if utils.is_main_process():
        save_config(config, os.path.join(args.output_dir, 'config.yaml'))
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    # ============ data ============
    data_path = args.data_path or demo_data_path('train')
    transform = build_transform(args, global_crops_size=config.TRAIN.IMAGE_SIZE[0])
    dataset = build_dataset(data_path, transform, zip_mode=args.zip_mode, on_bad_image=args.on_bad_image)
    data_loader = build_loader(dataset, args.batch_size_per_gpu, args.num_workers,
                               distributed=utils.get_world_size() > 1, seed=args.seed, step_batches=args.accum_iter,
                               nice=worker_nice(args.device) if args.nice_workers else 0)
    if len(data_loader) == 0:
        raise utils.UserError(f"{len(dataset)} images in {data_path} are fewer than one optimizer step of "
                              f"{images_per_step(args)}: lower --batch_size_per_gpu or --accum_iter")
    print(f"Data loaded: {len(dataset)} images, {len(data_loader) // args.accum_iter} optimizer steps of "
          f"{images_per_step(args)} images per epoch.")

    # ============ networks, loss, optimizer ============
    student, teacher = build_student_teacher(args, config)
    if utils.get_world_size() > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[args.gpu] if args.device.type == 'cuda' else None)
    print(f"Student and teacher are built: {args.arch} ({config.MODEL.NAME}), "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters.")
    loss_fn = build_loss(args)
    optimizer = build_optimizer(args, student)
    schedules = Schedules(args, len(data_loader) // args.accum_iter)
    trainer = Trainer(args, student, teacher, loss_fn, optimizer, schedules)

    # ============ resume ============
    start_epoch, start_images = 0, 0
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pth')
    if os.path.isfile(checkpoint_path):
        start_epoch, start_images = restore(checkpoint_path, student, teacher, optimizer, loss_fn, trainer.scaler)
        print(f"Resumed from {checkpoint_path} at epoch {start_epoch}, image {start_images} of the epoch")
    elif args.pretrained_weights_ckpt:
        restore(args.pretrained_weights_ckpt, student, teacher, optimizer, loss_fn, trainer.scaler,
                continuation=True)
        print(f"Initialised from {args.pretrained_weights_ckpt}")

    vis_image = None
    if args.vis_freq:
        from analysis import attention_figure, network_input, normalize
        vis_image = normalize(network_input(dataset.read_image(dataset.samples[0][0]), config.TRAIN.IMAGE_SIZE[0]))

    online_knn = None
    if args.knn_freq:
        from eval_knn import OnlineKNN  # eval_knn imports this module
        online_knn = OnlineKNN.for_pretraining(args, config)

    # ============ training ============
    log = utils.TrainingLog(args.output_dir, enabled=utils.is_main_process(), first_epoch=start_epoch)
    start_time = time.time()
    print(f"Starting EsViT training from epoch {start_epoch}")
    with trainer.stop:  # SIGTERM / SIGINT: the current step ends, checkpoint.pth is written, exit 128 + signal
        for epoch in range(start_epoch, args.epochs):
            start_step = start_images // images_per_step(args) if epoch == start_epoch else 0
            set_epoch(data_loader, epoch, start_batch=start_step * args.accum_iter)
            try:
                train_stats = trainer.train_one_epoch(data_loader, epoch, log)
            except Stopped as e:
                log.close()
                print(f"{e}: state saved to {checkpoint_path}; the same command resumes from there", force=True)
                raise SystemExit(128 + e.signum) from None
            except NonFiniteLoss as e:
                nan_path = os.path.join(args.output_dir, 'checkpoint_NaN.pth')
                utils.save_checkpoint(checkpoint_state(student, teacher, optimizer, epoch + 1, args, loss_fn,
                                                       trainer.scaler), nan_path)
                raise utils.UserError(f"{e}: training stopped, state saved to {nan_path}; try a lower --lr, "
                                      f"--clip_grad, or --use_fp16 false") from None

            knn_stats = {}
            if online_knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
                knn_stats = online_knn(getattr(teacher, 'module', teacher).backbone, epoch)
                log.scalars(epoch, **{'knn/top1': knn_stats['knn_top1']})
            # the epoch's log line goes before its checkpoint: a crash in between reruns the epoch (and the
            # resumed run drops the line) instead of losing the line for good
            log.epoch({**{f'train_{k}': v for k, v in train_stats.items()}, **knn_stats, 'epoch': epoch})
            state = checkpoint_state(student, teacher, optimizer, epoch + 1, args, loss_fn, trainer.scaler)
            utils.save_checkpoint(state, checkpoint_path)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                utils.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint{epoch:04}.pth'))
            if vis_image is not None and epoch % args.vis_freq == 0:
                log.image('attention', attention_figure(getattr(teacher, 'module', teacher).backbone, vis_image), epoch)
    log.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


if __name__ == '__main__':
    args = parse_args()
    utils.setup_cpu_runtime(args.tcmalloc, args.flush_denormal)
    utils.run_main(train_esvit, args)
