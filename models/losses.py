"""EsViT losses: the view-level DINO loss and the view + region-level loss.

Both follow the original's interface: ``Loss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9)`` and
``loss(student_output, teacher_output, epoch)``. Unlike the original, crops of several local sizes
are supported (``local_crops_number``), the pairs are computed batched instead of in a Python loop,
and the centers are all-reduced only when a process group exists (so a plain CPU run works).
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _CenteredDistillationLoss(nn.Module):
    """Teacher temperature schedule and EMA-centering shared by both losses."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer('center', torch.zeros(1, out_dim))
        # a linear warm-up of the teacher temperature: too high a temperature early makes training unstable
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 1)) * teacher_temp,
        ))

    def teacher_temp(self, epoch):
        return float(self.teacher_temp_schedule[min(int(epoch), len(self.teacher_temp_schedule) - 1)])

    def teacher_probs(self, teacher_out, center, epoch):
        """softmax((t - center) / tau_t), no gradient. ... x K -> ... x K"""
        return F.softmax((teacher_out.detach().float() - center) / self.teacher_temp(epoch), dim=-1)

    def view_cross_entropy(self, student_cls_out, teacher_cls_probs):
        """[2 x ncrops] matrix of batch-mean cross-entropies, teacher view i against student view v.

        student_cls_out: (ncrops*B) x K raw head outputs; teacher_cls_probs: (2*B) x K probabilities.
        """
        student_logp = F.log_softmax(student_cls_out.float() / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, -1, student_logp.shape[-1])   # V x B x K
        teacher_probs = teacher_cls_probs.view(2, -1, teacher_cls_probs.shape[-1])  # 2 x B x K
        return -torch.einsum('tbk,vbk->tv', teacher_probs, student_logp) / student_logp.shape[1]

    def pair_mask(self, device):
        """[2 x ncrops] boolean: True for (teacher view i, student view v) with v != i."""
        mask = torch.ones(2, self.ncrops, dtype=torch.bool, device=device)
        mask[0, 0] = mask[1, 1] = False
        return mask

    @staticmethod
    @torch.no_grad()
    def batch_mean(rows):
        """Mean over rows (all ranks when a process group exists). R x K -> 1 x K"""
        total = rows.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(rows.shape[0])], device=rows.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        return total / count

    @torch.no_grad()
    def ema_(self, center, batch_center):
        center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class DINOLoss(_CenteredDistillationLoss):
    """View-level loss: cross-entropy between the teacher's centred, sharpened distribution of each global
    view and the student's distribution of every other view, averaged over pairs."""

    def forward(self, student_output, teacher_output, epoch):
        teacher_probs = self.teacher_probs(teacher_output, self.center, epoch)
        ce = self.view_cross_entropy(student_output, teacher_probs)  # 2 x V
        loss = ce[self.pair_mask(ce.device)].mean()
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.ema_(self.center, self.batch_mean(teacher_output))


class DDINOLoss(_CenteredDistillationLoss):
    """View-level + region-level loss (EsViT).

    For each pair (teacher global view i, student view v != i): 0.5 x the view-level cross-entropy plus
    0.5 x the mean over the student's region tokens of the cross-entropy between the student token and
    the teacher token of view i whose *backbone feature* is most cosine-similar to the student token's;
    teacher region probabilities are centred by ``center_grid``. The loss is the mean over pairs of the
    batch mean.

    ``local_crops_number`` lists the number of local crops of each local size, in crop order (default:
    one size, ``ncrops - 2`` crops, as the original).
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, local_crops_number=None):
        super().__init__(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                         nepochs, student_temp, center_momentum)
        self.register_buffer('center_grid', torch.zeros(1, out_dim))
        local_crops_number = [ncrops - 2] if local_crops_number is None else [int(n) for n in local_crops_number]
        if sum(local_crops_number) != ncrops - 2:
            raise ValueError(f"local_crops_number {local_crops_number} does not add up to ncrops - 2 = {ncrops - 2}")
        self.crops_per_group = [2] + [n for n in local_crops_number if n > 0]

    def forward(self, student_output, teacher_output, epoch):
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

        t_cls_probs = self.teacher_probs(t_cls_out, self.center, epoch)
        view_ce = self.view_cross_entropy(s_cls_out, t_cls_probs)                      # 2 x V

        K, C = t_region_out.shape[-1], t_fea.shape[-1]
        t_region_probs = self.teacher_probs(t_region_out, self.center_grid, epoch)
        t_region_probs = t_region_probs.view(2, batch, n_teacher_tokens, K)           # 2 x B x T_t x K
        t_fea_unit = F.normalize(t_fea.detach().float(), dim=-1).view(2, batch, n_teacher_tokens, C)

        region_ce = []
        rows = [batch * c * n for c, n in zip(crops_per_group, s_npatch)]
        for c, n, s_region, s_fea_group in zip(crops_per_group, s_npatch, s_region_out.split(rows), s_fea.split(rows)):
            s_logp = F.log_softmax(s_region.float() / self.student_temp, dim=-1).view(c, batch, n, K)  # c x B x T_s x K
            s_fea_unit = F.normalize(s_fea_group.detach().float(), dim=-1).view(c, batch, n, C)
            per_teacher_view = []
            for t_probs, t_unit in zip(t_region_probs, t_fea_unit):                      # B x T_t x K, B x T_t x C
                sim = torch.einsum('cbsd,btd->cbst', s_fea_unit, t_unit)                # c x B x T_s x T_t
                match = sim.argmax(dim=-1)                                              # c x B x T_s
                matched_probs = torch.gather(                                           # c x B x T_s x K
                    t_probs.expand(c, -1, -1, -1), 2, match.unsqueeze(-1).expand(-1, -1, -1, K))
                ce = -(matched_probs * s_logp).sum(-1).mean(dim=(1, 2))                 # c
                per_teacher_view.append(ce)
            region_ce.append(torch.stack(per_teacher_view))                            # 2 x c
        region_ce = torch.cat(region_ce, dim=1)                                         # 2 x V

        loss = (0.5 * view_ce + 0.5 * region_ce)[self.pair_mask(view_ce.device)].mean()
        self.update_center(t_cls_out, t_region_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output, teacher_grid_output):
        self.ema_(self.center, self.batch_mean(teacher_output))
        self.ema_(self.center_grid, self.batch_mean(teacher_grid_output))
