"""Swin Transformer backbone (shifted-window attention), as used by EsViT.

Same parameters, buffers and numerics as microsoft/esvit ``models/swin_transformer.py``, including its
behaviour at resolutions other than the construction one (e.g. 96 px local crops): each block zero-pads
the normalised feature map to a multiple of its window and does not mask the padded tokens; the shifted-
window mask (-100 between tokens of different regions) is built for the padded map; PatchMerging pads odd
maps. Window size and shift are fixed at construction: a stage whose construction resolution is not larger
than the window uses one window of that resolution and no shift.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, gen_relative_position_index, trunc_normal_

from .registry import ModelError, register_model
from .layers import WindowAttentionMaps, attention_probs, check_n_last_blocks, init_trunc_normal

SHIFT_MASK_VALUE = -100.0  # additive attention mask between tokens of different shifted-window regions


def window_partition(x, window_size):
    """B x Hp x Wp x C -> (B*nW) x (window_size**2) x C, windows row-major per image."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows, window_size, Hp, Wp):
    """(B*nW) x (window_size**2) x C -> B x Hp x Wp x C (inverse of :func:`window_partition`)."""
    C = windows.shape[-1]
    x = windows.view(-1, Hp // window_size, Wp // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)


def shifted_window_mask(Hp, Wp, window_size, shift_size, device):
    """nW x T x T additive mask: 0 within a region of the cyclically shifted map, -100 across regions."""
    def region_ids(length):  # 0: untouched, 1: last window minus shift, 2: wrapped-around shift
        ids = torch.zeros(length, dtype=torch.long, device=device)
        ids[length - window_size:] = 1
        ids[length - shift_size:] = 2
        return ids

    regions = region_ids(Hp)[:, None] * 3 + region_ids(Wp)[None, :]  # Hp x Wp
    window_regions = window_partition(regions[None, :, :, None], window_size).squeeze(-1)  # nW x T
    different = window_regions[:, None, :] != window_regions[:, :, None]  # nW x T x T
    return different.float() * SHIFT_MASK_VALUE


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # T x T index into the table (T = window_size**2): (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1)
        self.register_buffer('relative_position_index', gen_relative_position_index((window_size, window_size)))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def relative_position_bias(self):
        """heads x T x T."""
        T = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (T*T) x heads
        return bias.view(T, T, -1).permute(2, 0, 1)

    def forward(self, qkv, shift_mask=None, return_probs=False):
        """qkv: (B*nW) x T x 3C windows of ``self.qkv``'s output; shift_mask: nW x T x T or None.

        Returns the attended windows (B*nW) x T x C *before* the output projection ``self.proj`` (which the
        block applies to the unpadded tokens only) and, with ``return_probs``, the attention probabilities
        (B*nW) x heads x T x T.
        """
        BnW, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        # nW: number of distinct window masks (1 without shift). Windows are folded into the head axis so
        # that the bias broadcasts over the batch of a 4-D SDPA call (the layout its fused kernels accept).
        nW = 1 if shift_mask is None else shift_mask.shape[0]
        qkv = qkv.view(BnW // nW, nW, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).flatten(2, 3).unbind(0)  # each B x (nW*heads) x T x head_dim
        attn_bias = self.relative_position_bias()  # heads x T x T
        if shift_mask is not None:
            attn_bias = attn_bias + shift_mask.unsqueeze(1)  # nW x heads x T x T
        attn_bias = attn_bias.reshape(1, nW * self.num_heads, T, T).to(q.dtype)
        drop = self.attn_drop if self.training else 0.
        if return_probs or (torch.is_grad_enabled() and attn_bias.requires_grad):
            # explicit softmax: SDPA's fused CPU kernels give no gradient for the bias, and its math fallback
            # adds a guard against fully masked rows (which cannot occur here) on top of these same steps
            probs = attention_probs(q, k, attn_bias, self.scale)  # B x (nW*heads) x T x T
            out = F.dropout(probs, drop, self.training) @ v
            probs = probs.reshape(BnW, self.num_heads, T, T) if return_probs else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
            probs = None
        return out.unflatten(1, (nW, self.num_heads)).transpose(2, 3).reshape(BnW, T, C), probs  # (B*nW) x T x C


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, each pre-norm with a residual connection."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.,
                 qkv_bias=True, qk_scale=None, drop=0., attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm):
        super().__init__()
        if min(input_resolution) <= window_size:  # a single window covers the construction resolution
            window_size, shift_size = min(input_resolution), 0
        assert 0 <= shift_size < window_size, 'shift_size must be in [0, window_size)'
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self._shift_masks = {}  # (Hp, Wp, device) -> nW x T x T; a cache, not part of the state dict

    def shift_mask(self, Hp, Wp, device):
        key = (Hp, Wp, device)
        if key not in self._shift_masks:
            self._shift_masks[key] = shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, device)
        return self._shift_masks[key]

    def forward(self, x, hw, return_attention=False):
        """x: B x (H*W) x C with hw = (H, W). Returns (B x (H*W) x C, WindowAttentionMaps or None)."""
        H, W = hw
        B, _, C = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_h, pad_w = -H % ws, -W % ws
        if pad_h or pad_w:
            # The original zero-pads the normed map and projects every token; a zero token's q, k, v are the
            # qkv bias, so project only the real tokens and pad with the bias (same values, fewer FLOPs).
            qkv = F.pad(F.linear(x, self.attn.qkv.weight), (0, 0, 0, pad_w, 0, pad_h))  # B x Hp x Wp x 3C
            if self.attn.qkv.bias is not None:
                qkv.add_(self.attn.qkv.bias)
        else:
            qkv = self.attn.qkv(x)
        Hp, Wp = qkv.shape[1:3]
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        shift_mask = self.shift_mask(Hp, Wp, x.device) if shift else None
        windows, probs = self.attn(window_partition(qkv, ws), shift_mask, return_probs=return_attention)
        x = window_reverse(windows, ws, Hp, Wp)  # B x Hp x Wp x C
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W].reshape(B, H * W, C)
        x = self.attn.proj_drop(self.attn.proj(x))  # per token: the padded tokens' outputs are dropped unprojected
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        maps = WindowAttentionMaps(probs, ws, shift, (H, W), (Hp, Wp)) if return_attention else None
        return x, maps


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised, projected to 2C; odd maps are zero-padded."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, hw):
        """x: B x (H*W) x C -> (B x (ceil(H/2)*ceil(W/2)) x 2C, new hw)."""
        H, W = hw
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # B x H' x W' x C, H', W' even
        hw = (x.shape[1] // 2, x.shape[2] // 2)
        # channels ordered (0,0), (1,0), (0,1), (1,1) by (row, column) offset in the 2x2 group, as the original's
        # concatenation of x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]: one copy instead of five
        x = x.view(B, hw[0], 2, hw[1], 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, hw[0] * hw[1], 4 * C)
        x = self.reduction(self.norm(x))
        return x, hw


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then an optional PatchMerging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4., qkv_bias=True,
                 qk_scale=None, drop=0., attn_drop=0., drop_path=(), norm_layer=nn.LayerNorm, downsample=False):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size=window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, norm_layer=norm_layer) if downsample else None


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size convolution to embed_dim, then an optional norm."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, images):
        """B x 3 x H x W -> (B x (H/p * W/p) x C, (H/p, W/p))."""
        x = self.proj(images)  # B x C x H/p x W/p
        hw = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinTransformer(nn.Module):
    """Swin backbone; ``forward_features`` gives (mean of the normed last-stage tokens, those tokens)."""

    flat_state_dict = True  # the original grew head/head_dense on this module itself (no "backbone." prefix)

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=0, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., qkv_bias=True, qk_scale=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0.1, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 ape=False, patch_norm=True):
        super().__init__()
        self.depths = list(depths)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        patches_resolution = img_size // patch_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, patches_resolution ** 2, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth decay rule, as the original (float32 linspace; cpu so that meta builds work)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            resolution = patches_resolution // 2 ** i
            self.layers.append(BasicLayer(
                embed_dim * 2 ** i, (resolution, resolution), depth, heads, window_size, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                downsample=i < len(depths) - 1))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)

    def _run_blocks(self, images, keep_last=0, with_attention=False):
        """Runs the backbone. Returns the last-stage tokens B x N x C (before the final norm) and, for the
        last ``keep_last`` blocks (across stages, in order), ``(stage index, output tokens B x L x C,
        WindowAttentionMaps or None)``; attention maps are computed only for kept blocks when asked."""
        x, hw = self.patch_embed(images)  # B x L x C
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        first_kept = sum(self.depths) - keep_last
        kept = []
        block_index = 0
        for stage_index, stage in enumerate(self.layers):
            for block in stage.blocks:
                keep = block_index >= first_kept
                x, maps = block(x, hw, return_attention=with_attention and keep)
                if keep:
                    kept.append((stage_index, x, maps))
                block_index += 1
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)
        return x, kept

    def forward_features(self, images):
        """B x 3 x H x W -> (pooled B x C, region tokens B x N x C), N = ceil(H/32) * ceil(W/32) for p=4."""
        tokens, _ = self._run_blocks(images)
        region = self.norm(tokens)  # B x N x C
        return region.mean(dim=1), region

    def forward(self, images):
        """Pooled features B x C (class logits if the model was built with ``num_classes > 0``)."""
        return self.head(self.forward_features(images)[0])

    def forward_return_n_last_blocks(self, images, n=1, return_patch_avgpool=False, depths=()):
        """The eval_linear feature B x D: token means of the last ``n`` blocks across stages (block outputs
        before PatchMerging; the final norm applied to last-stage blocks only), concatenated, D = sum(C_i).

        ``return_patch_avgpool`` appends the mean of the normed last-stage tokens, ``forward_features(x)[1]
        .mean(1)`` (D + num_features), the analogue of the original ViT's patch-token mean (the original's Swin
        ignored the flag). Swin has no [CLS] token, so this repeats the last block's mean. ``depths`` is the
        original's stage-depth argument and must match the model when given.
        """
        check_n_last_blocks(n, depths, self.depths)
        tokens, kept = self._run_blocks(images, keep_last=n)
        last_stage = len(self.layers) - 1
        means = [(self.norm(x) if stage == last_stage else x).mean(dim=1) for stage, x, _ in kept]
        if return_patch_avgpool:
            means.append(self.norm(tokens).mean(dim=1))
        return torch.cat(means, dim=-1)

    def forward_return_n_last_block_tokens(self, images, n=1):
        """The output tokens of the last ``n`` blocks across stages, in block order: a list of B x L_i x C_i
        (row-major token grids; the final norm applied to last-stage blocks only, so the last one is
        ``forward_features(images)[1]``). The dense counterpart of :meth:`forward_return_n_last_blocks`."""
        check_n_last_blocks(n, (), self.depths)
        _, kept = self._run_blocks(images, keep_last=n)
        last_stage = len(self.layers) - 1
        return [self.norm(x) if stage == last_stage else x for stage, x, _ in kept]

    def forward_attention_maps(self, images, n_last=1):
        """Attention probabilities of the last ``n_last`` blocks (across stages, in block order), each a
        :class:`WindowAttentionMaps` with ``probs`` (B*nW) x heads x T x T, computed with an explicit softmax."""
        _, kept = self._run_blocks(images, keep_last=n_last, with_attention=True)
        return [maps for _, _, maps in kept]


@register_model('swin_transformer')
def build_swin_transformer(config, is_teacher=False):
    """Swin backbone from ``config.MODEL.SPEC``; the teacher gets drop-path 0."""
    spec = config.MODEL.SPEC
    if len(spec.DEPTHS) != len(spec.NUM_HEADS):
        raise ModelError(f"MODEL.SPEC.DEPTHS {list(spec.DEPTHS)} and NUM_HEADS {list(spec.NUM_HEADS)} must have one "
                         f"entry per stage")
    return SwinTransformer(
        img_size=config.TRAIN.IMAGE_SIZE[0], num_classes=config.MODEL.NUM_CLASSES, in_chans=spec.IN_CHANS,
        patch_size=spec.PATCH_SIZE, embed_dim=spec.DIM_EMBED, patch_norm=spec.PATCH_NORM, ape=spec.USE_APE,
        depths=spec.DEPTHS, num_heads=spec.NUM_HEADS, window_size=spec.WINDOW_SIZE, mlp_ratio=spec.MLP_RATIO,
        qkv_bias=spec.QKV_BIAS, qk_scale=spec.QK_SCALE, drop_rate=spec.DROP_RATE,
        attn_drop_rate=spec.ATTN_DROP_RATE, drop_path_rate=0.0 if is_teacher else spec.DROP_PATH_RATE)
