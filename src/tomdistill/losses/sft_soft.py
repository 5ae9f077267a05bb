"""`sft_soft`: `sft + soft_weight · soft`, from one forward pass over the SFT examples (the answer
position lies inside each sampled answer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, DistillationLoss, LossInputs
from .soft import soft_cross_entropy


@dataclass
class SFTPlusSoftLoss(DistillationLoss):
    name: str = "sft_soft"
    soft_weight: float = 1.0
    temperature: float = 1.0
    uses_tokens: ClassVar[bool] = True
    uses_distribution: ClassVar[bool] = True

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        sft = F.cross_entropy(inputs.logits.float(), inputs.token_targets, ignore_index=IGNORE_INDEX)
        soft = soft_cross_entropy(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, self.temperature,
                                  inputs.weights)
        return {"loss": sft + self.soft_weight * soft, "sft": sft, "soft": soft}
