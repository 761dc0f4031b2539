"""The DINO projection head: MLP -> L2-normalise -> weight-normalised linear layer to ``out_dim``."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import init_trunc_normal


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row-wise), stored as ``weight_g`` / ``weight_v``.

    Same parameters and keys as ``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` (so released
    checkpoints load), computed directly instead of through a forward-pre hook.
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())

    @property
    def weight(self):
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))  # out x in

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """``in_dim -> hidden_dim -> hidden_dim -> bottleneck_dim`` MLP (GELU, optional BN), L2-normalised, then a
    weight-normalised bias-free layer to ``out_dim``. ``norm_last_layer`` freezes the layer's gain at 1."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers = []
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(init_trunc_normal)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):  # ... x in_dim -> ... x out_dim
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
