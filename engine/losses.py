"""EsViT losses: the view-level DINO loss and the view + region-level loss.

Both follow the original's interface: ``Loss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9)`` and
``loss(student_output, teacher_output, epoch)``. Unlike the original, crops of several local sizes
are supported (``local_crops_number``), the pairs are computed batched instead of in a Python loop,
and the centers are all-reduced only when a process group exists (so a plain CPU run works).

The centers move in an explicit step: a forward records the teacher's batch statistics and
``loss.update_center()``, which the trainer calls at each optimizer step, moves the centers once with the
statistics of all the forwards since the last update (with gradient accumulation, as one batch of their total
size would; the original updated them inside each forward).
"""
import functools
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def float32_loss(forward):
    """Run a loss's ``forward(student_output, teacher_output, epoch, ...)`` with autocast off: under bf16
    autocast the 65536-wide matched dot products and similarities would be bf16 matmuls, 3e-4 off the float32
    loss."""
    @functools.wraps(forward)
    def run(self, student_output, teacher_output, epoch, *args, **kwargs):
        first = student_output[0] if isinstance(student_output, (tuple, list)) else student_output
        with torch.autocast(first.device.type, enabled=False):
            return forward(self, student_output, teacher_output, epoch, *args, **kwargs)
    return run


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    """The teacher temperature of each epoch: a linear warm-up (too high a temperature early makes training
    unstable), then constant."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(max(nepochs - warmup_epochs, 1)) * teacher_temp))


def epoch_value(schedule, epoch):
    """``schedule``'s value at ``epoch`` (its last past the end)."""
    return float(schedule[min(int(epoch), len(schedule) - 1)])


class _CenteredDistillationLoss(nn.Module):
    """Teacher temperature schedule and EMA-centering shared by both losses."""
    monitor = None  # an engine.health.HealthMonitor sees each forward's cross-entropies and teacher probabilities

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer('center', torch.zeros(1, out_dim))
        self._center_stats = {}  # center buffer name -> (sum of teacher rows 1 x K, row count) since the last update
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch):
        return epoch_value(self.teacher_temp_schedule, epoch)

    @staticmethod
    def teacher_probs(teacher_out, center, temp):
        """softmax((t - center) / temp), no gradient, float32 and contiguous whatever the layout of
        ``teacher_out``. ... x K -> ... x K"""
        centered = torch.empty(teacher_out.shape, device=teacher_out.device)
        torch.sub(teacher_out.detach(), center, out=centered)                          # one pass
        return F.softmax(centered.div_(temp), dim=-1)

    def view_cross_entropy(self, student_cls_out, teacher_cls_probs, mix_targets=None):
        """[2 x ncrops] matrix of batch-mean cross-entropies, teacher view i against student view v.

        student_cls_out: (ncrops*B) x K raw head outputs; teacher_cls_probs: (2*B) x K probabilities.
        mix_targets (--use_mixup, engine/mixup.py): V x B x B, row b of view v = the share of each image of the
        batch in student image b; its teacher target is the same mixture of the teacher's distributions.
        """
        student_logp = F.log_softmax(student_cls_out.float() / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, -1, student_logp.shape[-1])   # V x B x K
        teacher_probs = teacher_cls_probs.view(2, -1, teacher_cls_probs.shape[-1])  # 2 x B x K
        if mix_targets is None:
            return -torch.einsum('tbk,vbk->tv', teacher_probs, student_logp) / student_logp.shape[1]
        dots = torch.einsum('tik,vjk->tvji', teacher_probs, student_logp)            # 2 x V x B x B
        return -(dots * mix_targets.float()).sum(dim=(-2, -1)) / student_logp.shape[1]

    def pair_mask(self, device):
        """[2 x ncrops] boolean: True for (teacher view i, student view v) with v != i."""
        mask = torch.ones(2, self.ncrops, dtype=torch.bool, device=device)
        mask[0, 0] = mask[1, 1] = False
        return mask

    @torch.no_grad()
    def accumulate_center_stats(self, **teacher_rows):
        """Record teacher outputs (``center_name=rows``, R x K each) for the next :meth:`update_center`."""
        for name, rows in teacher_rows.items():
            total, count = self._center_stats.get(name, (0., 0))
            self._center_stats[name] = (total + rows.detach().sum(dim=0, keepdim=True, dtype=torch.float32),
                                        count + rows.shape[0])

    @torch.no_grad()
    def update_center(self):
        """EMA of each center towards the mean of the teacher rows recorded since the last update, over all
        processes when a process group exists (one all-reduce)."""
        if not self._center_stats:
            return
        names = list(self._center_stats)
        totals = torch.cat([self._center_stats[name][0] for name in names])                      # C x K
        counts = torch.tensor([float(self._center_stats[name][1]) for name in names], device=totals.device)
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([totals.flatten(), counts])
            dist.all_reduce(packed)
            totals, counts = packed[:totals.numel()].view_as(totals), packed[totals.numel():]
        for name, batch_center in zip(names, totals / counts[:, None]):
            center = getattr(self, name)
            center.mul_(self.center_momentum).add_(batch_center[None], alpha=1 - self.center_momentum)
        self._center_stats.clear()


