"""Optimisation of the student: parameter groups, the optimizer, per-step schedules (lr, weight decay, teacher
momentum), gradient clipping, the frozen last layer, the teacher's EMA, and LARS."""
import numpy as np
import torch

import utils


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Per-iteration values: linear warm-up from ``start_warmup_value``, then cosine to ``final_value``."""
    warmup_iters = min(int(warmup_epochs * niter_per_ep), epochs * niter_per_ep)  # a run shorter than its warm-up
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model):
    """Weight decay on weights; none on biases and 1-D (norm) parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith('.bias') or param.ndim == 1 else regularized).append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def clip_gradients(model, clip, mode='per_tensor'):
    """Clip gradients to norm ``clip``. ``per_tensor`` (the original's semantics) clips each parameter's
    gradient separately; ``global`` clips the norm of all gradients together (as ``clip_grad_norm_``).
    Works without a host sync per tensor. Returns the per-tensor norms (or the global norm) as a tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    if mode == 'global':
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    norms = torch.stack(torch._foreach_norm(grads))                    # P
    scales = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if 'last_layer' in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher_params, student_params, momentum):
    """teacher <- m * teacher + (1 - m) * student, fused over all tensors."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


class LARS(torch.optim.Optimizer):
    """LARS (for convnets with large batches); no weight decay or scaling on 1-D parameters."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group['eta'] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu'].mul_(group['momentum']).add_(update)
                p.add_(mu, alpha=-group['lr'])


def images_per_step(args):
    """The effective batch: images of one optimizer step over all processes and accumulated micro-batches."""
    return args.batch_size_per_gpu * utils.get_world_size() * args.accum_iter


class Schedules:
    """Per-optimizer-step lr (linear scaling: ``--lr`` is for a batch of 256), weight decay and teacher momentum."""

    def __init__(self, args, iters_per_epoch):
        self.iters_per_epoch = iters_per_epoch
        self.lr = cosine_scheduler(args.lr * images_per_step(args) / 256., args.min_lr, args.epochs,
                                   iters_per_epoch, warmup_epochs=args.warmup_epochs)
        self.wd = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
        self.momentum = cosine_scheduler(args.momentum_teacher, 1, args.epochs, iters_per_epoch)


def build_optimizer(args, student):
    """``--optimizer`` over the student's parameter groups; lr and weight decay are set at every step."""
    groups = get_params_groups(student)
    fused = args.fused_optimizer or None  # one kernel over all tensors (CPU and CUDA), same update
    if args.optimizer == 'adamw':
        return torch.optim.AdamW(groups, fused=fused)
    if args.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=0, momentum=0.9, fused=fused)
    return LARS(groups)
