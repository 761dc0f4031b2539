"""Everything a training step needs, built from main_esvit.py's arguments: one ``build_trainer`` for the
training run, scripts/benchmark.py and the tests.

    trainer = build_trainer(args, config, steps_per_epoch)   # args from engine.args.parse_args
"""
import torch

import utils
from datasets import DeviceColour
from models import DINOHead, MultiCropWrapper, build_model, convert_sync_batchnorm
from .health import HealthMonitor
from .losses import DDINOLoss, DINOLoss
from .mixup import build_view_mixup
from .optim import Schedules, build_optimizer
from .trainer import Trainer, has_batchnorms


def build_student_teacher(args, config):
    """Student and teacher networks (backbone + view head + region head with --use_dense_prediction), the same
    initial weights, on ``args.device``; the teacher has no gradients."""
    def network(is_teacher):
        backbone = build_model(config, is_teacher=is_teacher)

        def head():
            return DINOHead(backbone.num_features, args.out_dim, use_bn=args.use_bn_in_head,
                            norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                            bottleneck_dim=args.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head(), head() if args.use_dense_prediction else None)

    student, teacher = network(False), network(True)
    if args.compile:  # compiles the method only: module types and state-dict keys stay as they are
        for net in (student, teacher):
            net.backbone.forward_features = torch.compile(net.backbone.forward_features)
    if utils.get_world_size() > 1 and has_batchnorms(student):
        student = convert_sync_batchnorm(student, args.device)
        teacher = convert_sync_batchnorm(teacher, args.device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student.to(args.device), teacher.to(args.device)


def build_loss(args):
    """The view loss (V), or view + region loss (V+R) with --use_dense_prediction, on ``args.device``; with
    --health_signals, watched by a :class:`~engine.health.HealthMonitor`."""
    ncrops = sum(args.local_crops_number) + 2
    common = (args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
              args.warmup_teacher_temp_epochs, args.epochs)
    if args.use_dense_prediction:
        loss = DDINOLoss(*common, local_crops_number=args.local_crops_number,
                         region_weight=args.region_loss_weight,
                         region_teacher_temp=args.region_teacher_temp,
                         region_matching=args.region_matching).to(args.device)
    else:
        loss = DINOLoss(*common).to(args.device)
    if args.health_signals:
        loss.monitor = HealthMonitor(args.out_dim)
    return loss


def colour_on_device(args):
    """--colour_augment_on resolved on ``args.device``: auto is the device on CUDA (with dino_aug)."""
    if args.colour_augment_on == 'auto':
        return args.device.type == 'cuda' and args.aug_opt == 'dino_aug'
    return args.colour_augment_on == 'device'


def build_trainer(args, config, steps_per_epoch):
    """A :class:`~engine.trainer.Trainer` for ``steps_per_epoch`` optimizer steps per epoch. ``args`` must have
    been through ``utils.init_distributed_mode`` (it sets ``args.device``)."""
    student, teacher = build_student_teacher(args, config)
    return Trainer(args, student, teacher, build_loss(args), build_optimizer(args, student),
                   Schedules(args, steps_per_epoch), view_mixup=build_view_mixup(args),
                   view_colour=DeviceColour(args.device) if colour_on_device(args) else None)
