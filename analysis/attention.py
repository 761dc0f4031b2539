"""Attention of the multi-stage backbones, per image and block, as maps over the block's token grid.

    blocks = block_attentions(backbone, image, n_last=2)  # [BlockAttention], image 1 x 3 x S x S
    maps = query_maps(block, row, col)    # heads x h x w: where the token (row, col) looks
    maps = received_maps(block)           # heads x h x w: attention received, averaged over all queries
    maps = global_token_maps(block)       # heads x h x w: where the first global token looks (ViL; a ViT's [CLS])
    order = entropy_order(maps)           # head indices, most focused first
    masks = mass_masks(maps, threshold)   # heads x h x w bool: the fewest tokens holding `threshold` of the mass

Swin and CvT attend inside windows (Swin's shifted by half a window every other block), ViL inside
neighbourhoods of chunks plus global tokens, a ViT everywhere, with its [CLS] token as the one global token:
every block's probabilities are made dense over the block's (global tokens, grid tokens) first, so that a
query's map is zero outside the tokens it can attend to.
"""
from dataclasses import dataclass

import torch

from models.layers import WindowAttentionMaps


@dataclass
class BlockAttention:
    """The attention probabilities of one block for one image."""
    stage: int
    block: int          # index inside the stage
    probs: torch.Tensor  # heads x N x N over [global tokens, grid tokens row-major], zero where not attended
    num_global: int
    grid: tuple         # (h, w) of the grid tokens
    covers_map: bool    # every grid query attends to every grid token (one window covers the map)
    layout: str         # how the block attends, in words
    class_token: bool = False  # the global token is a ViT's [CLS] token (its map: DINO's attention picture)

    @property
    def name(self):
        return f"stage {self.stage}, block {self.block}"

    @property
    def slug(self):
        return f"stage{self.stage}_block{self.block}"

    @property
    def num_heads(self):
        return self.probs.shape[0]

    @property
    def global_name(self):
        return "[CLS] token" if self.class_token else "global token"


