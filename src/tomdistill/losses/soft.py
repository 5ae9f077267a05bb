"""`soft`: soft labels. At the answer position (after `Answer:`), cross-entropy of the student's
next-token distribution over the WHOLE vocabulary toward the teacher's choice probabilities placed on
the action tokens. Whole-vocabulary (not renormalised over the actions) keeps the probability mass on
the answer tokens. With temperature T both sides are softened and the loss scaled by T²."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import DistillationLoss, LossInputs


def soft_cross_entropy(logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor,
                       temperature: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of −Σ_k q_k log p(token_k), p over the whole vocabulary.

    `token_ids`/`probs`: (rows, K), padded with probability 0. With temperature T the teacher's
    distribution becomes q^(1/T) (renormalised), the student's softmax(z/T), and the loss is × T².
    With `weights` (rows,) the rows are summed with those weights instead of averaged: a rank's shard
    of a global batch, weighted so that the ranks' average is the global batch's mean.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, token_ids)
    if temperature != 1.0:
        q = torch.where(probs > 0, probs.clamp_min(1e-12) ** (1.0 / temperature), torch.zeros_like(probs))
        probs = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
    rows = -(probs * chosen).sum(-1)
    loss = rows.mean() if weights is None else (rows * weights).sum()
    return loss * temperature**2


@dataclass
class SoftLabelLoss(DistillationLoss):
    name: str = "soft"
    temperature: float = 1.0
    per_scenario: ClassVar[bool] = True
    uses_distribution: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        soft = soft_cross_entropy(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, self.temperature,
                                  inputs.weights)
        return {"loss": soft, "soft": soft}
