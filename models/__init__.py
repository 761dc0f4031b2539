"""Backbones, projection heads, the multi-crop wrapper and the EsViT losses."""
from .registry import ModelError, build_model, model_name_for_arch, register_model, registered_models
from .head import DINOHead
from .multicrop import MultiCropOutput, MultiCropWrapper
from .losses import DINOLoss, DDINOLoss
from .sync_batchnorm import convert_sync_batchnorm

# Importing a backbone module registers its builder.
from . import swin_transformer  # noqa: F401
from . import resnet  # noqa: F401
from . import cvt_transformer  # noqa: F401
from . import vision_longformer  # noqa: F401
