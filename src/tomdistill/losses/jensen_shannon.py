"""`jensen_shannon`: the Jensen–Shannon divergence between the student's next-token distribution p (whole
vocabulary) and the teacher's choice distribution q (on the action tokens) at the answer position.

Symmetric and bounded by log 2, unlike the soft cross-entropy it cannot be dominated by a teacher
probability the student puts almost no mass on. Outside the actions q = 0, so m = (p + q)/2 = p/2 there
and those tokens add (1 − Σ_A p)·log 2 to KL(p‖m): the whole vocabulary need not be summed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..settings_fields import setting
from .base import NAME_HELP, DistillationLoss, LossInputs


def jensen_shannon(logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """JS(p, q) in nats per row, averaged (or summed with `weights`, as `soft.soft_cross_entropy`).
    `token_ids`/`probs`: (rows, K), padded with probability 0 (a padded column adds nothing)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, token_ids)
    p = logp.exp()
    q = probs.float()
    # padded columns repeat a real token id with q = 0: count each token's p once
    real = q > 0
    logm = torch.log((p + q) / 2).where(real, logp - math.log(2.0))
    kl_p_on_actions = (p * (logp - logm)).where(real, torch.zeros_like(p)).sum(-1)
    mass_on_actions = (p * real).sum(-1).clamp(max=1.0)
    kl_p = kl_p_on_actions + (1.0 - mass_on_actions) * math.log(2.0)
    kl_q = (q * (torch.log(q.clamp_min(1e-12)) - logm)).where(real, torch.zeros_like(q)).sum(-1)
    rows = 0.5 * (kl_p + kl_q)
    return rows.mean() if weights is None else (rows * weights).sum()


@dataclass
class JensenShannonLoss(DistillationLoss):
    name: str = setting(NAME_HELP, default="jensen_shannon")
    targets: ClassVar[str] = "tomdistill.data.targets.distribution.DistributionTargets"

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        js = jensen_shannon(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, inputs.weights)
        return {"loss": js, "js": js}
