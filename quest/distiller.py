"""The objective: a frozen teacher, its codebooks, the resolved QuEST levels and the [distill] section.

`Distiller(...)(student, images, labels)` computes one micro-batch's loss and its named parts
(ce, quest / quest_l, kd); `diagnostics(student)` reports the codebook diagnostics of the last call
for every level (docs/method.md §1). The loss math itself lives in quest.losses as pure functions.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .losses import (
    flatten_locations,
    kd_loss,
    quest_loss,
    soft_assign,
    total_loss,
    word_diagnostics,
)
from .recipe import Distill, Level


class Distiller:
    def __init__(self, teacher, codebooks: list, levels: list[Level], cfg: Distill, autocast=None):
        """teacher: a FrozenTeacher or None (method 'none'); codebooks and levels: one per QuEST level
        (empty for 'none' and 'kd'); autocast: a context factory (the accelerator's)."""
        self.teacher, self.codebooks, self.levels, self.cfg = teacher, codebooks, levels, cfg
        self.autocast = autocast or nullcontext
        self._last: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def __call__(self, student, images: torch.Tensor, labels: torch.Tensor):
        """(loss, named parts): a differentiable loss for one micro-batch, parts on device."""
        teacher_logits, targets = None, []
        if self.teacher is not None:
            with torch.no_grad(), self.autocast():
                teacher_logits, maps = self.teacher(images)
            targets = [
                soft_assign(flatten_locations(m), cb.centroids, lv.beta, cb.sq_norms)
                for m, cb, lv in zip(maps, self.codebooks, self.levels)
            ]
        with self.autocast():
            logits, scores = student(images)
        kd = None
        if self.cfg.method in ("kd", "quest+kd"):
            kd = kd_loss(logits, teacher_logits, self.cfg.kd_temperature)
        self._last = ([s.detach() for s in scores], targets)
        return total_loss(
            logits,
            labels,
            ce_weight=self.cfg.ce_weight,
            quest_parts=[quest_loss(s, t) for s, t in zip(scores, targets)],
            level_weights=[lv.weight for lv in self.levels],
            quest_weight=self.cfg.quest_weight,
            kd=kd,
            kd_weight=self.cfg.kd_weight,
        )

    def diagnostics(self, heads) -> dict[str, torch.Tensor]:
        """Word agreement, target perplexity, max target probability and γ of the last micro-batch,
        for every level: level 0 without a suffix, level l as 'agreement_l' etc. (tensors)."""
        out: dict[str, torch.Tensor] = {}
        for i, (scores, targets) in enumerate(zip(*self._last)):
            suffix = f"_{i}" if i else ""
            values = {**word_diagnostics(scores, targets), "gamma": heads[i].gamma.detach()}
            out.update({f"{k}{suffix}": v.float() for k, v in values.items()})
        return out