class DINOLoss(_CenteredDistillationLoss):
    """View-level loss: cross-entropy between the teacher's centred, sharpened distribution of each global
    view and the student's distribution of every other view, averaged over pairs."""

    @float32_loss
    def forward(self, student_output, teacher_output, epoch, mix_targets=None):
        teacher_probs = self.teacher_probs(teacher_output, self.center, self.teacher_temp(epoch))
        ce = self.view_cross_entropy(student_output, teacher_probs, mix_targets)  # 2 x V
        loss = ce[self.pair_mask(ce.device)].mean()
        self.accumulate_center_stats(center=teacher_output)
        if self.monitor is not None:
            self.monitor.observe(ce, self.pair_mask(ce.device), teacher_probs)
        return loss


class MatchedCrossEntropy(torch.autograd.Function):
    """Region cross-entropies of one resolution group against both teacher views:
    ``ce[v, c, b, s] = -sum_k q[b, v, match[v, c, b, s], k] * log_softmax(logits[c, b, s] / temp)_k``.

    ``logits`` c x B x T_s x K (student crops of one size), ``teacher_probs`` B x 2 x T_t x K (no gradient; both
    views of an image side by side), ``teacher_mass`` = ``teacher_probs.sum(-1)`` (computed once for all groups),
    ``match`` 2 x c x B x T_s indices of teacher tokens. Because
    ``-q . log_softmax(s) = mass(q) lse(s) - q . s``, the matched dot products are read off one batched matmul
    per image against the tokens of both views, ``s_b @ q_b^T`` ((c*T_s) x 2T_t), instead of gathering a K-long
    teacher row per student token; backward is the product of a one-hot matrix of the incoming gradients with
    the teacher rows. Each K-long row is read a few times instead of once per crop and view; only the logits
    and their log-sum-exp are kept for backward.
    """

    @staticmethod
    def scaled_by_image(logits, temp):
        """c x B x T_s x K logits -> B x (c*T_s) x K float32 ``logits / temp``, one pass."""
        crops, batch, n_student, k = logits.shape
        s = torch.empty(batch, crops, n_student, k, device=logits.device)
        torch.mul(logits.transpose(0, 1), 1. / temp, out=s)
        return s.flatten(1, 2)

    @staticmethod
    def matched_columns(match, n_teacher):
        """2 x c x B x T_s token indices per view -> 2 x B x (c*T_s) columns of the 2T_t teacher rows of an image."""
        views = torch.arange(2, device=match.device).view(2, 1, 1) * n_teacher
        return match.permute(0, 2, 1, 3).flatten(2) + views

    @staticmethod
    def forward(ctx, logits, teacher_probs, teacher_mass, match, temp):
        crops, batch, n_student = logits.shape[:3]
        q = teacher_probs.flatten(1, 2)                                                # B x 2T_t x K
        teacher_mass = teacher_mass.flatten(1)                                         # B x 2T_t (1 up to rounding)
        s = MatchedCrossEntropy.scaled_by_image(logits, temp)                          # B x (c*T_s) x K
        lse = torch.logsumexp(s, dim=-1)                                               # B x (c*T_s)
        columns = MatchedCrossEntropy.matched_columns(match, teacher_probs.shape[2])   # 2 x B x (c*T_s)
        dots = torch.bmm(s, q.transpose(1, 2))                                         # B x (c*T_s) x 2T_t
        ce = torch.stack([lse * teacher_mass.gather(-1, view_columns)
                          - dots.gather(-1, view_columns[..., None])[..., 0] for view_columns in columns])
        ctx.save_for_backward(logits, q, teacher_mass, columns, lse)
        ctx.temp = temp
        return ce.view(2, batch, crops, n_student).transpose(1, 2)                     # 2 x c x B x T_s

    @staticmethod
    def backward(ctx, grad_ce):                                                       # 2 x c x B x T_s
        logits, q, teacher_mass, columns, lse = ctx.saved_tensors
        crops, batch, n_student = logits.shape[:3]
        grad_ce = grad_ce.transpose(1, 2).flatten(2)                                   # 2 x B x (c*T_s)
        # d ce[v] / d s = softmax(s) * mass(q_v) - q_v, and s = logits / temp
        weight = sum(g * teacher_mass.gather(-1, m) for g, m in zip(grad_ce, columns))  # B x (c*T_s)
        grad_s = MatchedCrossEntropy.scaled_by_image(logits, ctx.temp)                 # B x (c*T_s) x K
        grad_s.sub_(lse[..., None]).exp_().mul_(weight[..., None])
        one_hot = grad_s.new_zeros(*columns.shape[1:], q.shape[1])                     # B x (c*T_s) x 2T_t
        for g, view_columns in zip(grad_ce, columns):  # the views' columns are disjoint
            one_hot.scatter_(-1, view_columns[..., None], g[..., None])
        grad_s.baddbmm_(one_hot, q, alpha=-1)
        grad = torch.empty_like(logits)
        torch.div(grad_s.view(batch, crops, n_student, -1).transpose(0, 1), ctx.temp, out=grad)
        return grad, None, None, None, None


