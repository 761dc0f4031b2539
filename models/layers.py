"""Building blocks shared by several models."""
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_


def init_trunc_normal(module, layer_types=(nn.Linear,)):
    """The original's initialisation: weights of ``layer_types`` modules ~ truncated normal (std .02), zero
    biases; other modules keep their PyTorch defaults. ``model.apply(init_trunc_normal)`` for the ViT rule
    (Linear layers), ``model.apply(partial(init_trunc_normal, layer_types=(nn.Conv2d,)))`` for CvT's."""
    if isinstance(module, layer_types):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_n_last_blocks(n, depths, model_depths):
    """Validates the arguments of ``forward_return_n_last_blocks``: ``1 <= n <=`` the number of blocks, and
    ``depths`` (the original's stage-depth argument), when given, equal to the model's stage depths."""
    if depths and list(depths) != list(model_depths):
        raise ValueError(f"depths {list(depths)} do not match the model's depths {list(model_depths)}")
    if not 1 <= n <= sum(model_depths):
        raise ValueError(f"n={n} must be between 1 and the number of blocks {sum(model_depths)}")


def attention_probs(q, k, bias, scale):
    """softmax(q * scale @ k^T + bias) over the keys: the weights ``scaled_dot_product_attention(q, k, v,
    attn_mask=bias, scale=scale)`` applies to ``v``, computed step by step.

    q: ... x Tq x d, k: ... x Tk x d; bias: additive, broadcastable to the ... x Tq x Tk scores and of their
    dtype, or None. The bias is added in place (autograd keeps q and k, not the scores), so training does
    not hold a second Tq x Tk tensor.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores.add_(bias)
    return scores.softmax(dim=-1)


class WindowAttentionMaps(NamedTuple):
    """Attention probabilities of one window-attention block (Swin, CvT) and the window layout they refer to.

    ``probs[b * num_windows + w, head, query, key]`` with windows in row-major order over the padded map
    (``padded_hw``) after the cyclic shift by ``-shift_size``; tokens inside a window are row-major too.
    """
    probs: torch.Tensor  # (B*nW) x heads x T x T, T = window_size**2
    window_size: int
    shift_size: int
    hw: tuple  # feature map size (H, W) before padding
    padded_hw: tuple  # (Hp, Wp), multiples of window_size


class TokenAttentionMaps(NamedTuple):
    """Attention probabilities of one block over all its tokens (ViL).

    ``probs[b, head, query, key]``, tokens ordered as the block's input: the ``num_global`` global tokens, then
    the nx x ny map row-major; zero where a query does not attend (outside its neighbourhood chunks).
    """
    probs: torch.Tensor  # B x heads x N x N, N = num_global + nx*ny
    num_global: int
    hw: tuple  # (nx, ny)


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
