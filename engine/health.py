"""Training-health signals: what shows a collapsing run, from tensors the loss already has (no extra forward).

Collapse is the first thing that goes wrong on new data: the teacher's distribution becomes uniform (entropy
log(out_dim); the loss sticks at ln(out_dim)) or one prototype takes every image (entropy 0); in both cases the
student copies it and the KL between them goes to 0 (DINO, Caron et al. 2021, section 5.3).

    monitor = HealthMonitor(out_dim)       # the trainer sets loss_fn.monitor = monitor
    # each loss forward calls monitor.observe(...) with its per-pair cross-entropies and teacher probabilities
    signals = monitor.end_step(loss_fn)    # once per optimizer step: {name: float}, averaged over micro-batches

Signals (``view`` = the [CLS] / pooled head, ``region`` = the region head of V+R):
- ``view_loss``, ``region_loss``: the two terms of the loss, each averaged over the (teacher, student) view pairs
  (V+R's loss is their mean; a view-only run's loss is ``view_loss``);
- ``teacher_entropy_view`` / ``_region``: the mean entropy (nats) of the teacher's centred, sharpened
  distribution over the ``out_dim`` prototypes, between 0 and ``log(out_dim)`` (``entropy_max``);
- ``kl_view``: KL(teacher || student) of the view head, the view cross-entropy minus the teacher's entropy;
- ``center_norm``, ``center_grid_norm``: the L2 norms of the loss's centers;
- ``distinct_view`` / ``_region``: the distinct most probable prototypes of the batch's teacher rows over the
  rows (1: every row picks its own; 1/rows: all pick one).
"""
import math

import torch

COLLAPSE_LOW, COLLAPSE_HIGH = 0.02, 0.98   # teacher entropy / log(out_dim) below or above: a collapsed head
COLLAPSE_STEPS = 100                       # ... for this many optimizer steps in a row


def mean_entropy(probs):
    """Mean entropy (nats) of the distributions in the last dimension of ``probs`` (0 log 0 = 0). ... x K -> 0-d"""
    return torch.special.entr(probs).sum(-1).mean()


def distinct_fraction(probs):
    """Distinct most-probable prototypes over rows: 1 when every row picks its own, 1/rows when all pick one
    (marked in a K-long vector: no host sync, unlike torch.unique). ... x K -> 0-d"""
    top = probs.argmax(-1).flatten()                                                   # rows
    picked = torch.zeros(probs.shape[-1], device=probs.device).index_fill_(0, top, 1.)  # K
    return picked.sum() / top.numel()


class HealthMonitor:
    """Collects the signals of each loss forward (:meth:`observe`), averages them per optimizer step
    (:meth:`end_step`) and warns once when a head's teacher entropy stays within 2 % of 0 or of log(out_dim) for
    ``patience`` steps in a row; training goes on."""

    def __init__(self, out_dim, patience=COLLAPSE_STEPS, warn=print):
        self.entropy_max = math.log(out_dim)
        self.patience, self.warn = patience, warn
        self._sums, self._forwards = {}, 0
        self.stretch = {}       # head -> steps in a row at a collapsed entropy
        self.warned = False

    @torch.no_grad()
    def observe(self, view_ce, pair_mask, teacher_view_probs, region_ce=None, teacher_region_probs=None):
        """One loss forward. ``view_ce`` / ``region_ce``: 2 x V batch-mean cross-entropies (teacher view i,
        student view v); ``pair_mask``: 2 x V, the pairs the loss averages; ``teacher_view_probs``: (2*B) x K,
        the first B rows of global view 0; ``teacher_region_probs``: ... x K."""
        teacher_views = teacher_view_probs.view(2, -1, teacher_view_probs.shape[-1])           # 2 x B x K
        entropy_per_view = torch.special.entr(teacher_views).sum(-1).mean(-1)                  # 2
        signals = {'view_loss': view_ce[pair_mask].mean(),
                   'teacher_entropy_view': entropy_per_view.mean(),
                   'kl_view': (view_ce - entropy_per_view[:, None])[pair_mask].mean(),
                   'distinct_view': distinct_fraction(teacher_view_probs)}
        if region_ce is not None:
            signals.update(region_loss=region_ce[pair_mask].mean(),
                           teacher_entropy_region=mean_entropy(teacher_region_probs),
                           distinct_region=distinct_fraction(teacher_region_probs))
        for name, value in signals.items():
            self._sums[name] = self._sums.get(name, 0.) + value.float()
        self._forwards += 1

    @torch.no_grad()
    def end_step(self, loss_fn):
        """{signal: float} of the step's forwards (one host sync), the centers' norms and ``entropy_max``; checks
        for collapse. Empty when no forward was observed."""
        if not self._forwards:
            return {}
        names = list(self._sums)
        centers = {f'{name}_norm': buffer.norm() for name, buffer in loss_fn.named_buffers()
                   if name in ('center', 'center_grid')}
        values = torch.stack([self._sums[n] / self._forwards for n in names] + list(centers.values())).tolist()
        self._sums, self._forwards = {}, 0
        signals = dict(zip(names + list(centers), values), entropy_max=self.entropy_max)
        self.check_collapse(signals)
        return signals

    def check_collapse(self, signals):
        for head in ('view', 'region'):
            entropy = signals.get(f'teacher_entropy_{head}')
            if entropy is None:
                continue
            ratio = entropy / self.entropy_max
            collapsed = ratio < COLLAPSE_LOW or ratio > COLLAPSE_HIGH
            self.stretch[head] = self.stretch.get(head, 0) + 1 if collapsed else 0
            if self.stretch[head] >= self.patience and not self.warned:
                self.warned = True
                if ratio > COLLAPSE_HIGH:
                    kind, advice = ('uniform: every prototype equally likely, the loss stays near log(out_dim)',
                                    'a lower --teacher_temp (sharper teacher) or a shorter --warmup_teacher_temp_epochs')
                else:
                    kind, advice = ('one prototype takes every image', 'a higher --teacher_temp')
                self.warn(f"WARNING: the run looks collapsed: the teacher's {head} entropy has been "
                          f"{entropy:.3g} of at most {self.entropy_max:.3g} nats for {self.stretch[head]} steps "
                          f"({kind}). Training goes on; to try: {advice}, a higher --momentum_teacher (e.g. "
                          f"0.996), a lower --lr; the health/* curves in TensorBoard show the course.")


def health_summary(signals):
    """One line of the epoch's averaged signals."""
    parts = [f"teacher entropy {signals['teacher_entropy_view']:.3g}"
             + (f" (view), {signals['teacher_entropy_region']:.3g} (region)" if 'teacher_entropy_region' in signals
                else '') + f" of max {signals['entropy_max']:.3g}",
             f"KL(teacher||student) {signals['kl_view']:.3g}",
             f"distinct prototypes {signals['distinct_view']:.0%}"]
    if 'region_loss' in signals:
        parts.insert(0, f"view loss {signals['view_loss']:.4g}, region loss {signals['region_loss']:.4g}")
    return '; '.join(parts)
