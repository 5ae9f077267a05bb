"""Token targets (loss=sft): one example per sampled teacher answer, the student learning the answer turn token by
token (`Answer: X`, with the motivation after it, before it, or not at all: `data.target`)."""
from __future__ import annotations

import torch

from ...losses.base import IGNORE_INDEX, LossInputs
from ...scenarios import ANSWER_PREFIX, MOTIVATION_PREFIX, UNPARSED, answer_text
from ..errors import DataError
from .base import TargetKind, next_token_labels


class TokenTargets(TargetKind):
    teacher_modes = ("generate", "score")  # the answers to learn; the scores for val/alignment

    def rows(self, records, scenario_targets, prompts, index, end_of_turn: str, source) -> list[dict]:
        rows, per_scenario = [], {}
        columns = records.select_columns(["game", "context", "action", "motivation", "action_probs"])
        for row in columns:
            if row["action_probs"] not in (None, "") or row["action"] == UNPARSED:
                continue  # score-mode records are soft targets, not samples
            key = (row["game"], row["context"])
            per_scenario[key] = per_scenario.get(key, 0) + 1
            if self.samples_per_scenario and per_scenario[key] > self.samples_per_scenario:
                continue
            if self.target == "motivation_answer" and row["motivation"]:
                before = f"{MOTIVATION_PREFIX} {row['motivation']}\n"  # reasoning first, then "Answer: X"
                completion = before + answer_text(row["action"])
            else:
                before = ""
                completion = answer_text(row["action"], row["motivation"] if self.target == "answer_motivation" else None)
            rows.append({"scenario": index[key], "prompt": prompts[key], "completion": completion + end_of_turn,
                         "answer_prefix": before + ANSWER_PREFIX})
        if not rows:
            raise DataError(f"teacher dataset {source}: loss={self.loss.name} needs sampled answers (generate mode), "
                            "but it holds only score-mode records; use loss=soft or add generated samples")
        return rows

    def check_tokenized(self, tokenized, max_length: int) -> None:
        too_long = sum(1 for labels in tokenized["labels"] if all(x == IGNORE_INDEX for x in labels))
        if too_long:
            raise DataError(f"data.max_length={max_length} cuts off the whole answer of {too_long} example(s): "
                            "raise data.max_length")

    def label_counts(self, train_examples: int, train_scenarios: int) -> dict[str, int]:
        return {"distributions": 0, "answers": train_examples}

    def positions(self, batch: dict) -> torch.Tensor:
        return next_token_labels(batch["labels"]) != IGNORE_INDEX

    def loss_inputs(self, batch: dict, logits: torch.Tensor, keep: torch.Tensor) -> LossInputs:
        return LossInputs(logits, token_targets=next_token_labels(batch["labels"])[keep])

    def accuracy_inputs(self, inputs: LossInputs, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"preds": logits.argmax(-1), "targets": inputs.token_targets}
