"""CvT-v4 backbone of EsViT (``MODEL.NAME: cvt_v4_transformer``).

Four stages; each embeds its input with a strided convolution, then runs pre-norm transformer
blocks on the B x C x H x W map. A block attends inside non-overlapping windows of
``min(WINDOW_SIZE, H, W)`` tokens a side; queries, keys and values come from one depth-wise 3x3
conv + BatchNorm + point-wise conv. Faithful to the original, including its quirks: attention is
scaled by the full embedding dim (not the head dim), the map is zero-padded to a multiple of the
window before the q/k/v convolution (padding tokens are attended to, unmasked), the FFN uses
QuickGELU, and LayerNorm runs in fp32.
"""
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, QuickGELU, gen_relative_position_index, trunc_normal_
from torch import nn

from .layers import (WindowAttentionMaps, attention_maps_of_last, attention_probs, check_n_last_blocks,
                     init_trunc_normal)
from .registry import ModelError, register_model


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim):
        super().__init__(dim, eps=1e-5)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def norm_channels(norm, x):
    """Applies a LayerNorm over the channels of a B x C x H x W map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class ConvEmbed(nn.Module):
    """Convolutional token embedding: strided conv, then LayerNorm over channels."""

    def __init__(self, in_chans, dim, patch_size, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return norm_channels(self.norm, self.proj(x))  # B x C x H' x W'


class ResStem(nn.Module):
    """Stage-0 embedding when ``RES_STEM``: three 3x3 conv-BN-ReLU layers (strides 2, 1, 2)."""

    def __init__(self, dim):
        super().__init__()
        layers = []
        for in_chans, stride in ((3, 2), (dim, 1), (dim, 2)):
            layers += [nn.Conv2d(in_chans, dim, kernel_size=3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*layers)

    def forward(self, x):
        return self.stem(x)  # B x C x H/4 x W/4


class DepthWiseConv2d(nn.Module):
    """The original's "dw_bn" projection: depth-wise conv (no bias), BatchNorm, point-wise conv."""

    def __init__(self, dim_in, dim_out, kernel_size, padding, bias):
        super().__init__()
        self.dw = nn.Conv2d(dim_in, dim_in, kernel_size, padding=padding, groups=dim_in, bias=False)
        self.bn = nn.BatchNorm2d(dim_in)
        self.pw = nn.Conv2d(dim_in, dim_out, kernel_size=1, bias=bias)

    def forward(self, x):
        return self.pw(self.bn(self.dw(x)))


