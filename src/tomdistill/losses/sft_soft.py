"""`sft_soft`: `sft + soft_weight · soft`, from one forward pass over the SFT examples (the answer
position lies inside each sampled answer).

`sft_answer_token: false` leaves the sampled action token out of the SFT part: the answer position then learns
the teacher's distribution from the soft part alone, and SFT trains the motivation (which reads the payoffs)
without pulling each scenario toward the one action sampled for it (`data.samples_per_scenario=1`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..settings_fields import setting
from .base import IGNORE_INDEX, NAME_HELP, DistillationLoss, LossInputs
from .soft import soft_cross_entropy


@dataclass
class SFTPlusSoftLoss(DistillationLoss):
    name: str = setting(NAME_HELP, default="sft_soft")
    soft_weight: float = setting("the soft part's weight: sft + soft_weight × soft, ≥ 0", default=1.0)
    temperature: float = setting("the soft part's temperature, > 0; > 1 softens teacher and student alike (the "
                                 "part scaled by T²)", default=1.0)
    sft_answer_token: bool = setting("false: the sampled action token is left to the soft part (SFT trains the "
                                     "motivation only)", default=True)
    targets: ClassVar[str] = "tomdistill.data.targets.tokens_with_distribution.TokensWithDistributionTargets"

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        targets = inputs.token_targets
        if not self.sft_answer_token:
            targets = targets.masked_fill(inputs.answer_mask, IGNORE_INDEX)
        sft = F.cross_entropy(inputs.logits.float(), targets, ignore_index=IGNORE_INDEX)
        soft = soft_cross_entropy(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, self.temperature,
                                  inputs.weights)
        return {"loss": sft + self.soft_weight * soft, "sft": sft, "soft": soft}