def position_match(student_boxes, teacher_boxes, student_grid, teacher_grid):
    """For every student region token and teacher view, the teacher token whose cell holds the student token's
    centre on the image, from the views' crop boxes (rows [top, left, height, width, flipped] in fractions of
    the image, ``datasets.transforms.DINOView.view_and_box``); tokens in row-major order on square grids.

    student_boxes c x B x 5, teacher_boxes 2 x B x 5 -> (match 2 x c x B x T_s teacher token indices,
    inside 2 x c x B x T_s: the student token's centre lies in that teacher view; elsewhere match is the nearest
    cell on the view's border)."""
    centres = (torch.arange(student_grid, device=student_boxes.device) + 0.5) / student_grid   # g_s, in the view
    s_top, s_left, s_height, s_width, s_flip = student_boxes[..., None].unbind(-2)          # each c x B x 1
    across = torch.where(s_flip > 0, 1 - centres, centres)                                  # c x B x g_s, in the crop
    token_y = s_top + centres * s_height                                                    # c x B x g_s, on the image
    token_x = s_left + across * s_width
    t_top, t_left, t_height, t_width, t_flip = teacher_boxes[:, None, :, :, None].unbind(-2)  # each 2 x 1 x B x 1
    y_in_teacher = (token_y - t_top) / t_height                                             # 2 x c x B x g_s
    x_in_teacher = (token_x - t_left) / t_width
    x_in_teacher = torch.where(t_flip > 0, 1 - x_in_teacher, x_in_teacher)
    inside_rows = (y_in_teacher >= 0) & (y_in_teacher < 1)
    inside_cols = (x_in_teacher >= 0) & (x_in_teacher < 1)
    row = (y_in_teacher * teacher_grid).floor().long().clamp(0, teacher_grid - 1)
    col = (x_in_teacher * teacher_grid).floor().long().clamp(0, teacher_grid - 1)
    match = row[..., :, None] * teacher_grid + col[..., None, :]                            # 2 x c x B x g_s x g_s
    inside = inside_rows[..., :, None] & inside_cols[..., None, :]
    return match.flatten(-2), inside.flatten(-2)


