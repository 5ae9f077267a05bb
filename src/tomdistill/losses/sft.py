"""`sft`: the paper's method, next-token cross-entropy on the teacher's answer (+ motivation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..settings_fields import setting
from .base import IGNORE_INDEX, NAME_HELP, DistillationLoss, LossInputs


@dataclass
class SFTLoss(DistillationLoss):
    name: str = setting(NAME_HELP, default="sft")
    targets: ClassVar[str] = "tomdistill.data.targets.tokens.TokenTargets"

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        sft = F.cross_entropy(inputs.logits.float(), inputs.token_targets, ignore_index=IGNORE_INDEX)
        return {"loss": sft, "sft": sft}
