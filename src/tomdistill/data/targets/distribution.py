"""Distribution targets (loss=soft, jensen_shannon): one example per scenario, the prompt up to `Answer:`, and the
teacher's choice distribution over the actions' first tokens at that position (the exact marginal there).

The scenario batch is global (`data.scenario_batch_size`, 0 = every training scenario), split across the ranks;
with `scenarios.augment.per_step` every other training scenario is in each step and the payoff variants join in
turns, and with `data.balance_games` each batch is dealt the games in turn (batching.AnchoredBatchSampler)."""
from __future__ import annotations

import torch

from ...losses.base import LossInputs
from ...scenarios import AUGMENT_SPLIT, ANSWER_PREFIX
from ..batching import AnchoredBatchSampler
from ..errors import DataError
from .base import TargetKind


def mark_answer_positions(batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """`keep` with each row's answer position (`answer_pos`, -1 where none) set."""
    answer_pos = batch["answer_pos"]
    rows = torch.arange(answer_pos.shape[0], device=answer_pos.device)
    has_answer = answer_pos >= 0
    keep[rows[has_answer], answer_pos[has_answer]] = True
    return keep


def add_distribution_inputs(inputs: LossInputs, batch: dict, logits: torch.Tensor, keep: torch.Tensor) -> LossInputs:
    """The answer positions' logits and the teacher's first-token distribution there (with the shard weights of a
    global batch split across ranks)."""
    kept_rows, kept_cols = keep.nonzero(as_tuple=True)
    at_answer = kept_cols == batch["answer_pos"][kept_rows]
    answer_rows = kept_rows[at_answer]
    inputs.answer_logits, inputs.answer_mask = logits[at_answer], at_answer
    inputs.soft_ids, inputs.soft_probs = batch["soft_ids"][answer_rows], batch["soft_probs"][answer_rows]
    inputs.weights = batch["weight"][answer_rows] if "weight" in batch else None
    return inputs


def check_distinct_first_tokens(loss_name: str, scenario, item, first_token_probs, source, splits) -> None:
    """A target on the answer's first token needs actions that start with distinct tokens: where they share it
    (every public-goods amount starts with the same space token) the target would be "emit that token"."""
    if len(first_token_probs) < len(scenario.game.actions) or item.open_ended:
        raise DataError(
            f"teacher dataset {source}: scenario {scenario.id} has multi-token answers {list(scenario.game.actions)} "
            f"that share their first token, so loss={loss_name} (a target on the answer's first token) cannot "
            f"tell them apart. Train it with loss=sft, or leave its split out of data.splits (now {list(splits)})"
        )


def check_answer_positions(loss_name: str, tokenized) -> None:
    if any(p < 0 for p in tokenized["answer_pos"]):
        raise DataError(f"the tokenizer does not keep '{ANSWER_PREFIX}' as its own tokens after the prompt, "
                        f"so loss={loss_name} cannot find the answer position")


class DistributionTargets(TargetKind):
    teacher_modes = ("score",)
    one_prompt_per_scenario = True

    def __init__(self, loss, **settings):
        super().__init__(loss, **settings)
        if self.augment_per_step and self.scenario_batch_size:
            raise DataError(f"scenarios.augment.per_step={self.augment_per_step} and data.scenario_batch_size="
                            f"{self.scenario_batch_size}: choose one way to batch scenarios (set the other to 0)")

    def scored_scenarios(self, probs_records, splits) -> set[tuple[str, str]]:
        # only the scores are needed: scenarios scored but never sampled (e.g. payoff variants a 70b teacher
        # labelled in score mode alone) train too
        if probs_records is None:
            return set()
        scored = probs_records.filter(lambda split: split in splits, input_columns="split")
        return {(g, c) for g, c in zip(scored["game"], scored["context"])}

    def check_scenario(self, scenario, item, first_token_probs, source, splits) -> None:
        check_distinct_first_tokens(self.loss.name, scenario, item, first_token_probs, source, splits)

    def rows(self, records, scenario_targets, prompts, index, end_of_turn: str, source) -> list[dict]:
        return [{"scenario": index[t.scenario.key], "prompt": t.item.prompt, "completion": ""}
                for t in scenario_targets]

    def check_tokenized(self, tokenized, max_length: int) -> None:
        check_answer_positions(self.loss.name, tokenized)

    def train_batch_size(self, train_scenarios: int) -> int:
        """Global: `data.scenario_batch_size` scenarios (0 = every training scenario), split across the ranks."""
        return self.scenario_batch_size or max(train_scenarios, 1)

    def batch_sampler(self, lengths, row_scenarios, train_scenarios: int, *, shuffle: bool = True,
                      group_by_length: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                      accumulate: int = 1, splits=()):
        if self.balance_games:
            # by length, a batch's games are whichever share a prompt length (SmolLM2: one context's four)
            by_game = {}
            for i, scenario in enumerate(row_scenarios):
                by_game.setdefault(scenario.game.base or scenario.game.name, []).append(i)
            return AnchoredBatchSampler(lengths, [], list(by_game.values()), self.scenario_batch_size, seed=seed,
                                        num_replicas=num_replicas, rank=rank)
        if not self.augment_per_step:
            return super().batch_sampler(lengths, row_scenarios, train_scenarios, shuffle=shuffle,
                                         group_by_length=group_by_length, seed=seed, num_replicas=num_replicas,
                                         rank=rank, accumulate=accumulate, splits=splits)
        # every trained scenario of the other splits in each step, the augment split's variants `per_step` at a
        # time, grouped by the game they vary and their context
        anchors, groups = [], {}
        for i, scenario in enumerate(row_scenarios):
            if scenario.split == AUGMENT_SPLIT:
                groups.setdefault((scenario.game.base or scenario.game.name, scenario.context.name), []).append(i)
            else:
                anchors.append(i)
        if not groups:
            raise DataError(f"scenarios.augment.per_step={self.augment_per_step}, but no scenario of the "
                            f"{AUGMENT_SPLIT!r} split is trained (data.splits={list(splits)}): add {AUGMENT_SPLIT} "
                            "to data.splits and set scenarios.augment")
        return AnchoredBatchSampler(lengths, anchors, list(groups.values()), self.augment_per_step,
                                    seed=seed, num_replicas=num_replicas, rank=rank,
                                    pool_from_batch=self.augment_from_step * accumulate)

    def label_counts(self, train_examples: int, train_scenarios: int) -> dict[str, int]:
        return {"distributions": train_scenarios, "answers": 0}

    def positions(self, batch: dict) -> torch.Tensor:
        return mark_answer_positions(batch, torch.zeros_like(batch["labels"], dtype=torch.bool))

    def loss_inputs(self, batch: dict, logits: torch.Tensor, keep: torch.Tensor) -> LossInputs:
        return add_distribution_inputs(LossInputs(logits), batch, logits, keep)
