"""Batch statistics synchronised across processes, on GPU (``nn.SyncBatchNorm``) and on CPU.

``nn.SyncBatchNorm`` refuses CPU modules under DDP, so on CPU (gloo) each BatchNorm is replaced by
:class:`AllReduceBatchNorm`, which all-reduces the per-channel sum, sum of squares and count with a
differentiable all-reduce. Same parameters, buffers and state-dict keys as the BatchNorm it replaces.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over the union of every process's batch (any input rank: N x C x ...)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        local_count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        xf = x.float()
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), local_count])            # 2C + 1
        stats = dist_fn.all_reduce(stats)
        C = x.shape[1]
        count = stats[-1]
        mean = stats[:C] / count
        var = (stats[C:2 * C] / count - mean * mean).clamp(min=0)                       # biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=m)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device):
    """Every BatchNorm of ``module`` synchronised across processes: ``nn.SyncBatchNorm`` on CUDA,
    :class:`AllReduceBatchNorm` elsewhere."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        converted = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
