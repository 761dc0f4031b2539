"""Multi-scale Vision Longformer (ViL / MsViT) backbone of EsViT (``MODEL.NAME: vision_longformer``).

``MODEL.SPEC.MSVIT.ARCH`` describes the stages, separated by ``_``; each stage is a comma list of
letter + integer (defaults in :data:`ARCH_DEFAULTS`):

    l stage id (1, 2, ...)   h heads          d width          n blocks (attention + MLP pairs)
    s 1: Vision Longformer attention, 0: full attention      g global tokens
    p patch size of the stage's embedding   f window W of the longformer attention
    a 1: absolute position embedding, 0: relative position bias        r pooled keys (unsupported)

e.g. vil_2262 is ``l1,h3,d96,n2,s1,g1,p4,f7,a0_l2,h6,d192,n2,s1,g1,p2,f7,a0_l3,...``. A stage embeds its
input with a ``p x p`` convolution (+ LayerNorm with ``NORM_EMBED``), prepends ``g`` learned global tokens
and runs ``n`` pre-norm (attention, MLP) block pairs; the global tokens are dropped between stages.

Vision Longformer attention (the original ``Long2DSCSelfAttention`` with ``SW_EXACT 0``): the map is cut
into W x W chunks (zero-padded to a multiple of W); a local token attends to the global tokens and to the
tokens of its chunk and of the 8 neighbouring chunks (chunks outside the map and padded tokens are masked);
a global token attends to everything. ``MSVIT.MODE`` picks the neighbour chunks: 0 all 8, -1 none, > 0 one
random neighbour per forward of each attention in training (Python ``random``, as the original) and all 8
in eval. :meth:`MsViT.set_attention_mode` switches the mode (the trainer switches to 0 after
``VIL_MODE_SWITCH`` of the epochs). Here it is computed with one gather of the neighbourhood keys per chunk
and :func:`~torch.nn.functional.scaled_dot_product_attention` with an additive bias + mask.

Faithful to the original (same state_dict, numerics within float rounding), including its quirks: with
``SHARE_W`` the ``*_global`` projections are the local modules themselves (aliased state_dict keys); once a
stage uses full attention every later stage does too; the full-attention relative position bias is built
for the ``TRAIN.IMAGE_SIZE`` grid and, at other resolutions, bicubically resized as an (N x N) image; the
absolute position embedding is resized whenever the token count *including the global tokens* differs
from the construction grid; the pooled output of a stage with global tokens is its first token and its
"region" tokens all the others. One difference: every LayerNorm uses ``MSVIT.LN_EPS`` (the original parses it
but builds all its LayerNorms with 1e-6, the value every yaml sets). Not implemented (errors): ``SW_EXACT``
other than 0, ``WITH_SE``, pooled keys (``r``) and the Linformer/Performer/SRformer ``ATTN_TYPE``s.
"""
import math
import random
from functools import lru_cache, partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, gen_relative_position_index, trunc_normal_

from .registry import ModelError, register_model
from .layers import (TokenAttentionMaps, attention_maps_of_last, attention_probs, check_n_last_blocks,
                     init_trunc_normal)

ARCH_DEFAULTS = {'l': 1, 'h': 3, 'd': 192, 'n': 1, 's': 1, 'g': 1, 'p': 2, 'f': 7, 'a': 1, 'r': 0}
LONGFORMER_ATTN_TYPES = ('longformerhand', 'longformerauto')  # same maths (hand-written vs autograd backward)
SUPPORTED_ATTN_TYPES = LONGFORMER_ATTN_TYPES + ('full',)
ALL_NEIGHBOURS = tuple(range(9))  # chunk (dm, dn) in {-1, 0, 1}^2 is neighbour 3 * (dm + 1) + (dn + 1)
OWN_CHUNK = 4


