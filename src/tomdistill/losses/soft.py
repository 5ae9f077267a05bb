"""`soft`: soft labels. At the answer position (after `Answer:`), cross-entropy of the student's
next-token distribution over the WHOLE vocabulary toward the teacher's choice probabilities placed on
the action tokens. Whole-vocabulary (not renormalised over the actions) keeps the probability mass on
the answer tokens. With temperature T both sides are softened and the loss scaled by T².

The whole-vocabulary cross-entropy is exactly two parts, −Σ_k q_k log p_k = −Σ_k q_k log(p_k / P_A) − log P_A with
P_A the student's mass on the actions: the choice among the actions and the mass on them. `mass_temperature`
softens the second part with its own temperature (null: the same T, the plain loss above), so a hot choice part
can be measured without a hot mass part (docs/findings.md: temperature 2 left the average and took public goods
off its format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..settings_fields import setting
from .base import NAME_HELP, DistillationLoss, LossInputs


def soft_cross_entropy(logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor,
                       temperature: float = 1.0, weights: torch.Tensor | None = None,
                       mass_temperature: float | None = None) -> torch.Tensor:
    """Mean over rows of −Σ_k q_k log p(token_k), p over the whole vocabulary.

    `token_ids`/`probs`: (rows, K), padded with probability 0. With temperature T the teacher's
    distribution becomes q^(1/T) (renormalised), the student's softmax(z/T), and the loss is × T².
    With `weights` (rows,) the rows are summed with those weights instead of averaged: a rank's shard
    of a global batch, weighted so that the ranks' average is the global batch's mean.
    With `mass_temperature` Tm (≠ T): T² · (the choice part at T) + Tm² · (−log P_A at Tm), see the module's doc.
    """
    if mass_temperature is not None and mass_temperature != temperature:
        return (choice_cross_entropy(logits, token_ids, probs, temperature, weights) * temperature**2
                + action_mass_loss(logits, token_ids, mass_temperature, weights) * mass_temperature**2)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, token_ids)
    rows = -(_soften(probs, temperature) * chosen).sum(-1)
    return _reduce(rows, weights) * temperature**2


def choice_cross_entropy(logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor,
                         temperature: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ_k q_k log(p_k / P_A) at temperature T (not scaled by T²): the student renormalised over the actions."""
    chosen = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, token_ids)
    chosen = chosen - _log_action_mass(chosen, token_ids).unsqueeze(-1)
    return _reduce(-(_soften(probs, temperature) * chosen).sum(-1), weights)


def action_mass_loss(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """−log P_A at temperature T (not scaled by T²): the mass part; choice part + mass part = the plain loss."""
    chosen = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, token_ids)
    return _reduce(-_log_action_mass(chosen, token_ids), weights)


def _log_action_mass(logp: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log P_A per row from the actions' log-probabilities `logp` (rows, K); each action token counted once (padded
    columns repeat a real id)."""
    repeats = (token_ids.unsqueeze(-1) == token_ids.unsqueeze(-2)).tril(-1).any(-1)  # an id seen in an earlier column
    return torch.logsumexp(logp.masked_fill(repeats, float("-inf")), dim=-1)


def _soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's q^(1/T), renormalised (q itself at T = 1)."""
    if temperature == 1.0:
        return probs
    q = torch.where(probs > 0, probs.clamp_min(1e-12) ** (1.0 / temperature), torch.zeros_like(probs))
    return q / q.sum(-1, keepdim=True).clamp_min(1e-12)


def _reduce(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return rows.mean() if weights is None else (rows * weights).sum()


@dataclass
class SoftLabelLoss(DistillationLoss):
    name: str = setting(NAME_HELP, default="soft")
    temperature: float = setting("> 0; > 1 softens teacher and student alike (the loss scaled by T²)", default=1.0)
    mass_temperature: float | None = setting("the mass-on-the-actions part's own temperature, > 0 (null: "
                                             "temperature); see losses/soft.py", default=None)
    targets: ClassVar[str] = "tomdistill.data.targets.distribution.DistributionTargets"

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        soft = soft_cross_entropy(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, self.temperature,
                                  inputs.weights, self.mass_temperature)
        return {"loss": soft, "soft": soft}