def square_side(n_tokens):
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"--region_matching position needs square token grids, not {n_tokens} tokens")
    return side


class DDINOLoss(_CenteredDistillationLoss):
    """View-level + region-level loss (EsViT).

    For each pair (teacher global view i, student view v != i): (1 - w) x the view-level cross-entropy plus
    w x the mean over the student's region tokens of the cross-entropy between the student token and
    the teacher token of view i whose *backbone feature* is most cosine-similar to the student token's;
    teacher region probabilities are centred by ``center_grid``. The loss is the mean over pairs of the
    batch mean. ``region_weight`` w is 0.5 in the original. ``region_teacher_temp``: the region head's teacher
    temperature after the warm-up (default: ``teacher_temp``, as the original).

    ``local_crops_number`` lists the number of local crops of each local size, in crop order (default:
    one size, ``ncrops - 2`` crops, as the original).

    ``region_matching``: 'feature' (the original) matches by backbone feature as above; 'position' matches each
    student token with the teacher token of view i that covers the same point of the image (from the views'
    crop boxes, the ``boxes`` argument of forward: B x V x 5, :func:`position_match`), and by feature where that
    point is outside view i.

    With mixup targets (V x B x B) the view term compares each student image with the same mixture of teacher
    distributions, and the region term of student image b is the mixture, with weights ``target[b, b]`` and
    ``target[b, B-1-b]`` (timm's partner; renormalised, so label smoothing's spread over other images is left
    out), of its region terms against teacher image b and teacher image B-1-b.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, local_crops_number=None, region_weight=0.5,
                 region_teacher_temp=None, region_matching='feature'):
        super().__init__(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                         nepochs, student_temp, center_momentum)
        if not 0 <= region_weight <= 1:
            raise ValueError(f"region_weight {region_weight} is not in [0, 1]")
        if region_matching not in ('feature', 'position'):
            raise ValueError(f"region_matching '{region_matching}' is not 'feature' or 'position'")
        self.region_matching = region_matching
        self.region_weight = region_weight
        self.region_temp_schedule = self.teacher_temp_schedule if region_teacher_temp is None else \
            teacher_temp_schedule(warmup_teacher_temp, region_teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.register_buffer('center_grid', torch.zeros(1, out_dim))
        local_crops_number = [ncrops - 2] if local_crops_number is None else [int(n) for n in local_crops_number]
        if sum(local_crops_number) != ncrops - 2:
            raise ValueError(f"local_crops_number {local_crops_number} does not add up to ncrops - 2 = {ncrops - 2}")
        self.crops_per_group = [2] + [n for n in local_crops_number if n > 0]

    @float32_loss
    def forward(self, student_output, teacher_output, epoch, mix_targets=None, boxes=None):
        s_cls_out, s_region_out, s_fea, s_npatch = student_output
        t_cls_out, t_region_out, t_fea, t_npatch = teacher_output
        crops_per_group = self.crops_per_group
        n_teacher_tokens = t_npatch[0]
        batch = t_cls_out.shape[0] // 2
        expected_rows = batch * sum(c * n for c, n in zip(crops_per_group, s_npatch))
        if len(s_npatch) != len(self.crops_per_group) or s_region_out.shape[0] != expected_rows:
            raise ValueError(f"student output has {len(s_npatch)} resolution groups and {s_region_out.shape[0]} "
                             f"region rows; expected crops per group {self.crops_per_group} with token counts "
                             f"{list(s_npatch)} x batch {batch} = {expected_rows} rows")
        by_position = self.region_matching == 'position'
        if by_position and (boxes is None or mix_targets is not None):
            raise ValueError("region_matching 'position' needs the views' crop boxes and no mixup targets")

        t_cls_probs = self.teacher_probs(t_cls_out, self.center, self.teacher_temp(epoch))
        view_ce = self.view_cross_entropy(s_cls_out, t_cls_probs, mix_targets)         # 2 x V

        C, K = t_fea.shape[-1], t_region_out.shape[-1]
        t_region_by_image = t_region_out.view(2, batch, n_teacher_tokens, K).transpose(0, 1)  # B x 2 x T_t x K
        t_region_probs = self.teacher_probs(t_region_by_image, self.center_grid,
                                            epoch_value(self.region_temp_schedule, epoch))  # contiguous, same shape
        t_region_mass = t_region_probs.sum(-1)                                         # B x 2 x T_t
        t_fea_unit = F.normalize(t_fea.detach().float(), dim=-1).view(2, batch, n_teacher_tokens, C)

        # per resolution group: for every student region token and teacher view, the teacher token of that
        # view and image whose backbone feature is most cosine-similar, and the cross-entropy against it
        teachers = [(t_region_probs, t_region_mass, t_fea_unit)]
        if mix_targets is not None:  # the mixing partner of image b is image B-1-b (timm's flip)
            teachers.append((t_region_probs.flip(0), t_region_mass.flip(0), t_fea_unit.flip(1)))
            self_share = mix_targets.diagonal(dim1=-2, dim2=-1).float()                  # V x B
            partner_share = mix_targets.flip(-1).diagonal(dim1=-2, dim2=-1).float()       # V x B
            shares = torch.stack([self_share, partner_share]) / (self_share + partner_share)  # 2 x V x B

        region_ce = []
        rows = [batch * c * n for c, n in zip(crops_per_group, s_npatch)]
        first_crop = 0
        for c, n, s_fea_group, s_region_group in zip(crops_per_group, s_npatch, s_fea.split(rows),
                                                     s_region_out.split(rows)):
            s_fea_unit = F.normalize(s_fea_group.detach().float(), dim=-1).view(c, batch, n, C)
            if by_position:  # 2 x c x B x T_s each: the teacher token at the student token's point, and whether
                # that point lies in the teacher view (no mixup here: the teachers are the image's own)
                at_point, inside = position_match(boxes[:, first_crop:first_crop + c].transpose(0, 1),
                                                  boxes[:, :2].transpose(0, 1), square_side(n),
                                                  square_side(n_teacher_tokens))
            group_ce = 0.
            for source, (probs, mass, fea_unit) in enumerate(teachers):
                sim = torch.einsum('cbsd,vbtd->vcbst', s_fea_unit, fea_unit)             # 2 x c x B x T_s x T_t
                match = sim.argmax(dim=-1)                                               # 2 x c x B x T_s
                if by_position:
                    match = torch.where(inside, at_point, match)
                ce = MatchedCrossEntropy.apply(s_region_group.view(c, batch, n, K), probs, mass, match,
                                               self.student_temp)                        # 2 x c x B x T_s
                if mix_targets is not None:
                    ce = ce * shares[source, first_crop:first_crop + c, :, None]
                group_ce = group_ce + ce
            region_ce.append(group_ce.flatten(2).mean(-1))                              # 2 x c
            first_crop += c
        region_ce = torch.cat(region_ce, dim=1)                                         # 2 x V

        w = self.region_weight
        loss = ((1 - w) * view_ce + w * region_ce)[self.pair_mask(view_ce.device)].mean()
        self.accumulate_center_stats(center=t_cls_out, center_grid=t_region_out)
        if self.monitor is not None:
            self.monitor.observe(view_ce, self.pair_mask(view_ce.device), t_cls_probs, region_ce, t_region_probs)
        return loss