class WindowAttention(nn.Module):
    """Multi-head attention inside non-overlapping windows of a B x C x H x W map."""

    def __init__(self, dim, num_heads, qkv_bias, kernel_size, padding, window_size, rel_pos_embed):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = dim ** -0.5  # the original scales by the full embedding dim
        self.qkv = DepthWiseConv2d(dim, 3 * dim, kernel_size, padding=padding, bias=qkv_bias)
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)
        self.rel_pos_embed = rel_pos_embed
        if rel_pos_embed:
            # window² x window² index into the (2 window - 1)² table, Swin's layout
            self.register_buffer('rel_pos_idx', gen_relative_position_index((window_size, window_size)))
            self.rel_pos_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            trunc_normal_(self.rel_pos_bias_table, std=.02)
        self._bias_index_cache = {}

    def bias_index(self, window):
        """window² x window² table index for a window of ``window`` <= window_size tokens a side.

        The original only handles window == window_size (it fails on smaller maps); a smaller
        window takes the same table entries for the same relative offsets.
        """
        key = (window, self.rel_pos_idx.device)
        if key not in self._bias_index_cache:
            rows = torch.arange(window, device=self.rel_pos_idx.device)
            tokens = (rows[:, None] * self.window_size + rows[None, :]).flatten()  # window²
            self._bias_index_cache[key] = self.rel_pos_idx[tokens][:, tokens]
        return self._bias_index_cache[key]

    def windowed_qkv(self, x):
        """B x C x H x W -> q, k, v (each B*nW x heads x window² x head_dim; windows row-major over the map
        zero-padded to a multiple of the window), the heads x window² x window² bias or None, and the window."""
        _, _, height, width = x.shape
        window = min(self.window_size, height, width)
        pad_bottom, pad_right = -height % window, -width % window
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        q, k, v = (map_to_windows(t, self.num_heads, window) for t in self.qkv(x).chunk(3, dim=1))
        bias = None
        if self.rel_pos_embed:
            bias = self.rel_pos_bias_table[self.bias_index(window)].permute(2, 0, 1).to(q.dtype)  # heads x N x N
        return q, k, v, bias, window

    def forward(self, x):
        batch, _, height, width = x.shape
        q, k, v, bias, window = self.windowed_qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = windows_to_map(out, batch, -(-height // window) * window, -(-width // window) * window)
        return self.proj_out(out[:, :, :height, :width])  # B x C x H x W

    def attention_maps(self, x):
        """The attention probabilities of :meth:`forward` on ``x`` (B x C x H x W), with an explicit softmax:
        a :class:`WindowAttentionMaps` without shift (padded tokens are unmasked keys, as in forward)."""
        _, _, height, width = x.shape
        q, k, _, bias, window = self.windowed_qkv(x)
        probs = attention_probs(q, k, bias, self.scale)  # B*nW x heads x window² x window²
        padded_hw = (-(-height // window) * window, -(-width // window) * window)
        return WindowAttentionMaps(probs, window, 0, (height, width), padded_hw)


def map_to_windows(x, heads, window):
    """B x (heads*d) x Hp x Wp -> (B*nWx*nWy) x heads x window² x d: windows row-major per image, tokens
    row-major inside a window."""
    B, C, Hp, Wp = x.shape
    x = x.view(B, heads, C // heads, Hp // window, window, Wp // window, window)
    return x.permute(0, 3, 5, 1, 4, 6, 2).reshape(-1, heads, window * window, C // heads)


def windows_to_map(x, batch, Hp, Wp):
    """The inverse of :func:`map_to_windows`: (B*nW) x heads x window² x d -> B x (heads*d) x Hp x Wp."""
    _, heads, tokens, d = x.shape
    window = round(tokens ** 0.5)
    x = x.view(batch, Hp // window, Wp // window, heads, window, window, d)
    return x.permute(0, 3, 6, 1, 4, 2, 5).reshape(batch, heads * d, Hp, Wp)


class FeedForward(nn.Module):
    """1x1-conv MLP with QuickGELU."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 1), QuickGELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x):
        return self.net(x)


class PreNorm(nn.Module):
    """``fn`` applied to the channel-LayerNormed map."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(norm_channels(self.norm, x))


class Block(nn.ModuleList):
    """``[PreNorm(attention), PreNorm(feed-forward), DropPath]`` (the original's layout of keys)."""

    def __init__(self, dim, attention, feed_forward, drop_path):
        super().__init__([PreNorm(dim, attention), PreNorm(dim, feed_forward), DropPath(drop_path)])

    def forward(self, x):
        attention, feed_forward, drop_path = self
        x = x + drop_path(attention(x))
        return x + drop_path(feed_forward(x))


class Transformer(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        """The output map of every block, B x C x H x W each."""
        outputs = []
        for block in self.layers:
            x = block(x)
            outputs.append(x)
        return outputs


@dataclass
class StageSpec:
    dim: int
    depth: int
    num_heads: int
    patch_size: int
    patch_stride: int
    patch_padding: int
    window_size: int
    mlp_ratio: float
    qkv_bias: bool
    kernel_qkv: int
    padding_qkv: int


class CvT(nn.Module):
    """Attributes ``stage0``..``stageN`` (each ``[embedding, Transformer]``) and the final ``norm``."""

    def __init__(self, stages, rel_pos_embed=False, res_stem=False, drop_path_rate=0.1):
        super().__init__()
        self.num_stages = len(stages)
        self.depths = [stage.depth for stage in stages]
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        in_chans = 3
        for i, stage in enumerate(stages):
            if i == 0 and res_stem:
                embed = ResStem(stage.dim)
            else:
                embed = ConvEmbed(in_chans, stage.dim, stage.patch_size, stage.patch_stride, stage.patch_padding)
            blocks = [Block(stage.dim,
                            WindowAttention(stage.dim, stage.num_heads, stage.qkv_bias, stage.kernel_qkv,
                                            stage.padding_qkv, stage.window_size, rel_pos_embed),
                            FeedForward(stage.dim, stage.mlp_ratio),
                            drop_path_rates.pop(0))
                      for _ in range(stage.depth)]
            setattr(self, f'stage{i}', nn.Sequential(embed, Transformer(blocks)))
            in_chans = stage.dim
        self.num_features = in_chans
        self.norm = LayerNorm(in_chans)
        self.apply(partial(init_trunc_normal, layer_types=(nn.Conv2d,)))  # norms keep their 1 / 0 defaults

    def block_outputs(self, x):
        """Per stage, the list of its blocks' output maps (B x C_i x H_i x W_i)."""
        per_stage = []
        for i in range(self.num_stages):
            embed, transformer = getattr(self, f'stage{i}')
            outputs = transformer(embed(x))
            per_stage.append(outputs)
            x = outputs[-1]
        return per_stage

    def region_tokens(self, block_map):
        """Last-stage map B x C x H x W -> normed tokens B x H*W x C."""
        return self.norm(block_map.flatten(2).transpose(1, 2))

    def forward_features(self, x):
        region_tokens = self.region_tokens(self.block_outputs(x)[-1][-1])  # B x N x C
        return region_tokens.mean(dim=1), region_tokens

    def forward_return_n_last_blocks(self, x, n=1, return_patch_avgpool=False, depths=()):
        """The eval_linear feature B x D: average-pooled outputs of the last ``n`` blocks across stages (blocks
        of the last stage normed first), concatenated, D = sum(C_i).

        ``return_patch_avgpool`` appends the mean of the normed last-stage tokens, ``forward_features(x)[1]
        .mean(1)`` (D + num_features; the original ignored the flag). ``depths``, when given, must be the
        model's depths.
        """
        check_n_last_blocks(n, depths, self.depths)
        last_stage = self.num_stages - 1
        per_stage = self.block_outputs(x)
        blocks = [(i, output) for i, outputs in enumerate(per_stage) for output in outputs]
        pooled = [self.region_tokens(output).mean(dim=1) if i == last_stage else output.mean(dim=(2, 3))
                  for i, output in blocks[-n:]]  # each B x C_i
        if return_patch_avgpool:
            pooled.append(self.region_tokens(per_stage[-1][-1]).mean(dim=1))
        return torch.cat(pooled, dim=-1)

    def forward(self, x):
        return self.forward_features(x)[0]

    def forward_attention_maps(self, images, n_last=1):
        """Attention probabilities of the last ``n_last`` blocks (across stages, in block order), each a
        :class:`~models.layers.WindowAttentionMaps` with ``probs`` (B*nW) x heads x T x T."""
        return attention_maps_of_last(self, WindowAttention, images, n_last)


def stage_specs(spec):
    """The per-stage settings of a ``MODEL.SPEC`` node (its per-stage lists, one entry per stage)."""
    if any(spec.SHIFT):
        raise ModelError("MODEL.SPEC.SHIFT True is not supported: the original cvt_v4 code never shifts windows "
                         "(it only adds a SW-MSA mask, and fails on maps smaller than the window)")
    per_stage = dict(dim=spec.DIM_EMBED, depth=spec.DEPTH, num_heads=spec.NUM_HEADS, patch_size=spec.PATCH_SIZE,
                     patch_stride=spec.PATCH_STRIDE, patch_padding=spec.PATCH_PADDING,
                     window_size=spec.WINDOW_SIZE, mlp_ratio=spec.MLP_RATIO, qkv_bias=spec.QKV_BIAS,
                     kernel_qkv=spec.KERNEL_QKV, padding_qkv=spec.PADDING_QKV)
    wrong = [key for key, values in dict(per_stage, shift=spec.SHIFT).items() if len(values) != spec.NUM_STAGES]
    if wrong:
        raise ModelError(f"MODEL.SPEC lists {wrong} must have NUM_STAGES={spec.NUM_STAGES} entries")
    return [StageSpec(**dict(zip(per_stage, values))) for values in zip(*per_stage.values())]


@register_model('cvt_v4_transformer')
def build_cvt(config, is_teacher=False):
    """CvT-v4 from ``config.MODEL.SPEC``; the teacher gets drop-path 0."""
    spec = config.MODEL.SPEC
    if spec.INIT != 'trunc_norm':
        raise ModelError(f"MODEL.SPEC.INIT {spec.INIT!r}: the original always initialises CvT with 'trunc_norm'")
    return CvT(stage_specs(spec), rel_pos_embed=spec.REL_POS_EMBED, res_stem=spec.RES_STEM,
               drop_path_rate=0.0 if is_teacher else spec.DROP_PATH_RATE)
