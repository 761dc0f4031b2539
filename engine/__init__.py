"""The training engine of EsViT pretraining.

    args     the options of main_esvit.py (``parse_args``, the demo's settings)
    build    student / teacher networks, loss, optimizer -> ``build_trainer``
    trainer  ``Trainer``: the step, the epoch, the checkpointed state
    losses   the view-level (DINO) and view + region-level (EsViT) losses
    optim    parameter groups, schedules, clipping, EMA, LARS
    precision  fp32 / bf16 / fp16 choice
    loop     ``train_esvit(args)``: the whole run
"""
from .args import DEMO_DEFAULTS, get_args_parser, parse_args
from .build import build_loss, build_student_teacher, build_trainer
from .loop import train_esvit
from .trainer import NonFiniteLoss, Stopped, Trainer

__all__ = ['DEMO_DEFAULTS', 'get_args_parser', 'parse_args', 'build_loss', 'build_student_teacher', 'build_trainer',
           'train_esvit', 'NonFiniteLoss', 'Stopped', 'Trainer']
