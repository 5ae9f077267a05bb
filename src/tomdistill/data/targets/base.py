"""`TargetKind`: what every kind of training target provides; `build_target_kind` picks the loss's kind.

The data side (the datamodule calls these while it sets up and loads) builds one row per training example,
checks what the kind cannot train on and plans the batches; the model side (the LightningModule calls these in
every step) keeps the logits of the positions the loss reads and fills its `LossInputs`.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ...losses import DistillationLoss
from ...losses.base import IGNORE_INDEX, LossInputs
from ..batching import LengthGroupedBatchSampler
from ..errors import DataError

# the assistant turn the student learns: the answer then its motivation (the paper's format), the
# motivation first (reasoning before the answer: the answer token then sees the reasoning), or the answer alone
TEXT_TARGETS = ("answer_motivation", "motivation_answer", "answer_only")
# the `data.*` keys that configure the kinds (the recipe hands them to `build_target_kind`, not to the datamodule)
TARGET_KEYS = ("target", "samples_per_scenario", "batch_size", "scenario_batch_size", "balance_games")


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts (IGNORE_INDEX at the last one)."""
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    return next_labels


class TargetKind:
    """One kind of training target; see `__init__.py`. Subclasses override the hooks their kind needs."""

    # the teacher datasets the kind reads: `score` (exact choice probabilities) and `generate` (sampled answers);
    # the recipe samples these of the oracle teacher when no teacher is given
    teacher_modes: ClassVar[tuple[str, ...]] = ("generate", "score")
    # one example per scenario (the prompt up to "Answer:"): batches hold few lengths, and the scenario batch is
    # global, split across the ranks
    one_prompt_per_scenario: ClassVar[bool] = False

    def __init__(self, loss: DistillationLoss, *, target: str = "answer_motivation",
                 samples_per_scenario: int | None = None, batch_size: int = 8, scenario_batch_size: int = 0,
                 balance_games: bool = False, augment_per_step: int = 0, augment_from_step: int = 0):
        if target not in TEXT_TARGETS:
            raise DataError(f"data.target must be one of {TEXT_TARGETS}, got {target!r}")
        if augment_per_step and not self.one_prompt_per_scenario:
            raise DataError(f"scenarios.augment.per_step={augment_per_step} takes a per-scenario loss (loss=soft, "
                            f"jensen_shannon), not loss={loss.name}; set it to 0")
        if balance_games and not (self.one_prompt_per_scenario and scenario_batch_size and not augment_per_step):
            raise DataError(f"data.balance_games=true deals scenario batches (data.scenario_batch_size > 0, now "
                            f"{scenario_batch_size}) of a per-scenario loss (loss=soft, jensen_shannon; now "
                            f"loss={loss.name}) without scenarios.augment.per_step (now {augment_per_step})")
        self.loss, self.target, self.samples_per_scenario = loss, target, samples_per_scenario
        self.batch_size, self.scenario_batch_size, self.balance_games = batch_size, scenario_batch_size, balance_games
        self.augment_per_step, self.augment_from_step = augment_per_step, augment_from_step

    # ---------------------------------------------------------------- data side
    def scored_scenarios(self, probs_records, splits) -> set[tuple[str, str]]:
        """Scenarios trained from score-mode records alone (none: the kind needs sampled answers)."""
        return set()

    def check_scenario(self, scenario, item, first_token_probs: Mapping[int, float], source, splits) -> None:
        """Refuse a scenario the kind cannot train on (`first_token_probs`: the teacher's mass on each distinct
        first token of the actions)."""

    def rows(self, records, scenario_targets, prompts, index, end_of_turn: str, source) -> list[dict]:
        """The training examples, `{"scenario", "prompt", "completion"[, "answer_prefix"]}` each."""
        raise NotImplementedError

    def check_tokenized(self, tokenized, max_length: int) -> None:
        """Refuse tokenized examples the kind cannot train on."""

    def train_batch_size(self, train_scenarios: int) -> int:
        """Examples per training batch (per device: `data.batch_size`)."""
        return self.batch_size

    def batch_sampler(self, lengths, row_scenarios, train_scenarios: int, *, shuffle: bool = True,
                      group_by_length: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                      accumulate: int = 1, splits=()):
        """The training batches (rank-aware): `row_scenarios[i]` is the Scenario of example i, `train_scenarios`
        how many scenarios are trained, `accumulate` the trainer's batches per optimiser step."""
        return LengthGroupedBatchSampler(lengths, self.train_batch_size(train_scenarios),
                                         shuffle=shuffle, group_by_length=group_by_length, seed=seed,
                                         num_replicas=num_replicas, rank=rank,
                                         split_batches=self.one_prompt_per_scenario)

    def label_counts(self, train_examples: int, train_scenarios: int) -> dict[str, int]:
        """How many teacher labels training reads: choice distributions and sampled answers."""
        raise NotImplementedError

    # ---------------------------------------------------------------- model side
    def positions(self, batch: dict) -> torch.Tensor:
        """(batch, length) True where the loss reads the logits."""
        raise NotImplementedError

    def loss_inputs(self, batch: dict, logits: torch.Tensor, keep: torch.Tensor) -> LossInputs:
        """The loss's inputs from the kept logits (row-major over `keep`)."""
        raise NotImplementedError

    def accuracy_inputs(self, inputs: LossInputs, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """`preds` and `targets` for next-token accuracy, where the kind has token targets."""
        return {}


def build_target_kind(loss, settings: Mapping | None = None, augment=None) -> TargetKind:
    """The loss's kind of target (`loss.targets`), with the `data.*` keys it reads (`TARGET_KEYS`) and the
    augmentation's batching (`scenarios.augment.per_step`, `from_step`)."""
    if not isinstance(loss, DistillationLoss):
        raise DataError(f"loss: expected a tomdistill.losses.DistillationLoss (conf/loss/*.yaml), got {loss!r}")
    settings = {k: v for k, v in dict(settings or {}).items() if k in TARGET_KEYS}
    per_step = int(getattr(augment, "per_step", 0) or 0)
    from_step = int(getattr(augment, "from_step", 0) or 0)
    kind = loss.target_kind(**settings, augment_per_step=per_step, augment_from_step=from_step)
    if not isinstance(kind, TargetKind):
        raise DataError(f"loss={loss.name}: its targets {loss.targets!r} is not a tomdistill.data.targets.TargetKind")
    return kind
