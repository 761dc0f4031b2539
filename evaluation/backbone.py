"""Frozen backbones for evaluation, built from the pretraining config and loaded from a checkpoint of any layout
that evaluation/checkpoints.py reads (this project's, the original's, DINO-style, a classifier's, bare, timm's or
torchvision's keys). The backbone must load completely: a missing, unexpected or misshaped key is a
:class:`utils.UserError` that lists them, never a silent partial load.

    backbone = build_frozen_backbone(config, pretrained_weights, checkpoint_key='teacher')
    load_pretrained_backbone(backbone, path, checkpoint_key='teacher')
"""
import sys

import torch.nn as nn

from models import build_model
from .checkpoints import load_backbone_weights


def load_pretrained_backbone(backbone, path, checkpoint_key='teacher'):
    """Load the backbone weights of the checkpoint file ``path`` into ``backbone`` (strictly) and say so."""
    print(f"Loaded the backbone from {load_backbone_weights(backbone, path, checkpoint_key)}")


def build_frozen_backbone(config, pretrained_weights='', checkpoint_key='teacher'):
    """The backbone of ``config`` (a classifier head replaced by the identity) with the checkpoint's weights,
    in eval mode and without gradients. No ``pretrained_weights``: random init, with a warning."""
    backbone = build_model(config, is_teacher=True)
    if isinstance(getattr(backbone, 'head', None), nn.Module):
        backbone.head = nn.Identity()  # MODEL.NUM_CLASSES > 0: the features are the classifier's input
    if pretrained_weights:
        load_pretrained_backbone(backbone, pretrained_weights, checkpoint_key)
    else:
        print("WARNING: no --pretrained_weights given: evaluating a randomly initialised backbone",
              file=sys.stderr)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone
