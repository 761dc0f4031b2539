"""Vision Transformer (ViT / DeiT) backbone of EsViT: ``--arch deit_tiny | deit_small | vit_base`` with
``--patch_size 16 | 8`` (``MODEL.NAME: vision_transformer``; the sizes are config/archs.py's).

Same parameters, keys and numerics as microsoft/esvit ``models/vision_transformer.py`` (DINO's ViT): a
``patch_size`` convolution embeds the image, a learned [CLS] token is prepended and a learned absolute position
embedding for the ``TRAIN.IMAGE_SIZE`` grid is added, then pre-norm blocks (timm's ``Block``: qkv bias, exact
GELU, every LayerNorm with eps 1e-6) and a final LayerNorm. ``forward_features`` returns the normed [CLS] token
(the input of the view head) and the normed patch tokens (the region tokens of the region loss, row-major).

At another resolution (local crops) the patch part of the position embedding is resized bicubically to the
token grid, without antialiasing, as the original: it passes the scale factor sqrt(N / N0), which gives the
same values as the output size passed here wherever its output has the right size; at grids where
floor(side0 x scale) falls one short (29, 45, 58 tokens a side) the original fails, this one does not, and
non-square inputs work too. The original's initialisation is kept (same random draws in the same order).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from .registry import ModelError, register_model
from .layers import TokenAttentionMaps, attention_probs, check_n_last_blocks, init_trunc_normal


def resize_position_embedding(pos_embed, grid, new_grid):
    """1 x (1 + h0*w0) x C embedding of a [CLS] token and an h0 x w0 grid (row-major) -> that of ``new_grid``:
    the [CLS] entry kept, the grid resized bicubically (align_corners False, no antialiasing)."""
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, *grid, -1).permute(0, 3, 1, 2)  # 1 x C x h0 x w0
    patch_pos = F.interpolate(patch_pos, size=tuple(new_grid), mode='bicubic', align_corners=False)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)


def block_attention_probs(block, x):
    """B x heads x N x N: the softmax(q k^T * scale) that ``block`` (a timm ``Block``) applies to its input x
    (B x N x C), computed step by step (the block itself uses fused SDPA, which gives no probabilities)."""
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # each B x heads x N x head_dim
    return attention_probs(attn.q_norm(q), attn.k_norm(k), None, attn.scale)


class VisionTransformer(nn.Module):
    """ViT backbone; ``forward_features`` gives (the normed [CLS] token, the normed patch tokens)."""

    flat_state_dict = True  # the original grew head/head_dense on this module itself (no "backbone." prefix)
    has_class_token = True  # its global token is a [CLS] token (timm's name; the analysis names its pictures so)

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.depths = [depth]  # one stage, for the stage-wise contract of n_last_blocks and the analysis
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, output_fmt='NHWC')
        self.grid = (img_size // patch_size, img_size // patch_size)  # the position embedding's token grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # stochastic depth decay rule, as the original (float32 linspace; cpu so that meta builds work)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(init_trunc_normal)

    def position_embedding(self, grid):
        """1 x (1 + h*w) x C for an h x w token grid (see the module's docstring)."""
        return resize_position_embedding(self.pos_embed, self.grid, grid)

    def _run_blocks(self, images, keep_last=0, with_attention=False):
        """B x 3 x H x W -> (tokens B x (1 + h*w) x C after the last block, before the final norm; (h, w); and
        for each of the last ``keep_last`` blocks its output tokens and, when asked, :class:`TokenAttentionMaps`)."""
        x = self.patch_embed(images)  # B x h x w x C
        grid = tuple(x.shape[1:3])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        x = self.pos_drop(x + self.position_embedding(grid))
        first_kept = len(self.blocks) - keep_last
        kept = []
        for i, block in enumerate(self.blocks):
            maps = None
            if with_attention and i >= first_kept:
                maps = TokenAttentionMaps(block_attention_probs(block, x), 1, grid)
            x = block(x)
            if i >= first_kept:
                kept.append((x, maps))
        return x, grid, kept

    def forward_features(self, images):
        """B x 3 x H x W -> ([CLS] B x C, patch tokens B x (H/p * W/p) x C), both after the final norm."""
        tokens, _, _ = self._run_blocks(images)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:]

    def forward(self, images):
        """The [CLS] feature B x C (class logits if the model was built with ``num_classes > 0``)."""
        return self.head(self.forward_features(images)[0])

    def forward_return_n_last_blocks(self, images, n=1, return_patch_avgpool=False, depths=()):
        """DINO's linear-probe feature: the [CLS] tokens after each of the last ``n`` blocks, each through the
        final norm, concatenated (B x n*C); ``return_patch_avgpool`` appends the mean of the last block's normed
        patch tokens (B x (n+1)*C). ``depths`` (the original passes [] for ViTs) must be [depth] when given."""
        check_n_last_blocks(n, depths, self.depths)
        tokens, _, kept = self._run_blocks(images, keep_last=n)
        features = [self.norm(x[:, 0]) for x, _ in kept]  # a LayerNorm normalises each token on its own
        if return_patch_avgpool:
            features.append(self.norm(tokens[:, 1:]).mean(dim=1))
        return torch.cat(features, dim=-1)

    def forward_attention_maps(self, images, n_last=1):
        """The attention probabilities of the last ``n_last`` blocks, each a :class:`TokenAttentionMaps` with
        ``probs`` B x heads x N x N over [CLS] then the h x w patch tokens (row-major) and ``num_global`` 1:
        ``probs[:, :, 0, 1:]`` is DINO's [CLS] attention map."""
        _, _, kept = self._run_blocks(images, keep_last=n_last, with_attention=True)
        return [maps for _, maps in kept]


@register_model('vision_transformer')
def build_vision_transformer(config, is_teacher=False):
    """ViT from ``config.MODEL.SPEC`` (position embedding for the ``TRAIN.IMAGE_SIZE`` grid); the teacher gets
    drop-path 0."""
    spec = config.MODEL.SPEC
    if spec.EMBED_DIM % spec.NUM_HEADS:
        raise ModelError(f"MODEL.SPEC.EMBED_DIM {spec.EMBED_DIM} must be a multiple of NUM_HEADS {spec.NUM_HEADS}")
    if config.TRAIN.IMAGE_SIZE[0] < spec.PATCH_SIZE:
        raise ModelError(f"TRAIN.IMAGE_SIZE {list(config.TRAIN.IMAGE_SIZE)} is smaller than one patch "
                         f"(MODEL.SPEC.PATCH_SIZE {spec.PATCH_SIZE})")
    return VisionTransformer(
        img_size=config.TRAIN.IMAGE_SIZE[0], patch_size=spec.PATCH_SIZE, in_chans=spec.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES, embed_dim=spec.EMBED_DIM, depth=spec.DEPTH, num_heads=spec.NUM_HEADS,
        mlp_ratio=spec.MLP_RATIO, qkv_bias=spec.QKV_BIAS, drop_rate=spec.DROP_RATE,
        attn_drop_rate=spec.ATTN_DROP_RATE, drop_path_rate=0.0 if is_teacher else spec.DROP_PATH_RATE)
