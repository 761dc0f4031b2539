"""The EsViT training step and epoch, and the training state a checkpoint holds.

    trainer = build_trainer(args, config, steps_per_epoch)   # engine.build
    loss = trainer.step(crops, epoch=epoch, it=it)           # one optimizer step; crops: [2 global, *local] B x 3 x S x S
    stats = trainer.train_one_epoch(data_loader, epoch, log)
    state = trainer.state_dict(epoch)                        # the original's checkpoint layout
    epoch, epoch_images = trainer.load_state(path)           # resume (or continue a V run with V+R)
"""
import math
import os
import signal
from contextlib import nullcontext

import torch
import torch.nn as nn

import utils
from datasets import BoxedViews
from .health import health_summary
from .optim import cancel_gradients_last_layer, clip_gradients, ema_update, images_per_step
from .precision import resolve_precision


def has_batchnorms(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class NonFiniteLoss(Exception):
    def __init__(self, value, epoch, it):
        self.epoch = epoch
        super().__init__(f"loss is {value} at epoch {epoch}, iteration {it}")


class Stopped(Exception):
    """SIGTERM / SIGINT (``signum``; None where another process received it) ended the training."""

    def __init__(self, signum, epoch, step):
        self.signum = signum or signal.SIGTERM
        cause = signal.Signals(signum).name if signum else 'a signal to another process'
        super().__init__(f"stopped by {cause} at epoch {epoch}, step {step}")


class GracefulStop:
    """While active (``with stop:``), SIGTERM and SIGINT do not end the process: they set ``signum`` and the
    training loop ends its step, saves a checkpoint and stops. A second signal acts as usual."""
    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        self.signum = None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])


