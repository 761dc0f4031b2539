"""Backbones (one file each, registered by MODEL.NAME), the DINO projection head and the multi-crop wrapper.
A leaf package: it imports torch, timm and torchvision, nothing of the rest of the project."""
from .registry import ModelError, build_model, register_model, registered_models
from .head import DINOHead
from .multicrop import MultiCropOutput, MultiCropWrapper
from .sync_batchnorm import convert_sync_batchnorm

# Importing a backbone module registers its builder.
from . import swin_transformer  # noqa: F401
from . import resnet  # noqa: F401
from . import cvt_transformer  # noqa: F401
from . import vision_longformer  # noqa: F401
from . import vision_transformer  # noqa: F401

__all__ = ['ModelError', 'build_model', 'register_model', 'registered_models', 'DINOHead', 'MultiCropOutput',
           'MultiCropWrapper', 'convert_sync_batchnorm']