def parse_arch(arch):
    """``MSVIT.ARCH`` -> one dict per stage with the keys of :data:`ARCH_DEFAULTS`."""
    stages = []
    for stage_id, stage in enumerate(arch.split('_'), start=1):
        cfg = dict(ARCH_DEFAULTS)
        for field in stage.split(','):
            if field[:1] not in ARCH_DEFAULTS or not field[1:].isdigit():
                raise ModelError(f"MSVIT.ARCH {arch!r}: bad field {field!r} (expected one of "
                                 f"{''.join(ARCH_DEFAULTS)} followed by an integer)")
            cfg[field[0]] = int(field[1:])
        if cfg['l'] != stage_id:
            raise ModelError(f"MSVIT.ARCH {arch!r}: stage {stage_id} is labelled l{cfg['l']}")
        if cfg['r']:
            raise ModelError(f"MSVIT.ARCH {arch!r}: pooled keys (r{cfg['r']}) are not supported")
        stages.append(cfg)
    return stages


def sliding_chunk_relative_position_index(window):
    """W^2 x 9W^2 index into a (4W-1)^2 table: offsets from the tokens of a chunk to those of its 9
    neighbourhood chunks (neighbour-major as :data:`ALL_NEIGHBOURS`, tokens row-major)."""
    W = window
    query = torch.stack(torch.meshgrid(torch.arange(W), torch.arange(W), indexing='ij')).flatten(1)  # 2 x W2
    chunk_offsets = torch.stack(torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing='ij')).flatten(1)
    keys = (query[:, None, :] + W * chunk_offsets[:, :, None]).flatten(1)  # 2 x 9W2
    relative = query[:, :, None] - keys[:, None, :] + (2 * W - 1)  # 2 x W2 x 9W2, in [0, 4W-2]
    return relative[0] * (4 * W - 1) + relative[1]


class ChunkLayout(NamedTuple):
    """Token indices of the sliding-chunk attention for one map size (see :func:`sliding_chunk_layout`)."""
    num_chunks: int
    query_index: torch.Tensor   # (nC*W2,) into the local queries + 1 zero token
    key_index: torch.Tensor     # (nC*S,) into all tokens + 1 zero token, S = G + len(neighbours)*W2
    key_mask: torch.Tensor      # nC x S additive: 0 or -inf (neighbour chunk outside the map, padding)
    output_index: torch.Tensor  # (nx*ny,) map token -> row of the chunked output (nC*W2)


