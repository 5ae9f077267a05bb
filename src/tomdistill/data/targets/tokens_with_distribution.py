"""Token and distribution targets from one forward pass (loss=sft_soft): the sampled answers token by token, and
the teacher's choice distribution at the answer position inside each of them."""
from __future__ import annotations

import torch

from ...losses.base import LossInputs
from ..errors import DataError
from .distribution import (add_distribution_inputs, check_answer_positions, check_distinct_first_tokens,
                           mark_answer_positions)
from .tokens import TokenTargets


class TokensWithDistributionTargets(TokenTargets):
    def __init__(self, loss, **settings):
        super().__init__(loss, **settings)
        if self.target == "motivation_answer":
            # after the motivation the answer is already determined by the text the student just read, so a
            # soft target there teaches nothing about the scenario, and evaluation scores `Answer:` right after
            # the prompt, a position this target never trains
            raise DataError(f"loss={loss.name} with data.target=motivation_answer: the soft target would sit after a "
                            "motivation that already names the action. Use data.target=answer_motivation or "
                            f"answer_only with {loss.name}, or loss=sft for reasoning-first training")

    def check_scenario(self, scenario, item, first_token_probs, source, splits) -> None:
        check_distinct_first_tokens(self.loss.name, scenario, item, first_token_probs, source, splits)

    def check_tokenized(self, tokenized, max_length: int) -> None:
        super().check_tokenized(tokenized, max_length)
        check_answer_positions(self.loss.name, tokenized)

    def label_counts(self, train_examples: int, train_scenarios: int) -> dict[str, int]:
        return {"distributions": train_scenarios, "answers": train_examples}

    def positions(self, batch: dict) -> torch.Tensor:
        return mark_answer_positions(batch, super().positions(batch))

    def loss_inputs(self, batch: dict, logits: torch.Tensor, keep: torch.Tensor) -> LossInputs:
        return add_distribution_inputs(super().loss_inputs(batch, logits, keep), batch, logits, keep)
