"""This project's backbones in other libraries' layouts: timm's Swin Transformer, timm's and torchvision's ResNets.
Architecture knowledge only (which keys move where, which constructor call builds the same network); the files
are read in evaluation/checkpoints.py and written by scripts/export_backbone.py.

    library_formats(config)                    # ('timm',) for a Swin, ('timm', 'torchvision') for a ResNet
    twin = build_twin(config, 'timm')          # the library's network of config's backbone (random init)
    print(twin_call(config, 'timm'))           # the same call as Python source, for the user
    theirs = to_library(config, own_state_dict, 'timm')
    for layout, ours in from_library(theirs): ...   # candidate readings of a library's file in this project's keys

Swin: timm >= 0.9 puts each PatchMerging at the start of the next stage (``layers.{i+1}.downsample``; this
project and the original: at the end of stage i, ``layers.{i}.downsample``), keeps ``relative_position_index``
and ``attn_mask`` as non-persistent buffers and names the classifier ``head.fc``. EsViT's LayerNorms have eps
1e-6 (timm's default: 1e-5, which moves the pooled features by ~1e-5 relative), so the twin passes it.
ResNets: torchvision's keys, which timm's ResNets share; this project nests them under ``backbone.`` and has
no ``fc``.
"""
import re
from functools import partial

import timm
import torch.nn as nn
import torchvision

from .registry import ModelError
from .resnet import RESNET_ARCHS

# timm's Swin names by (embed_dim, depths); the heads follow from the width
TIMM_SWIN_SIZES = {(96, (2, 2, 6, 2)): 'tiny', (96, (2, 2, 18, 2)): 'small', (128, (2, 2, 18, 2)): 'base',
                   (192, (2, 2, 18, 2)): 'large'}
SWIN_LAYER_NORM_EPS = 1e-6
BUFFERS_REBUILT_BY_THE_MODEL = ('relative_position_index', 'attn_mask')  # functions of the window size


def library_formats(config):
    """The libraries whose models can hold the weights of ``config``'s backbone."""
    if config.MODEL.NAME == 'swin_transformer':
        return ('timm',)
    if config.MODEL.NAME in RESNET_ARCHS:
        return ('timm', 'torchvision')
    return ()


def _check_format(config, fmt):
    if fmt not in library_formats(config):
        raise ModelError(f"a {config.MODEL.NAME} backbone has no {fmt} twin (export it with --format state_dict; "
                         f"{', '.join(library_formats(config)) or 'no library format'} available)")


def _swin_twin_args(config):
    """(timm model name, constructor keyword arguments other than the norm layer) of ``config``'s Swin."""
    spec = config.MODEL.SPEC
    unsupported = [name for name, bad in (('MODEL.SPEC.USE_APE True', spec.USE_APE),
                                          ('MODEL.SPEC.PATCH_NORM False', not spec.PATCH_NORM),
                                          ('MODEL.SPEC.QK_SCALE', spec.QK_SCALE is not None)) if bad]
    if unsupported:
        raise ModelError(f"timm's Swin has no equivalent of {', '.join(unsupported)}: use --format state_dict")
    depths, heads = tuple(spec.DEPTHS), tuple(spec.NUM_HEADS)
    size = TIMM_SWIN_SIZES.get((spec.DIM_EMBED, depths))
    kwargs = {'num_classes': config.MODEL.NUM_CLASSES}
    if size is None or heads != tuple(spec.DIM_EMBED // 32 * 2 ** i for i in range(len(depths))):
        kwargs.update(embed_dim=spec.DIM_EMBED, depths=depths, num_heads=heads)
        size = 'tiny'
    for key, value, default in (('img_size', config.TRAIN.IMAGE_SIZE[0], 224), ('patch_size', spec.PATCH_SIZE, 4),
                                ('window_size', spec.WINDOW_SIZE, 7), ('mlp_ratio', spec.MLP_RATIO, 4.),
                                ('in_chans', spec.IN_CHANS, 3), ('qkv_bias', spec.QKV_BIAS, True)):
        if value != default:
            kwargs[key] = value
    return f'swin_{size}_patch4_window7_224', kwargs


def twin_call(config, fmt):
    """Python source that builds the library's network of ``config``'s backbone (random weights)."""
    _check_format(config, fmt)
    if config.MODEL.NAME == 'swin_transformer':
        name, kwargs = _swin_twin_args(config)
        args = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
        return (f"timm.create_model({name!r}{args}, norm_layer=partial(torch.nn.LayerNorm, "
                f"eps={SWIN_LAYER_NORM_EPS}))")
    if fmt == 'timm':
        return f"timm.create_model({config.MODEL.NAME!r}, num_classes=0)"
    return f"torchvision.models.{config.MODEL.NAME}(); model.fc = torch.nn.Identity()"


def build_twin(config, fmt):
    """The library's network of ``config``'s backbone, as :func:`twin_call` says (a ResNet without ``fc``)."""
    _check_format(config, fmt)
    if config.MODEL.NAME == 'swin_transformer':
        name, kwargs = _swin_twin_args(config)
        return timm.create_model(name, norm_layer=partial(nn.LayerNorm, eps=SWIN_LAYER_NORM_EPS), **kwargs)
    if fmt == 'timm':
        return timm.create_model(config.MODEL.NAME, num_classes=0)
    model = getattr(torchvision.models, config.MODEL.NAME)(weights=None)
    model.fc = nn.Identity()
    return model


def to_library(config, state_dict, fmt):
    """This project's backbone state dict of ``config`` in the library's keys."""
    _check_format(config, fmt)
    if config.MODEL.NAME == 'swin_transformer':
        out = {}
        for key, value in state_dict.items():
            if key.endswith(BUFFERS_REBUILT_BY_THE_MODEL):
                continue
            key = re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)
            out[re.sub(r'^head\.', 'head.fc.', key)] = value
        return out
    return {k[len('backbone.'):]: v for k, v in state_dict.items()}  # ResNet: torchvision's keys, no fc


def from_library(state_dict):
    """[(library, state dict in this project's backbone keys)] for each library layout ``state_dict`` may be in;
    the caller keeps the reading whose keys are its backbone's. Buffers that the model rebuilds
    (:data:`BUFFERS_REBUILT_BY_THE_MODEL`) are the caller's to drop or fill."""
    readings = []
    swin = any(re.match(r'layers\.\d+\.blocks\.\d+\.attn\.qkv\.', k) for k in state_dict)
    if swin and not any(k.startswith('layers.0.downsample.') for k in state_dict):  # timm >= 0.9
        shift = partial(re.sub, r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) - 1}.downsample.')
        readings.append(('timm', {re.sub(r'^head\.fc\.', 'head.', shift(k)): v for k, v in state_dict.items()}))
    if 'layer1.0.conv1.weight' in state_dict:  # torchvision's (and timm's) ResNet keys
        readings.append(('torchvision', {f'backbone.{k}': v for k, v in state_dict.items()
                                         if not k.startswith('fc.')}))
    return readings
