"""The schema of the `data` group: the teacher datasets and how the student's training examples are batched.

Read by the training recipe (training.py: `build_datamodule`, which hands `oracle` to the sampling stage and the
rest to the datamodule's `_target_`), the datamodule (data/datamodule.py) and the target kinds (data/targets/).
The defaults live in conf/data/default.yaml; these classes say what each key is and which values it takes, and
refuse the others with one line naming the key. `data.oracle.sampler` is the sampler group's own schema
(sampling/settings.py), checked by `config_schema.check_config` where the sampling stage's rules are: data/
imports nothing from sampling/ (docs/design.md, "Data flow").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..settings_fields import check_choices, expect, is_whole, setting
from ..scenarios.schema import AUGMENT_SPLIT, SPLITS
from .targets import TEXT_TARGETS

TRAINING_SPLITS = (*SPLITS, AUGMENT_SPLIT)  # the catalogue's splits (scenarios/catalogue.py) and the augment split


@dataclass(frozen=True)
class OracleTeacherSettings:
    """The oracle teacher train.py samples in-process when `data.teacher` is null: `sample.py sampler=oracle
    role=teacher` with this seed and sampler (sampling/oracle_teacher.py)."""

    KEY: ClassVar[str] = "data.oracle"

    seed: int = setting("sample.py's seed for it; fixed, not the run's seed, so every training seed sees the same "
                        "teacher data")
    sampler: dict[str, Any] = setting("sample.py's sampler for it: conf/sampler/oracle.yaml and these changes "
                                      "(the sampler group's keys)")

    def __post_init__(self) -> None:
        expect(is_whole(self.seed, 0), f"{self.KEY}.seed", self.seed, "a whole number ≥ 0")
        expect(isinstance(self.sampler, dict), f"{self.KEY}.sampler", self.sampler, "a mapping of sampler keys")


@dataclass(frozen=True)
class DataSettings:
    """The teacher's samples become the student's chat examples (TeacherQADataModule)."""

    KEY: ClassVar[str] = "data"

    _target_: str = setting("the data module class, built by Hydra's instantiate (training.build_datamodule)")
    teacher: str | None = setting(
        "teacher samples: a samples directory, a .parquet file or a datasets hub id; null = the oracle teacher, "
        "sampled in-process into paths.cache_dir with data.oracle's seed and sampler")
    teacher_probs: str | None = setting(
        "a score-mode dataset (action_probs) for the losses on the teacher's choice distribution; null = the "
        "score-mode records in teacher, else the empirical distribution of its answers")
    oracle: OracleTeacherSettings = setting("with teacher null: the oracle teacher's seed and sampler")
    splits: list[str] = setting("the splits whose records are trained on", choices=TRAINING_SPLITS)
    target: str = setting("the assistant turn the student learns: the answer then the teacher's motivation, the "
                          "motivation first (reasoning before the answer), or the answer alone", choices=TEXT_TARGETS)
    val_contexts: list[str] | None = setting("in-sample contexts held out for validation (val/alignment), e.g. "
                                             "[team]; null = num_val_contexts chosen by the seed")
    num_val_contexts: int = setting("with val_contexts null: how many contexts to hold out, rotating with the "
                                    "seed; 0 = no validation")
    samples_per_scenario: int | None = setting("cap on the teacher samples used per scenario; null = all")
    batch_size: int = setting("examples per batch and device (losses on tokens: one per sampled answer)")
    scenario_batch_size: int = setting("losses on the choice distribution: scenarios per batch; 0 = every training "
                                       "scenario (full batch)")
    balance_games: bool = setting("with scenario_batch_size: each batch is dealt the games in turn (one scenario of "
                                  "each game before any game repeats) instead of scenarios of similar length")
    eval_batch_size: int = setting("validation prompts per forward pass")
    max_length: int = setting("longest example in tokens; an example whose answer would be cut off is an error")
    group_by_length: bool = setting("batch examples of similar length together (less padding)")
    num_workers: int = setting("DataLoader worker processes (0 = load in the training process)")
    seed: int = setting("the validation contexts and the batch order follow it (the run's seed)")
    cache_dir: str | None = setting("where tokenized examples and the oracle teacher are cached")

    def __post_init__(self) -> None:
        key = self.KEY
        expect(isinstance(self._target_, str) and bool(self._target_), f"{key}._target_", self._target_,
               "a dotted path to the data module class")
        splits = list(self.splits) if isinstance(self.splits, (list, tuple)) else None
        expect(bool(splits) and len(set(splits)) == len(splits), f"{key}.splits", self.splits,
               f"a non-empty list of distinct splits among {list(TRAINING_SPLITS)}")
        check_choices(self, key)
        if self.val_contexts is not None:
            contexts = list(self.val_contexts)
            expect(bool(contexts) and all(isinstance(c, str) and c for c in contexts), f"{key}.val_contexts",
                   self.val_contexts, "null or a non-empty list of context names")
        expect(is_whole(self.num_val_contexts, 0), f"{key}.num_val_contexts", self.num_val_contexts,
               "a whole number ≥ 0")
        expect(self.samples_per_scenario is None or is_whole(self.samples_per_scenario, 1),
               f"{key}.samples_per_scenario", self.samples_per_scenario, "null (all) or a whole number ≥ 1")
        expect(is_whole(self.batch_size, 1), f"{key}.batch_size", self.batch_size, "a whole number ≥ 1")
        expect(is_whole(self.scenario_batch_size, 0), f"{key}.scenario_batch_size", self.scenario_batch_size,
               "a whole number ≥ 0 (0 = all)")
        expect(isinstance(self.balance_games, bool), f"{key}.balance_games", self.balance_games, "true or false")
        expect(is_whole(self.eval_batch_size, 1), f"{key}.eval_batch_size", self.eval_batch_size,
               "a whole number ≥ 1")
        expect(is_whole(self.max_length, 8), f"{key}.max_length", self.max_length, "a whole number ≥ 8")
        expect(isinstance(self.group_by_length, bool), f"{key}.group_by_length", self.group_by_length,
               "true or false")
        expect(is_whole(self.num_workers, 0), f"{key}.num_workers", self.num_workers, "a whole number ≥ 0")
        expect(is_whole(self.seed, 0), f"{key}.seed", self.seed, "a whole number ≥ 0")