def window_attention_to_dense(maps, image_index=0):
    """heads x L x L probabilities over the H x W map (row-major) from window probabilities: the token at
    (r, c) sits at ((r - shift) % Hp, (c - shift) % Wp) of the shifted, padded map; keys on padding are dropped
    (their mass is lost) and keys of other windows get 0."""
    (H, W), (Hp, Wp) = maps.hw, maps.padded_hw
    ws, shift = maps.window_size, maps.shift_size
    windows_per_row = Wp // ws
    probs = maps.probs.unflatten(0, (-1, (Hp // ws) * windows_per_row))[image_index]  # nW x heads x T x T
    device = probs.device
    rows = ((torch.arange(H, device=device) - shift) % Hp)[:, None].expand(H, W).flatten()  # L
    cols = ((torch.arange(W, device=device) - shift) % Wp)[None, :].expand(H, W).flatten()  # L
    window = (rows // ws) * windows_per_row + cols // ws
    token = (rows % ws) * ws + cols % ws
    dense = probs[window[:, None], :, token[:, None], token[None, :]]  # L x L x heads
    dense = dense * (window[:, None] == window[None, :]).unsqueeze(-1)
    return dense.permute(2, 0, 1)


def stage_blocks(depths, n_last):
    """(stage, block inside the stage) of the last ``n_last`` blocks across stages."""
    blocks = [(stage, block) for stage, depth in enumerate(depths) for block in range(depth)]
    return blocks[-n_last:]


@torch.no_grad()
def block_attentions(backbone, image, n_last=1):
    """The attention of the last ``n_last`` blocks of ``backbone`` on ``image`` (1 x 3 x S x S), in block order.
    A ViL block covers the map when no grid probability is exactly 0 (its keys are masked with -inf); a ViT's
    global token is its [CLS] token (``backbone.has_class_token``)."""
    n_last = min(n_last, sum(backbone.depths))
    class_token = getattr(backbone, 'has_class_token', False)
    results = []
    for (stage, block), maps in zip(stage_blocks(backbone.depths, n_last),
                                    backbone.forward_attention_maps(image, n_last=n_last)):
        if isinstance(maps, WindowAttentionMaps):
            windows = (maps.padded_hw[0] // maps.window_size) * (maps.padded_hw[1] // maps.window_size)
            shift = f", shifted by {maps.shift_size}" if maps.shift_size else ""
            results.append(BlockAttention(
                stage, block, window_attention_to_dense(maps).float().cpu(), 0, tuple(maps.hw), windows == 1,
                f"{maps.window_size}x{maps.window_size} windows{shift}"))
        else:  # dense TokenAttentionMaps (ViL, ViT)
            probs = maps.probs[0].float().cpu()
            grid_probs = probs[:, maps.num_global:, maps.num_global:]
            covers = bool((grid_probs > 0).all())
            result = BlockAttention(stage, block, probs, maps.num_global, tuple(maps.hw), covers,
                                    "full attention" if covers else "local chunks", class_token)
            if maps.num_global:
                count = '' if class_token else f"{maps.num_global} "
                result.layout += f" + {count}{result.global_name}{'s' if maps.num_global > 1 else ''}"
            results.append(result)
    return results


def query_token(grid, point):
    """(row, col) of the grid token under ``point`` = (y, x) given as fractions of the image side."""
    return tuple(min(int(p * n), n - 1) for p, n in zip(point, grid))


def query_maps(block, row, col):
    """heads x h x w: the attention of the grid token (row, col) over the grid tokens."""
    h, w = block.grid
    query = block.num_global + row * w + col
    return block.probs[:, query, block.num_global:].reshape(-1, h, w)


def received_maps(block):
    """heads x h x w: the attention each grid token receives, averaged over the grid queries (a map of the
    whole image when every query sees the whole map: Swin/CvT's last stage, full attention)."""
    G = block.num_global
    return block.probs[:, G:, G:].mean(dim=1).reshape(-1, *block.grid)


def global_token_maps(block):
    """heads x h x w: the attention of the first global token over the grid (ViL's [CLS]-like token, a ViT's
    [CLS] token: DINO's attention maps)."""
    return block.probs[:, 0, block.num_global:].reshape(-1, *block.grid)


def entropy(maps):
    """Entropy in bits of each head's map, normalised to a distribution over the grid. heads"""
    p = maps.flatten(1)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def entropy_order(maps):
    """Head indices sorted by entropy, the most focused head first."""
    return torch.argsort(entropy(maps)).tolist()


def mass_masks(maps, threshold):
    """heads x h x w bool: per head, the fewest tokens whose attention holds ``threshold`` of the map's mass."""
    flat = maps.flatten(1)
    values, order = flat.sort(dim=1, descending=True)
    mass_before = values.cumsum(dim=1) - values
    keep_sorted = mass_before < threshold * flat.sum(dim=1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.view_as(maps)



def attention_views(block, query_points, image_size):
    """What to draw for a block: (slug, description, maps heads x h x w, query marker (y, x) px or None) for
    each distinct query token under ``query_points`` ((y, x) fractions), then, when every query sees the whole
    map, the attention received, and with global tokens, the first global token's attention (``cls_token``
    for a ViT's [CLS] token)."""
    h, w = block.grid
    views, seen = [], set()
    for point in query_points:
        row, col = query_token(block.grid, point)
        if (row, col) in seen:
            continue
        seen.add((row, col))
        marker = ((row + 0.5) * image_size / h, (col + 0.5) * image_size / w)
        views.append((f"query_r{row}_c{col}", f"query token ({row}, {col}) of {h}x{w}",
                      query_maps(block, row, col), marker))
    if block.covers_map:
        views.append(("whole_map", "attention received, mean over all queries", received_maps(block), None))
    if block.num_global:
        slug = "cls_token" if block.class_token else "global_token"
        views.append((slug, f"attention of the {block.global_name}", global_token_maps(block), None))
    return views
