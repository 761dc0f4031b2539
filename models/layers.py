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
