"""Frozen backbones for evaluation, built from the pretraining config and loaded from a checkpoint.

    backbone = build_frozen_backbone(config, pretrained_weights, checkpoint_key='teacher')
    load_pretrained_backbone(backbone, path, checkpoint_key='teacher')

Accepted files: this project's and the original's ``checkpoint.pth`` (``checkpoint[checkpoint_key]`` is the
multi-crop wrapper's state dict: ``module.`` prefixes, heads ``head.*`` / ``head_dense.*``, the ResNets'
backbone under ``backbone.``), DINO-style checkpoints whose backbone keys carry ``backbone.``, and a bare
backbone state dict. The backbone must load completely: a missing, unexpected or misshaped key is a
:class:`utils.UserError` that lists them, never a silent partial load.
"""
import sys

import torch
import torch.nn as nn

import utils
from models import build_model

HEAD_PREFIXES = ('head.', 'head_dense.')
WRAPPER_PREFIX = 'backbone.'


def checkpoint_entry(checkpoint, checkpoint_key, path):
    """The state dict stored under ``checkpoint_key``, or the file itself when it is a bare state dict."""
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise utils.UserError(f"checkpoint {path} holds no state dict")
    if checkpoint_key in checkpoint:
        state_dict = checkpoint[checkpoint_key]
    elif all(torch.is_tensor(v) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise utils.UserError(f"checkpoint {path} has no '{checkpoint_key}' entry (it has: "
                              f"{', '.join(map(str, checkpoint))}); pass --checkpoint_key")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise utils.UserError(f"checkpoint {path}: '{checkpoint_key}' is not a state dict of tensors")
    return state_dict


def backbone_state_dict(state_dict, backbone_keys):
    """The backbone's weights within a wrapper's state dict: ``module.`` removed, the projection heads
    dropped, then ``backbone.`` removed for as long as it hides the backbone's own keys (DINO's wrapper
    nests ``backbone.<keys>``; the original's ResNet wrapper ``backbone.backbone.<torchvision keys>``,
    where ``backbone.<torchvision keys>`` are already the ResNet backbone's own keys)."""
    state_dict = utils.strip_prefix(state_dict, ('module.',))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    while not backbone_keys.intersection(state_dict) and any(k.startswith(WRAPPER_PREFIX) for k in state_dict):
        state_dict = utils.strip_prefix(state_dict, (WRAPPER_PREFIX,))
    return state_dict


def load_pretrained_backbone(backbone, path, checkpoint_key='teacher'):
    """Load the backbone weights of the checkpoint file ``path`` into ``backbone`` (strictly)."""
    state_dict = checkpoint_entry(utils.load_checkpoint(path), checkpoint_key, path)
    weights = backbone_state_dict(state_dict, set(backbone.state_dict()))
    utils.load_state_dict_checked(backbone, weights, f"pretrained weights {path} ('{checkpoint_key}')")
    print(f"Loaded the backbone from {path} ('{checkpoint_key}', {len(weights)} tensors)")


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
