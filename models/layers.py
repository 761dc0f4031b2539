"""Building blocks shared by several models."""
import torch.nn as nn
from timm.layers import trunc_normal_


def init_linear_weights(module):
    """The ViT initialisation used by the original: Linear weights ~ truncated normal (std .02), zero biases.
    Use as ``model.apply(init_linear_weights)``; other modules keep their PyTorch defaults."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def attention_maps_of_last(model, attention_type, images, n_last):
    """``attention_maps(*inputs)`` of the last ``n_last`` modules of ``attention_type`` (in registration order,
    which is the order they run in), on the inputs they receive in ``model.forward_features(images)``."""
    modules = [m for m in model.modules() if isinstance(m, attention_type)][-n_last:]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append((module, args))) for m in modules]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [module.attention_maps(*args) for module, args in inputs]