@lru_cache(maxsize=64)
def sliding_chunk_layout(nx, ny, window, neighbours, num_global, device):
    """Where the queries and keys of every W x W chunk come from.

    Queries are gathered from the nx*ny local tokens followed by one zero token (index nx*ny, used for
    the padding up to a multiple of W); keys/values from the G global tokens, the local tokens and one
    zero token (index G+nx*ny, for padding and for neighbour chunks outside the map; those keys are
    masked). Chunks are row-major over the padded map, tokens row-major inside a chunk.
    """
    W = window
    mx, my = -(-nx // W), -(-ny // W)
    num_chunks = mx * my

    def map_index(rows, cols, first, zero):  # map coordinates -> source index (zero token outside the map)
        inside = (rows >= 0) & (rows < nx) & (cols >= 0) & (cols < ny)
        return torch.where(inside, first + rows * ny + cols, zero), inside

    chunk_rows = torch.arange(mx).view(mx, 1, 1, 1, 1)
    chunk_cols = torch.arange(my).view(1, my, 1, 1, 1)
    offsets = torch.tensor([(n // 3 - 1, n % 3 - 1) for n in neighbours])  # nnb x 2 chunk offsets
    token_rows = torch.arange(W).view(1, 1, 1, W, 1)
    token_cols = torch.arange(W).view(1, 1, 1, 1, W)

    query_index, _ = map_index(chunk_rows * W + token_rows, chunk_cols * W + token_cols, 0, nx * ny)
    local_keys, inside = map_index((chunk_rows + offsets[:, 0].view(1, 1, -1, 1, 1)) * W + token_rows,
                                   (chunk_cols + offsets[:, 1].view(1, 1, -1, 1, 1)) * W + token_cols,
                                   num_global, num_global + nx * ny)  # mx x my x nnb x W x W
    global_keys = torch.arange(num_global).expand(num_chunks, num_global)
    key_index = torch.cat([global_keys, local_keys.reshape(num_chunks, -1)], dim=1)  # nC x S
    key_valid = torch.cat([torch.ones_like(global_keys, dtype=torch.bool), inside.reshape(num_chunks, -1)], dim=1)
    key_mask = torch.zeros(key_valid.shape).masked_fill_(~key_valid, float('-inf'))

    rows, cols = torch.meshgrid(torch.arange(nx), torch.arange(ny), indexing='ij')
    output_index = ((rows // W) * my + cols // W) * W * W + (rows % W) * W + cols % W
    return ChunkLayout(num_chunks, query_index.flatten().to(device), key_index.flatten().to(device),
                       key_mask.to(device), output_index.flatten().to(device))


def gather_tokens(tokens, index, num_heads):
    """B x T x C (plus one appended zero token) -> B x heads x len(index) x C/heads, rows picked by index."""
    B, T, C = tokens.shape
    tokens = torch.cat([tokens, tokens.new_zeros(B, 1, C)], dim=1)
    tokens = tokens.view(B, T + 1, num_heads, C // num_heads).transpose(1, 2)  # B x heads x (T+1) x hd
    return tokens.index_select(2, index)


class ViLAttention(nn.Module):
    """What ViL's two attentions share: heads, scale, G global tokens, the output dropout and, with ``rpe``, the
    learned position biases under the original's keys: ``local_relative_position_bias_table`` (table_size x
    heads, read through the subclass's ``relative_position_index``) and, with global tokens,
    ``g2l_relative_position_bias`` (2 x heads x G; [0]: global queries -> local keys, [1]: local queries ->
    global keys) and ``g2g_relative_position_bias`` (heads x G x G)."""

    def __init__(self, dim, num_heads, num_global, rpe, table_size, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.num_global = num_global
        self.rpe = rpe
        if rpe:
            self.local_relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
            trunc_normal_(self.local_relative_position_bias_table, std=.02)
            if num_global:
                self.g2l_relative_position_bias = nn.Parameter(torch.zeros(2, num_heads, num_global))
                self.g2g_relative_position_bias = nn.Parameter(torch.zeros(num_heads, num_global, num_global))
                trunc_normal_(self.g2l_relative_position_bias, std=.02)
                trunc_normal_(self.g2g_relative_position_bias, std=.02)
        self.proj_drop = nn.Dropout(proj_drop)

    def global_query_bias(self, num_local):
        """H x G x (G + num_local): the position bias of the global queries over the [global, local] keys."""
        to_local = self.g2l_relative_position_bias[0][:, :, None].expand(-1, -1, num_local)
        return torch.cat([self.g2g_relative_position_bias, to_local], dim=-1)

    def local_query_global_bias(self, num_queries):
        """H x num_queries x G: the position bias of local queries over the global keys."""
        return self.g2l_relative_position_bias[1][:, None, :].expand(-1, num_queries, -1)


class LongformerAttention(ViLAttention):
    """Vision Longformer attention: global tokens attend to all tokens, local tokens to the global tokens
    and to their neighbourhood of W x W chunks (the original ``Long2DSCSelfAttention``, ``SW_EXACT 0``)."""

    def __init__(self, dim, num_heads, window, num_global, share_weights, rpe, mode=0, only_global=False,
                 proj_drop=0.):
        if only_global and num_global < 1:
            raise ModelError('MSVIT.ONLY_GLOBAL needs global tokens (g >= 1) in every longformer stage')
        super().__init__(dim, num_heads, num_global, rpe, (4 * window - 1) ** 2, proj_drop)
        self.window = window
        self.only_global = only_global
        self.mode = mode
        if rpe:
            self.register_buffer('relative_position_index', sliding_chunk_relative_position_index(window))
        self.query = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if num_global:
            self.query_global = self.query if share_weights else nn.Linear(dim, dim)
            self.kv_global = self.kv if share_weights else nn.Linear(dim, 2 * dim)
            self.proj_global = self.proj if share_weights else nn.Linear(dim, dim)

    def neighbours(self):
        """Neighbour chunks attended in this forward (:data:`ALL_NEIGHBOURS` numbering), own chunk first."""
        if self.mode > 0:
            if not self.training:
                return ALL_NEIGHBOURS
            draw = random.randrange(1, 9)  # the original's draw: 1..8 -> neighbours 0-3, 5-8
            return OWN_CHUNK, draw if draw > OWN_CHUNK else draw - 1
        return ALL_NEIGHBOURS if self.mode == 0 else (OWN_CHUNK,)

    def forward(self, x, hw):
        """x: B x (G + nx*ny) x C, hw = (nx, ny) -> B x (G + nx*ny) x C."""
        G = self.num_global
        kv = self.kv(x)  # B x N x 2C
        out = self.proj(self.local_attention(self.query(x[:, G:]), kv, hw))
        if G:
            kv_global = kv if self.kv_global is self.kv else self.kv_global(x)
            out_global = self.proj_global(self.global_attention(self.query_global(x[:, :G]), kv_global))
            out = torch.cat([out_global, out], dim=1)
        return self.proj_drop(out)

    def global_qkv(self, query, kv):
        """query: B x G x C, kv: B x N x 2C -> q B x H x G x hd, k, v B x H x N x hd, bias 1 x H x G x N or None."""
        B, G, C = query.shape
        H = self.num_heads
        q = query.view(B, G, H, C // H).transpose(1, 2)
        k, v = kv.view(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.global_query_bias(k.shape[2] - G)[None].to(q.dtype) if self.rpe else None
        return q, k, v, bias

    def global_attention(self, query, kv):
        """query: B x G x C, kv: B x N x 2C -> B x G x C (full attention over all N tokens)."""
        B, G, C = query.shape
        q, k, v, bias = self.global_qkv(query, kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(B, G, C)

    def local_attention(self, query, kv, hw):
        """query: B x L x C (L = nx*ny local tokens), kv: B x (G + L) x 2C -> B x L x C."""
        B, L, C = query.shape
        H, G = self.num_heads, self.num_global
        k_all, v_all = kv.chunk(2, dim=-1)
        if self.only_global:
            q = query.view(B, L, H, C // H).transpose(1, 2)
            k, v = (t[:, :G].reshape(B, G, H, C // H).transpose(1, 2) for t in (k_all, v_all))
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, L, C)

        q, k, v, mask, layout = self.chunked_qkv(query, k_all, v_all, hw)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.reshape(B, H, -1, C // H).index_select(2, layout.output_index)  # B x H x L x hd
        return out.transpose(1, 2).reshape(B, L, C)

    def chunked_qkv(self, query, k_all, v_all, hw):
        """The sliding-chunk operands of the local queries (B x L x C) and all keys/values (B x N x C):
        q B x (H*nC) x W2 x hd, k, v B x (H*nC) x S x hd, the additive mask 1 x (H*nC) x W2 x S, the layout."""
        B, _, C = query.shape
        H = self.num_heads
        neighbours = self.neighbours()
        layout = sliding_chunk_layout(*hw, self.window, neighbours, self.num_global, query.device)
        nC, W2 = layout.num_chunks, self.window ** 2
        q = gather_tokens(query, layout.query_index, H).reshape(B, H * nC, W2, -1)
        k = gather_tokens(k_all, layout.key_index, H).reshape(B, H * nC, -1, C // H)
        v = gather_tokens(v_all, layout.key_index, H).reshape(B, H * nC, -1, C // H)
        mask = self.local_attention_mask(layout.key_mask, neighbours)[None].to(q.dtype)
        return q, k, v, mask, layout

    def attention_maps(self, x, hw):
        """The attention probabilities of :meth:`forward` on ``x`` (B x (G + nx*ny) x C) as dense
        :class:`TokenAttentionMaps` (explicit softmax). Use in eval mode: with ``mode`` > 0 a module in
        training mode draws its own random neighbour chunk."""
        B, N, C = x.shape
        G, H = self.num_global, self.num_heads
        kv = self.kv(x)
        k_all, v_all = kv.chunk(2, dim=-1)
        rows = []
        if G:
            kv_global = kv if self.kv_global is self.kv else self.kv_global(x)
            q, k, _, bias = self.global_qkv(self.query_global(x[:, :G]), kv_global)
            rows.append(attention_probs(q, k, bias, self.scale))  # B x H x G x N
        query = self.query(x[:, G:])
        if self.only_global:
            q = query.view(B, N - G, H, C // H).transpose(1, 2)
            k = k_all[:, :G].reshape(B, G, H, C // H).transpose(1, 2)
            rows.append(F.pad(attention_probs(q, k, None, self.scale), (0, N - G)))  # B x H x L x N
        else:
            q, k, _, mask, layout = self.chunked_qkv(query, k_all, v_all, hw)
            chunk_probs = attention_probs(q, k, mask, self.scale).view(B, H, layout.num_chunks, -1, k.shape[2])
            rows.append(scatter_chunk_probs(chunk_probs, layout, N))  # B x H x L x N
        return TokenAttentionMaps(torch.cat(rows, dim=2), G, tuple(hw))

    def local_attention_mask(self, key_mask, neighbours):
        """(H*nC) x W2 x S additive mask of the local queries: relative position bias + key mask."""
        H, G, W2 = self.num_heads, self.num_global, self.window ** 2
        num_chunks, S = key_mask.shape
        if self.rpe:
            index = self.relative_position_index.view(W2, 9, W2)[:, list(neighbours)].reshape(-1)
            local_bias = self.local_relative_position_bias_table[index].view(W2, -1, H).permute(2, 0, 1)
            global_bias = self.local_query_global_bias(W2) if G else key_mask.new_zeros(H, W2, 0)
        else:
            local_bias, global_bias = key_mask.new_zeros(H, W2, S - G), key_mask.new_zeros(H, W2, G)
        bias = torch.cat([global_bias, local_bias], dim=-1)  # H x W2 x S
        return (bias[:, None] + key_mask[None, :, None]).flatten(0, 1)


def scatter_chunk_probs(chunk_probs, layout, num_tokens):
    """B x H x nC x W2 x S sliding-chunk probabilities -> dense B x H x L x N (L = nx*ny local queries in map
    order, N = num_tokens keys: global then local), zero for keys a query does not attend."""
    B, H = chunk_probs.shape[:2]
    L = layout.output_index.numel()
    num_chunks, S = layout.key_mask.shape
    query_index = layout.query_index.view(num_chunks, -1, 1)  # nC x W2 x 1, padding rows -> L
    key_index = layout.key_index.view(num_chunks, 1, S)       # nC x 1 x S, masked keys -> N
    flat_index = (query_index * (num_tokens + 1) + key_index).flatten().expand(B, H, -1)
    dense = chunk_probs.new_zeros(B, H, (L + 1) * (num_tokens + 1))
    dense.scatter_add_(2, flat_index, chunk_probs.reshape(B, H, -1))
    return dense.view(B, H, L + 1, num_tokens + 1)[:, :, :L, :num_tokens]


class FullAttention(ViLAttention):
    """Multi-head attention over all tokens, with an optional relative position bias built for the wx x wy
    grid of the construction resolution (the original ``Attention``)."""

    def __init__(self, dim, num_heads, num_global, rpe, grid, proj_drop=0.):
        wx, wy = grid
        super().__init__(dim, num_heads, num_global, rpe, (2 * wx - 1) * (2 * wy - 1), proj_drop)
        if rpe:
            # L x L (L = wx*wy) index into the table: (dx + wx - 1) * (2 wy - 1) + (dy + wy - 1)
            self.register_buffer('relative_position_index', gen_relative_position_index((wx, wy)))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, num_local):
        """H x N x N, N = G + num_local. The L x L local bias of the construction grid is resized, when
        num_local != L, as the original does: bicubically as an L x L image, by the factor num_local / L."""
        L = self.relative_position_index.shape[0]
        local = self.local_relative_position_bias_table[self.relative_position_index.view(-1)]
        local = local.view(L, L, -1).permute(2, 0, 1)  # H x L x L
        if num_local != L:
            local = F.interpolate(local.unsqueeze(0).contiguous(), scale_factor=num_local / L, mode='bicubic')[0]
        if not self.num_global:
            return local
        from_local = torch.cat([self.local_query_global_bias(num_local), local], dim=-1)
        return torch.cat([self.global_query_bias(num_local), from_local], dim=1)

    def qkv_bias(self, x):
        """x: B x N x C -> q, k, v (B x H x N x hd each) and the 1 x H x N x N position bias or None."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(N - self.num_global)[None].to(q.dtype) if self.rpe else None
        return q, k, v, bias

    def forward(self, x, hw):
        """x: B x (G + nx*ny) x C -> B x (G + nx*ny) x C."""
        B, N, C = x.shape
        q, k, v, bias = self.qkv_bias(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # B x H x N x hd
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def attention_maps(self, x, hw):
        """The attention probabilities of :meth:`forward` on ``x`` as :class:`TokenAttentionMaps`."""
        q, k, _, bias = self.qkv_bias(x)
        return TokenAttentionMaps(attention_probs(q, k, bias, self.scale), self.num_global, tuple(hw))


class PatchEmbed(nn.Module):
    """p x p convolution, optional LayerNorm, the stage's global tokens, optional absolute position embedding."""

    def __init__(self, patch_size, in_chans, dim, num_global, grid, norm_layer, norm_embed, ape, drop=0.):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm_embed = norm_layer(dim) if norm_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, num_global, dim)) if num_global else None
        if num_global:
            trunc_normal_(self.cls_token, std=.02)
        self.grid = grid
        self.ape = ape
        if ape:
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, num_global, dim))
            self.x_pos_embed = nn.Parameter(torch.zeros(1, grid[0], dim // 2))
            self.y_pos_embed = nn.Parameter(torch.zeros(1, grid[1], dim // 2))
            for param in (self.cls_pos_embed, self.x_pos_embed, self.y_pos_embed):
                trunc_normal_(param, std=.02)
        self.pos_drop = nn.Dropout(drop)

    def absolute_position_embedding(self, num_tokens):
        """1 x (G + nx*ny) x C. The nx0*ny0 table is resized whenever ``num_tokens`` (global tokens included,
        as in the original) differs from nx0*ny0, bicubically by sqrt(num_tokens / (nx0*ny0)) a side."""
        nx0, ny0 = self.grid
        grid_embed = torch.cat([self.x_pos_embed[:, :, None].expand(-1, -1, ny0, -1),
                                self.y_pos_embed[:, None].expand(-1, nx0, -1, -1)], dim=-1).flatten(1, 2)
        if num_tokens != nx0 * ny0:
            side, C = int(math.sqrt(nx0 * ny0)), grid_embed.shape[-1]
            grid_embed = F.interpolate(grid_embed.reshape(1, side, side, C).permute(0, 3, 1, 2),
                                       scale_factor=math.sqrt(num_tokens / (nx0 * ny0)), mode='bicubic')
            grid_embed = grid_embed.permute(0, 2, 3, 1).reshape(1, -1, C)
        return torch.cat([self.cls_pos_embed, grid_embed], dim=1)

    def forward(self, feature_map):
        """B x Cin x H x W -> (B x (G + nx*ny) x C, (nx, ny))."""
        x = self.proj(feature_map)  # B x C x nx x ny
        hw = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        if self.norm_embed is not None:
            x = self.norm_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.ape:
            x = x + self.absolute_position_embedding(x.shape[1])
        return self.pos_drop(x), hw


class AttnBlock(nn.Module):
    """x + drop_path(attn(norm(x)))."""

    def __init__(self, dim, attn, drop_path, norm_layer):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x, hw):
        return x + self.drop_path(self.attn(self.norm(x), hw))


class MlpBlock(nn.Module):
    """x + drop_path(mlp(norm(x))), hidden width 4 * dim."""

    def __init__(self, dim, drop, drop_path, norm_layer):
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.norm(x)))


class Stage(nn.ModuleList):
    """``layerK``: PatchEmbed (index 0), then AttnBlock (odd indices) / MlpBlock (even indices) pairs."""

    def __init__(self, in_chans, cfg, grid, drop_path_rates, norm_layer, norm_embed, drop, longformer, share_w,
                 only_global, mode):
        dim, heads, num_global, ape = cfg['d'], cfg['h'], cfg['g'], bool(cfg['a'])
        modules = [PatchEmbed(cfg['p'], in_chans, dim, num_global, grid, norm_layer, norm_embed, ape, drop)]
        for rate in drop_path_rates:
            if longformer:
                attn = LongformerAttention(dim, heads, cfg['f'], num_global, share_w, not ape, mode=mode,
                                           only_global=only_global, proj_drop=drop)
            else:
                attn = FullAttention(dim, heads, num_global, not ape, grid, proj_drop=drop)
            modules += [AttnBlock(dim, attn, rate, norm_layer), MlpBlock(dim, drop, rate, norm_layer)]
        super().__init__(modules)

    def forward(self, feature_map):
        """B x Cin x H x W -> (tokens B x (G + nx*ny) x C after each MLP block, (nx, ny))."""
        x, hw = self[0](feature_map)
        blocks = list(self)
        outputs = []
        for attn_block, mlp_block in zip(blocks[1::2], blocks[2::2]):
            x = mlp_block(attn_block(x, hw))
            outputs.append(x)
        return outputs, hw


class MsViT(nn.Module):
    """Multi-scale ViT with Vision Longformer attention; stages ``layer1``, ``layer2``, ... then ``norm``.

    ``forward_features`` gives (pooled B x C, region tokens B x N x C) of the normed last stage: with global
    tokens (and not ``avg_pool``) the first token and the tokens after it, otherwise the token mean and all
    tokens.
    """

    flat_state_dict = True  # the original grew head/head_dense on this module itself

    def __init__(self, arch, img_size=224, in_chans=3, drop_rate=0., drop_path_rate=0., norm_embed=True,
                 avg_pool=False, ln_eps=1e-6, share_w=True, attn_type='longformerhand', only_global=False, mode=0,
                 mode_switch=0.):
        super().__init__()
        if attn_type not in SUPPORTED_ATTN_TYPES:
            raise ModelError(f"MSVIT.ATTN_TYPE {attn_type!r} is not supported (choose from {SUPPORTED_ATTN_TYPES})")
        check_attention_mode(mode)
        self.mode, self.mode_switch = mode, mode_switch
        self.layer_cfgs = parse_arch(arch)
        self.depths = [cfg['n'] for cfg in self.layer_cfgs]
        self.num_globals = [cfg['g'] for cfg in self.layer_cfgs]
        self.num_features = self.layer_cfgs[-1]['d']
        self.avg_pool = avg_pool
        norm_layer = partial(nn.LayerNorm, eps=ln_eps)
        rates = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').split(self.depths)
        grid, in_dim = img_size, in_chans
        longformer = attn_type in LONGFORMER_ATTN_TYPES
        for k, (cfg, stage_rates) in enumerate(zip(self.layer_cfgs, rates), start=1):
            grid //= cfg['p']
            longformer = longformer and cfg['s'] == 1  # as the original: full attention from the first s0 on
            setattr(self, f'layer{k}', Stage(in_dim, cfg, (grid, grid), stage_rates.tolist(), norm_layer, norm_embed,
                                             drop_rate, longformer, share_w, only_global, mode))
            in_dim = cfg['d']
        self.norm = norm_layer(self.num_features)
        self.apply(init_trunc_normal)

    @property
    def stages(self):
        return [getattr(self, f'layer{k}') for k in range(1, len(self.layer_cfgs) + 1)]

    def set_attention_mode(self, mode):
        """Sets ``MSVIT.MODE`` of every longformer attention (the original's ``reset_vil_mode``): 0 all
        neighbour chunks, -1 own chunk only, > 0 one random neighbour chunk in training and all in eval."""
        check_attention_mode(mode)
        for module in self.modules():
            if isinstance(module, LongformerAttention):
                module.mode = mode

    def set_epoch(self, epoch, epochs):
        """Training-schedule hook: ``MSVIT.MODE`` until ``VIL_MODE_SWITCH`` x ``epochs``, then the full mode 0
        (``VIL_MODE_SWITCH`` 0 keeps ``MODE`` throughout). The original parsed the switch and never used it."""
        switched = self.mode_switch > 0 and epoch >= self.mode_switch * epochs
        self.set_attention_mode(0 if switched else self.mode)

    def _run_stages(self, images):
        """Yields (stage index, tokens after each of its MLP blocks); global tokens are dropped between stages."""
        x = images
        last = len(self.layer_cfgs) - 1
        for i, stage in enumerate(self.stages):
            outputs, (nx, ny) = stage(x)
            yield i, outputs
            if i < last:
                x = outputs[-1][:, self.num_globals[i]:].transpose(1, 2).reshape(x.shape[0], -1, nx, ny)

    def _pool(self, tokens, num_global):
        """B x N x C -> B x C: the first (global) token, or the mean of all tokens."""
        return tokens[:, 0] if num_global and not self.avg_pool else tokens.mean(dim=1)

    def forward_features(self, images):
        """B x 3 x H x W -> (pooled B x C, region tokens B x N x C)."""
        *_, (_, last_stage_outputs) = self._run_stages(images)
        tokens = self.norm(last_stage_outputs[-1])
        num_global = self.num_globals[-1]
        region = tokens[:, 1:] if num_global and not self.avg_pool else tokens
        return self._pool(tokens, num_global), region

    def forward(self, images):
        return self.forward_features(images)[0]

    def forward_attention_maps(self, images, n_last=1):
        """Attention probabilities of the last ``n_last`` blocks (across stages, in block order), each dense
        :class:`TokenAttentionMaps` (``probs`` B x heads x N x N over the global then the map tokens)."""
        return attention_maps_of_last(self, ViLAttention, images, n_last)

    def forward_return_n_last_blocks(self, images, n=1, return_patch_avgpool=False, depths=()):
        """The eval_linear feature B x D: the pooled tokens (first global token, or token mean) after each of
        the last ``n`` blocks across stages, the final norm applied in the last stage, concatenated.

        ``return_patch_avgpool`` appends the mean of the last stage's normed map tokens, its global tokens
        excluded (D + num_features; the original ignored the flag): ``forward_features(x)[1].mean(1)`` unless
        the last stage has several global tokens or ``avg_pool`` keeps its global token among the region tokens.
        ``depths``, the original's stage-depth argument, must match the model when given.
        """
        check_n_last_blocks(n, depths, self.depths)
        first_kept = sum(self.depths) - n
        last = len(self.depths) - 1
        features = []
        block = 0
        for i, outputs in self._run_stages(images):
            for tokens in outputs:
                if block >= first_kept:
                    features.append(self._pool(self.norm(tokens) if i == last else tokens, self.num_globals[i]))
                block += 1
        if return_patch_avgpool:  # outputs: the last stage's, B x (G + nx*ny) x C after each block
            features.append(self.norm(outputs[-1])[:, self.num_globals[-1]:].mean(dim=1))
        return torch.cat(features, dim=-1)


def check_attention_mode(mode):
    if mode < -1:
        raise ModelError(f'MSVIT.MODE must be -1 (own chunk), 0 (all chunks) or > 0 (random neighbour), got {mode}')


@register_model('vision_longformer')
def build_vision_longformer(config, is_teacher=False):
    """MsViT from ``config.MODEL.SPEC`` (construction grid from ``TRAIN.IMAGE_SIZE``); the teacher gets
    drop-path 0.

    ``MSVIT.SHARE_KV`` (Linformer only), ``POOL_METHOD`` (pooled keys only) do not affect the backbone;
    ``VIL_MODE_SWITCH`` is applied by :meth:`MsViT.set_epoch`.
    """
    spec = config.MODEL.SPEC
    msvit = spec.MSVIT
    if msvit.SW_EXACT != 0:
        raise ModelError(f'MSVIT.SW_EXACT {msvit.SW_EXACT} is not supported: only 0 (zero-padded sliding chunks)')
    if msvit.WITH_SE is not None:
        raise ModelError(f'MSVIT.WITH_SE {msvit.WITH_SE!r} is not supported: only None')
    return MsViT(
        arch=msvit.ARCH, img_size=config.TRAIN.IMAGE_SIZE[0], norm_embed=spec.NORM_EMBED, avg_pool=spec.AVG_POOL,
        ln_eps=msvit.LN_EPS, share_w=msvit.SHARE_W, attn_type=msvit.ATTN_TYPE, only_global=msvit.ONLY_GLOBAL,
        mode=msvit.MODE, mode_switch=msvit.VIL_MODE_SWITCH,
        drop_rate=spec.DROP, drop_path_rate=0.0 if is_teacher else spec.DROP_PATH)
