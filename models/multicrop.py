"""The multi-crop forward shared by every backbone: one backbone pass per resolution group."""
from typing import NamedTuple

import torch
import torch.nn as nn


class MultiCropOutput(NamedTuple):
    """The outputs of :class:`MultiCropWrapper` with a region head. A tuple in the original's order
    ``(cls_out, region_out, fea, npatch)``, so ``a, b, c, d = output`` unpacks as before.

    Region rows are ordered crop-major, then batch, then token: ``row = (crop*B + b)*N + n`` within a
    resolution group, the groups concatenated; R = B * sum over groups of (crops x N).
    """
    view_logits: torch.Tensor      # n_crops*B x K: head(pooled feature) of every crop, crop-major
    region_logits: torch.Tensor    # R x K: head_dense(region_features)
    region_features: torch.Tensor  # R x C: the backbone's region tokens (matched by the region loss)
    tokens_per_group: list         # the token count N of each resolution group (the original's npatch)


class MultiCropWrapper(nn.Module):
    """Backbone + ``head`` (view level) + optional ``head_dense`` (region level).

    ``forward(crops)`` takes the list of crops of one batch (consecutive crops of equal size form a
    resolution group: 2 globals, then each local size) and returns

    - without ``head_dense``: ``head(pooled)`` of every crop, ``[n_crops*B, K]``
    - with ``head_dense``: a :class:`MultiCropOutput`

    Checkpoint layout: backbones that declare ``flat_state_dict = True`` (the transformers, which the
    original grew heads on directly) expose ``patch_embed.*, head.*, head_dense.*`` at the top level of
    the state dict; others keep ``backbone.*`` (the original's ResNet wrapper). ``load_state_dict``
    accepts exactly what ``state_dict`` produces, so released checkpoints load with ``strict=True``.
    """

    def __init__(self, backbone, head, head_dense=None):
        super().__init__()
        if isinstance(getattr(backbone, 'head', None), nn.Module):
            backbone.head = nn.Identity()  # the projection heads replace a classifier (MODEL.NUM_CLASSES > 0)
        self.backbone = backbone
        self.head = head
        self.head_dense = head_dense
        if getattr(backbone, 'flat_state_dict', False):
            self.register_state_dict_post_hook(_flatten_backbone_keys)
            self.register_load_state_dict_pre_hook(_nest_backbone_keys)

    def forward(self, crops):
        if not isinstance(crops, (list, tuple)):
            crops = [crops]
        sizes = torch.tensor([crop.shape[-1] for crop in crops])
        group_ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        pooled, regions, npatch = [], [], []
        start = 0
        for end in group_ends:
            group_pooled, group_region = self.backbone.forward_features(torch.cat(crops[start:end]))
            pooled.append(group_pooled)                  # (c*B) x C
            regions.append(group_region.flatten(0, 1))   # (c*B*N) x C
            npatch.append(group_region.shape[1])
            start = end
        pooled = torch.cat(pooled)
        cls_out = self.head(pooled)
        if self.head_dense is None:
            return cls_out
        fea = torch.cat(regions)
        return MultiCropOutput(cls_out, self.head_dense(fea), fea, npatch)


_BACKBONE = 'backbone.'
_HEADS = ('head.', 'head_dense.')


def _flatten_backbone_keys(module, state_dict, prefix, local_metadata):
    nested = prefix + _BACKBONE
    items = list(state_dict.items())  # rebuilt in place to keep the key order
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(nested):] if key.startswith(nested) else key] = value


def _nest_backbone_keys(module, state_dict, prefix, *args):
    for key in list(state_dict):
        local = key[len(prefix):]
        if key.startswith(prefix) and not local.startswith(_HEADS) and not local.startswith(_BACKBONE):
            state_dict[prefix + _BACKBONE + local] = state_dict.pop(key)