class Trainer:
    """A student (wrapped in DDP when there are several processes), its EMA teacher (never wrapped: it gets no
    gradient, and every process updates it identically), the loss with its centers, the optimizer, the per-step
    schedules and, for fp16, the gradient scaler. Also what scripts/benchmark.py times."""

    def __init__(self, args, student, teacher, loss_fn, optimizer, schedules, view_mixup=None, view_colour=None):
        self.args = args
        self.view_colour = view_colour  # --colour_augment_on device: the views' colour steps (datasets.DeviceColour)
        self.view_mixup = view_mixup  # --use_mixup: mixes the student's views (engine/mixup.py)
        self.student, self.teacher, self.loss_fn, self.optimizer = student, teacher, loss_fn, optimizer
        self.schedules = schedules
        # forward and backward go through DDP, which averages the gradients over processes
        self.student_ddp = student
        if utils.get_world_size() > 1:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                student, device_ids=[args.gpu] if args.device.type == 'cuda' else None)
        self.autocast_dtype, use_scaler = resolve_precision(args)
        self.scaler = torch.amp.GradScaler('cuda') if use_scaler else None
        # EMA pairs: every parameter of the student with its teacher twin
        self.ema_student = list(student.parameters())
        self.ema_teacher = list(teacher.parameters())
        self.stop = GracefulStop()  # active around the training loop (engine.loop)
        self.health = {}  # the health signals of the last step (engine.health), when the loss has a monitor

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.args.device.type, dtype=self.autocast_dtype)

    def forward_loss(self, crops, epoch, it):
        """Student on all crops, teacher on the two globals: the loss (a 0-d tensor). A loss that is not finite
        in any process raises NonFiniteLoss in every process, before anything is updated."""
        loss_options = {}
        if isinstance(crops, BoxedViews):  # --region_matching position: the views and their crop boxes
            crops, loss_options['boxes'] = crops.crops, crops.boxes.to(self.args.device)
        if self.view_colour:  # crops: [(uint8 pixels, colour draws)], coloured and normalised on the device
            crops = self.view_colour(crops)
        else:
            crops = [c.to(self.args.device, non_blocking=True) for c in crops]
        student_crops, mix_targets = self.view_mixup(crops) if self.view_mixup else (crops, None)
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(crops[:2])   # only the 2 global views pass through the teacher
            student_output = self.student_ddp(student_crops)
            loss = self.loss_fn(student_output, teacher_output, epoch, mix_targets, **loss_options)
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
        update; the gradients are cleared for the next step and the step's health signals collected."""
        args = self.args
        for i, group in enumerate(self.optimizer.param_groups):
            group['lr'] = float(self.schedules.lr[it])
            if i == 0:  # only the first group is regularised
                group['weight_decay'] = float(self.schedules.wd[it])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if args.clip_grad:
            clip_gradients(self.student, args.clip_grad, args.clip_mode)
        cancel_gradients_last_layer(epoch, self.student, args.freeze_last_layer)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        ema_update(self.ema_teacher, self.ema_student, float(self.schedules.momentum[it]))
        self.loss_fn.update_center()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_fn.monitor is not None:  # the step's health signals (engine.health), with the new centers
            self.health = self.loss_fn.monitor.end_step(self.loss_fn)

    def step(self, *micro_batches, epoch, it):
        """One optimizer step on the crops of one batch, or of K micro-batches (--accum_iter K) whose losses
        are averaged: DDP averages the gradients over processes once, on the last micro-batch. Returns the
        loss averaged over micro-batches and processes."""
        loss_sum = 0.
        for i, crops in enumerate(micro_batches):
            accumulate = i < len(micro_batches) - 1 and self.student_ddp is not self.student
            with self.student_ddp.no_sync() if accumulate else nullcontext():
                loss = self.forward_loss(crops, epoch, it) / len(micro_batches)
                self.backward(loss)
            loss_sum += loss.detach()
        self.optimizer_step(epoch, it)
        return utils.global_mean(loss_sum)

    def train_one_epoch(self, data_loader, epoch, log):
        """Train ``epoch``, or its rest after a mid-epoch resume (see ``datasets.set_epoch``): one optimizer
        step per --accum_iter micro-batches. checkpoint.pth records the position every --saveckp_iters steps
        and, when any process received SIGTERM / SIGINT, after the current step; :class:`Stopped` is raised
        then."""
        for network in (self.student, self.teacher):
            if hasattr(network.backbone, 'set_epoch'):  # schedule-dependent backbones (ViL's attention-mode switch)
                network.backbone.set_epoch(epoch, self.args.epochs)
        args = self.args
        steps_per_epoch = self.schedules.iters_per_epoch
        step = steps_per_epoch - len(data_loader) // args.accum_iter  # > 0 when resumed inside this epoch
        metric_logger, health_meters = utils.MetricLogger(), utils.MetricLogger()
        header = f'Epoch: [{epoch}/{args.epochs}]'
        micro_batches = []
        for crops, _ in metric_logger.log_every(data_loader, args.print_freq, header,
                                                args.batch_size_per_gpu * utils.get_world_size(),
                                                start=step * args.accum_iter):
            if not micro_batches and utils.any_process(self.stop.signum is not None, args.device):
                self.save(epoch, step)
                raise Stopped(self.stop.signum, epoch, step)
            micro_batches.append(crops)
            if len(micro_batches) < args.accum_iter:
                continue
            it = steps_per_epoch * epoch + step  # global optimizer step
            utils.fix_random_seeds(args.seed + 1_000_003 * it + args.rank)  # stochastic layers replay after a resume
            loss = self.step(*micro_batches, epoch=epoch, it=it)
            micro_batches, step = [], step + 1
            if args.saveckp_iters and step % args.saveckp_iters == 0 and step < steps_per_epoch:
                self.save(epoch, step)
            lr, wd = self.optimizer.param_groups[0]['lr'], self.optimizer.param_groups[0]['weight_decay']
            metric_logger.update(loss=loss, lr=lr, wd=wd)
            log.scalars(it, **{'train/loss': loss, 'train/lr': lr, 'train/wd': wd,
                               'train/momentum': self.schedules.momentum[it],
                               'train/teacher_temp': self.loss_fn.teacher_temp(epoch),
                               'train/images_per_s': metric_logger.meters['img_per_s'].median,
                               **{f'health/{k}': v for k, v in self.health.items() if k != 'entropy_max'}})
            health_meters.update(**self.health)
        metric_logger.synchronize_between_processes()
        print("Averaged stats:", metric_logger)
        if health_meters.meters:
            print("Health:", health_summary({k: m.global_avg for k, m in health_meters.meters.items()}))
        return {k: meter.global_avg for k, meter in {**metric_logger.meters, **health_meters.meters}.items()}

    # ------------------------------------------------------------------------------------------------------
    # the training state
    # ------------------------------------------------------------------------------------------------------
    def state_dict(self, epoch, epoch_images=0):
        """The original's checkpoint layout: student keys under ``module.``, teacher keys under ``module.`` only
        for models with BatchNorm (the original wrapped that teacher in DDP), ``args`` as plain data. A
        checkpoint inside ``epoch`` also has ``epoch_images``: the images of the epoch's (world-size
        independent) order done."""
        teacher_prefix = 'module.' if has_batchnorms(self.teacher) else ''
        state = {
            'student': {f'module.{k}': v for k, v in self.student.state_dict().items()},
            'teacher': {f'{teacher_prefix}{k}': v for k, v in self.teacher.state_dict().items()},
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'args': utils.plain_args(self.args),
            'dino_loss': self.loss_fn.state_dict(),
        }
        if self.scaler is not None:
            state['fp16_scaler'] = self.scaler.state_dict()
        if epoch_images:
            state['epoch_images'] = epoch_images
        return state

    def save(self, epoch, step=0, name='checkpoint.pth'):
        """``output_dir/name``, written atomically, after ``step`` optimizer steps of ``epoch``."""
        path = os.path.join(self.args.output_dir, name)
        utils.save_checkpoint(self.state_dict(epoch, step * images_per_step(self.args)), path)
        return path

    def load_state(self, path, continuation=False):
        """Load the checkpoint file ``path`` (this project's or the original's) into the running objects; returns
        its (epoch, epoch_images). With ``continuation`` (a view-only run continued with the region loss) the new
        ``head_dense`` and ``center_grid`` keep their fresh values and the optimizer state is rebuilt.

        The optimizer's param-group options that the file lacks (the original's was written by an older torch:
        no ``fused``, ``foreach``, ...) are this run's; its numpy lr and weight decay come back as floats."""
        ckpt = utils.load_checkpoint(path)
        missing = [k for k in ('student', 'teacher') + (() if continuation else ('optimizer',)) if k not in ckpt]
        if missing:
            raise utils.UserError(f"{path} is not a training checkpoint (no {', '.join(missing)} entry); a backbone "
                                  f"alone initialises a run with MODEL.PRETRAINED {path}")
        for name, module in (('student', self.student), ('teacher', self.teacher)):
            weights = utils.strip_prefix(ckpt[name])
            if continuation:  # only the region head may be added (or dropped); anything else must match
                fresh = module.state_dict()
                weights = {k: v for k, v in weights.items() if k in fresh or not k.startswith('head_dense.')}
                weights.update({k: v for k, v in fresh.items() if k.startswith('head_dense.') and k not in weights})
            utils.load_state_dict_checked(module, weights, f"checkpoint {path} ({name})")
        loss_state = dict(ckpt.get('dino_loss', {}))
        if continuation:
            loss_state.update({k: v for k, v in self.loss_fn.state_dict().items() if k not in loss_state})
        self.loss_fn.load_state_dict(loss_state)
        if not continuation:
            saved = ckpt['optimizer']
            for group, current in zip(saved.get('param_groups', []), self.optimizer.param_groups):
                for option, value in current.items():
                    group.setdefault(option, value)
            try:
                self.optimizer.load_state_dict(saved)
            except (ValueError, KeyError) as e:
                raise utils.UserError(f"checkpoint {path}: its optimizer state does not fit this run's "
                                      f"--optimizer and parameters ({e})") from None
            if self.scaler is not None and 'fp16_scaler' in ckpt:
                self.scaler.load_state_dict(ckpt['fp16_scaler'])
        return int(ckpt.get('epoch', 0)), int(ckpt.get('epoch_images', 0))
