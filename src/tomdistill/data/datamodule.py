"""`TeacherQADataModule`: the teacher's question/answer pairs as chat-formatted training examples.

It reads teacher datasets, it never samples one: `teacher` (and `teacher_probs`) are always given. Without
`data.teacher`, train.py's recipe has the sampling stage write the oracle teacher into the cache first and
passes its directories here (training.build_datamodule), so this package imports nothing from sampling/.

From a samples dataset (records.py schema) it builds, for the configured splits:
- SFT examples, one per parsed teacher answer (generate mode): the student's prompt
  (system = context, user = game + the student's question) through the student's chat template,
  then the assistant turn `Answer: X` (+ `Motivation: ...` when `target=answer_motivation`, or the motivation
  first and then `Answer: X` when `target=motivation_answer`) and the
  template's end of turn. Labels are -100 everywhere but the assistant turn.
- Soft targets, one per scenario: the teacher's action distribution (score-mode `action_probs`,
  else the empirical distribution of its parsed answers) and the token ids of each action after
  `Answer:` (prompt and action tokenized together, `scoring.prepare_item`). The soft loss uses
  the distribution over each action's first token (the exact marginal at the answer position), so
  it is refused for scenarios whose actions share a first token (public-goods amounts).
- A validation set of whole scenarios: held-out contexts (`val_contexts`, or `num_val_contexts`
  chosen by seed), so `val/alignment` measures transfer to contexts the student never saw.
Batches are grouped by length (less padding; the fraction is reported). On several ranks each rank trains
distinct batches, as many as every other rank; the soft loss's scenario batch is global, split across them
(the samplers: batching.py). Tokenization goes
through `datasets.map` with a cache file keyed by tokenizer and texts, so a rerun reuses it.
Every data error is raised by `setup()`, which the recipe calls before any model loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import datasets
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..losses.base import IGNORE_INDEX
from ..records import action_probs_of, check_same_prompt_version, load_samples
from ..scoring import ScoringItem, prepare_item
from ..scenarios import (ANSWER_PREFIX, AUGMENT_SPLIT, HELDOUT_CONTEXT, REPORT_SPLITS, SPLITS, UNPARSED, Catalogue,
                         Scenario, build_messages, render_prompt)
from .batching import LengthGroupedBatchSampler, WeightedExamples, padding_fraction
from .errors import DataError
from .targets import TargetKind

log = logging.getLogger(__name__)


@dataclass
class ScenarioTarget:
    """One scenario's soft target and its exact-scoring item."""

    scenario: Scenario
    teacher_probs: dict[str, float]
    item: ScoringItem                      # prompt + "Answer:" and each action's continuation ids
    first_token_ids: list[int] = field(default_factory=list)     # distinct first tokens of the actions
    first_token_probs: list[float] = field(default_factory=list)  # teacher mass on each of them

    @property
    def id(self) -> str:
        return self.scenario.id


def teacher_distributions(records: datasets.Dataset) -> dict[tuple[str, str], dict[str, float]]:
    """Per scenario: the mean of score-mode `action_probs`, else the empirical answer frequencies."""
    scored: dict[tuple[str, str], list[dict[str, float]]] = {}
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for row in records.select_columns(["game", "context", "action", "action_probs"]):
        key = (row["game"], row["context"])
        probs = action_probs_of(row)
        if probs:
            scored.setdefault(key, []).append({a: float(p) for a, p in probs.items()})
        elif row["action"] != UNPARSED:
            bucket = counts.setdefault(key, {})
            bucket[row["action"]] = bucket.get(row["action"], 0) + 1
    out = {}
    for key in set(scored) | set(counts):
        if key in scored:
            actions = sorted({a for p in scored[key] for a in p})
            out[key] = {a: sum(p.get(a, 0.0) for p in scored[key]) / len(scored[key]) for a in actions}
        else:
            total = sum(counts[key].values())
            out[key] = {a: c / total for a, c in counts[key].items()}
    return out


def choose_val_contexts(contexts: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` held-out contexts, rotating with the seed (seed 0: the first n, seed 1: the next n, ...)."""
    ordered = sorted(contexts)
    if n <= 0 or not ordered:
        return []
    if n >= len(ordered):
        raise DataError(f"data.num_val_contexts={n} would hold out every training context {ordered}")
    return [ordered[(seed * n + i) % len(ordered)] for i in range(n)]


class ResumableDataLoader(DataLoader):
    """The training loader, with its place in the epoch saved in checkpoints.

    Lightning stores `state_dict()` of a loader that has one in every checkpoint and hands it back
    through `load_state_dict` on `ckpt_path=...`, so a run resumed mid-epoch goes on with the next
    batch of the same epoch order, instead of restarting the epoch's order (which would repeat some
    batches and skip others). `batches_done` reads the trainer's count of batches trained this epoch.

    On several ranks (`world_size` > 1) an error while loading a batch is not raised here but handed on as
    the batch `{"data_error": exception}`: raised here it would stop this rank alone, the others waiting
    for it in their next collective; `distributed.StepAgreement` raises it on every rank together.
    """

    def __init__(self, *args, batches_done=None, world_size: int = 1, rank: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done
        self.world_size, self.rank = world_size, rank

    def __iter__(self):
        if self.world_size == 1:
            return super().__iter__()
        return self._errors_as_batches(super().__iter__())

    def _errors_as_batches(self, iterator):
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - raised on every rank by StepAgreement
                yield {"data_error": err}
                return
            yield batch

    def state_dict(self) -> dict:
        done = int(self._batches_done()) if self._batches_done is not None else 0
        return {"epoch": int(self.batch_sampler.epoch), "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches_done"]))


class Collator:
    """Right-pads a batch and attaches each example's soft target (first-token ids and probs)."""

    def __init__(self, pad_id: int, targets: list[ScenarioTarget]):
        self.pad_id = pad_id
        width = max((len(t.first_token_ids) for t in targets), default=1)
        self.soft_ids = torch.zeros((max(len(targets), 1), width), dtype=torch.long)
        self.soft_probs = torch.zeros((max(len(targets), 1), width), dtype=torch.float32)
        for row, target in enumerate(targets):
            self.soft_ids[row, : len(target.first_token_ids)] = torch.tensor(target.first_token_ids)
            self.soft_probs[row, : len(target.first_token_probs)] = torch.tensor(target.first_token_probs)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e["labels"])
        scenario = torch.tensor([e["scenario"] for e in examples], dtype=torch.long)
        batch = {
            "input_ids": ids, "attention_mask": mask, "labels": labels,
            "answer_pos": torch.tensor([e["answer_pos"] for e in examples], dtype=torch.long),
            "scenario": scenario, "soft_ids": self.soft_ids[scenario], "soft_probs": self.soft_probs[scenario],
        }
        if "weight" in examples[0]:  # a shard of a global batch: the soft loss sums weight × loss (see `shard`)
            batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
        return batch


class TeacherQADataModule(pl.LightningDataModule):
    def __init__(
        self,
        teacher: str | Path,
        tokenizer,
        catalogue: Catalogue,
        *,
        target_kind: TargetKind,
        teacher_probs: str | Path | None = None,
        splits: Sequence[str] = ("in_sample",),
        val_contexts: Sequence[str] | None = None,
        num_val_contexts: int = 1,
        eval_batch_size: int = 16,
        max_length: int = 512,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ):
        super().__init__()
        if not teacher:  # the recipe samples the oracle teacher when data.teacher is null (training.build_datamodule)
            raise DataError("data.teacher is null: the datamodule reads a teacher dataset (a samples dir, a .parquet "
                            "file or a hub id) and samples none; train.py samples the oracle teacher for it")
        if not isinstance(target_kind, TargetKind):  # what the loss trains on (data/targets/, build_target_kind)
            raise DataError(f"target_kind: expected a tomdistill.data.targets.TargetKind, got {target_kind!r}")
        self.teacher, self.teacher_probs_source = teacher, teacher_probs
        self.tokenizer, self.catalogue = tokenizer, catalogue
        self.splits, self.target_kind, self.loss = list(splits), target_kind, target_kind.loss
        self.val_contexts_cfg = list(val_contexts) if val_contexts else None
        self.num_val_contexts = num_val_contexts
        self.eval_batch_size = eval_batch_size
        self.max_length, self.group_by_length = max_length, group_by_length
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.stats: dict = {}
        self._ready = False

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
            raise DataError(f"tokenizer {name!r} has no chat template; set `model.chat_template` to a Jinja template "
                            "(or use an instruct/chat checkpoint)")
        records = self._load_records()
        distributions = self._teacher_distributions(records)
        scenarios = self._training_scenarios(records, distributions)
        # held out from the evaluated training contexts only: a training-only context (scenarios.augment.contexts)
        # is never the held-out one, so a seed holds out the same context with or without them
        contexts = sorted({s.context.name for s in scenarios if s.split != AUGMENT_SPLIT})
        self.val_context_names = self._val_contexts(contexts)
        prompts = {s.key: render_prompt(self.tokenizer, build_messages(s, "student")) for s in scenarios}
        self.targets = [self._scenario_target(s, distributions[s.key], prompts[s.key]) for s in scenarios]
        index = {t.scenario.key: i for i, t in enumerate(self.targets)}
        self.val_targets = [t for t in self.targets if t.scenario.context.name in self.val_context_names]
        self.train_targets = [t for t in self.targets if t.scenario.context.name not in self.val_context_names]

        rows = self.target_kind.rows(records, self.targets, prompts, index, self._end_of_turn(), self.teacher)
        tokenized = self._tokenize(rows)
        is_val = [self.targets[s].scenario.context.name in self.val_context_names for s in tokenized["scenario"]]
        self.train_set = tokenized.select([i for i, v in enumerate(is_val) if not v])
        self.val_set = tokenized.select([i for i, v in enumerate(is_val) if v])
        if len(self.train_set) == 0:
            raise DataError(f"teacher dataset {self.teacher}: no training examples left after holding out "
                            f"contexts {self.val_context_names}")
        self.stats.update({
            "train_examples": len(self.train_set), "val_examples": len(self.val_set),
            "train_scenarios": len(self.train_targets), "val_scenarios": len(self.val_targets),
            "val_contexts": self.val_context_names,
        })
        lengths = self.train_set["length"]
        batch_size = self.target_kind.train_batch_size(len(self.train_targets))
        grouped = LengthGroupedBatchSampler(lengths, batch_size, group_by_length=True, seed=self.seed)
        plain = LengthGroupedBatchSampler(lengths, batch_size, group_by_length=False, seed=self.seed)
        self.stats["padding_fraction"] = padding_fraction(grouped.batches(), lengths) if self.group_by_length \
            else padding_fraction(plain.batches(), lengths)
        self.stats["padding_fraction_random"] = padding_fraction(plain.batches(), lengths)
        log.info("teacher data: %s", json.dumps(self.stats))
        self._ready = True

    def _load_records(self) -> datasets.Dataset:
        records = load_samples(self.teacher, "teacher")
        named = {"teacher": records}
        if self.teacher_probs_source:
            self.probs_records = load_samples(self.teacher_probs_source, "teacher_probs")
            named["teacher_probs"] = self.probs_records
        else:
            self.probs_records = None
        # the samples and the scores may have been elicited differently (reasoning vs `Answer:`), not on other scenarios
        version = check_same_prompt_version(named, elicitation_may_differ=tuple(named))
        from ..scenarios import prompt_version, scenario_version

        self.prompt_version = prompt_version(self.catalogue)  # the student's training prompts (never shuffled)
        if scenario_version(version) != self.prompt_version:
            raise DataError(
                f"teacher dataset {self.teacher} has prompt_version {version!r} but the configured scenario catalogue "
                f"is {self.prompt_version!r}: resample the teacher with this catalogue (and without "
                "scenarios.shuffle_outcomes), or configure the catalogue it was sampled with"
            )
        self.stats["teacher_models"] = sorted(set().union(*(ds.unique("model") for ds in named.values())))
        self.all_records = records  # every split: evaluation_targets reads the ones not trained on
        kept = records.filter(lambda split: split in self.splits, input_columns="split")
        if len(kept) == 0:
            found = sorted(set(records.unique("split")))
            raise DataError(f"teacher dataset {self.teacher}: no records of split(s) {self.splits} (it has {found})")
        generated = kept.filter(lambda p: p in (None, ""), input_columns="action_probs")
        unparsed = sum(1 for a in generated["action"] if a == UNPARSED)
        self.stats["records"] = len(kept)
        self.stats["unparsed_dropped"] = unparsed
        if unparsed:
            log.warning("teacher data: dropped %d unparsed answer(s) of %d", unparsed, len(generated))
        return kept

    def _teacher_distributions(self, records, probs_records=None):
        probs_records = self.probs_records if probs_records is None else probs_records
        source = probs_records if probs_records is not None else records
        distributions = teacher_distributions(source)
        if probs_records is not None:  # scenarios without scores fall back to the samples
            for key, probs in teacher_distributions(records).items():
                distributions.setdefault(key, probs)
        return distributions

    def _training_scenarios(self, records, distributions) -> list[Scenario]:
        keys = {(g, c) for g, c in zip(records["game"], records["context"])}
        keys = sorted(keys | self.target_kind.scored_scenarios(self.probs_records, self.splits))
        scenarios = []
        for game, context in keys:
            try:
                scenario = self.catalogue.scenario(game, context)
            except KeyError as err:
                raise DataError(f"teacher dataset {self.teacher}: {err.args[0]}") from err
            if (game, context) not in distributions:  # no parsed answer and no score: nothing to learn
                log.warning("teacher data: scenario %s/%s has only unparsed answers; left out", game, context)
                self.stats.setdefault("scenarios_left_out", []).append(f"{game}/{context}")
                continue
            scenarios.append(scenario)
        return scenarios

    def _val_contexts(self, contexts: list[str]) -> list[str]:
        if self.val_contexts_cfg is not None:
            unknown = [c for c in self.val_contexts_cfg if c not in contexts]
            if unknown:
                raise DataError(f"data.val_contexts {unknown} are not among the training contexts {contexts}")
            if set(self.val_contexts_cfg) == set(contexts):
                raise DataError(f"data.val_contexts {self.val_contexts_cfg} would hold out every training context")
            return sorted(self.val_contexts_cfg)
        return choose_val_contexts(contexts, self.num_val_contexts, self.seed)

    def _scenario_target(self, scenario: Scenario, probs: dict[str, float], prompt: str) -> ScenarioTarget:
        actions = scenario.game.actions
        item = prepare_item(self.tokenizer, prompt + ANSWER_PREFIX, actions)
        full = {a: float(probs.get(a, 0.0)) for a in actions}
        first: dict[int, float] = {}
        for action, continuation in zip(actions, item.continuation_ids):
            first[continuation[0]] = first.get(continuation[0], 0.0) + full[action]
        self.target_kind.check_scenario(scenario, item, first, self.teacher, self.splits)
        return ScenarioTarget(scenario, full, item, list(first), list(first.values()))

    def evaluation_targets(self, split: str) -> list[ScenarioTarget]:
        """The scenarios of one report split (scenarios/schema.py REPORT_SPLITS), each with the teacher's choice
        distribution and its exact-scoring item, for measuring the trained student where evaluate.py does:
        `in_sample` = the trained in-sample scenarios, `heldout_context` = the validation contexts' in-sample
        scenarios, and a catalogue split (oos_context, oos_payoffs, oos_game) from the teacher's records of it."""
        if split == "in_sample":
            return [t for t in self.train_targets if t.scenario.split == "in_sample"]
        if split == HELDOUT_CONTEXT:  # evaluate.py's: the untrained in-sample scenarios (not augment variants)
            if not self.val_targets:
                raise DataError("split heldout_context: no validation context is held out (data.num_val_contexts=0)")
            return [t for t in self.val_targets if t.scenario.split == "in_sample"]
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {list(REPORT_SPLITS)}")

        def of_split(records):
            return records.filter(lambda s: s == split, input_columns="split")

        distributions = self._teacher_distributions(
            of_split(self.all_records), of_split(self.probs_records) if self.probs_records is not None else None)
        if not distributions:
            raise DataError(f"teacher dataset {self.teacher_probs_source or self.teacher}: no records of split "
                            f"{split!r} to measure the student on; sample the teacher on it (scenarios.splits)")
        targets = []
        for game, context in sorted(distributions):
            scenario = self.catalogue.scenario(game, context)
            prompt = render_prompt(self.tokenizer, build_messages(scenario, "student"))
            item = prepare_item(self.tokenizer, prompt + ANSWER_PREFIX, scenario.game.actions)
            targets.append(ScenarioTarget(scenario, {a: float(distributions[game, context].get(a, 0.0))
                                                     for a in scenario.game.actions}, item))
        return targets

    def _end_of_turn(self) -> str:
        """What the chat template appends after an assistant message (e.g. `<|im_end|>`)."""
        sentinel = "\x00SENTINEL\x00"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False)
        return text.split(sentinel, 1)[1].rstrip()

    def _tokenize(self, rows: list[dict]) -> datasets.Dataset:
        tokenizer, max_length = self.tokenizer, self.max_length

        def tokenize(batch):
            out = {"input_ids": [], "labels": [], "answer_pos": [], "length": []}
            answer_prefixes = batch.get("answer_prefix") or [ANSWER_PREFIX] * len(batch["prompt"])
            for prompt, completion, answer_prefix in zip(batch["prompt"], batch["completion"], answer_prefixes):
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
                if ids[: len(prompt_ids)] != prompt_ids:  # merged across the boundary: keep them apart
                    ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
                labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
                # the answer position: the last token of "Answer:", whose next token is the action
                if not completion:  # a soft-loss prompt already ends with "Answer:"
                    answer_pos = len(ids) - 1
                else:
                    prefix_ids = tokenizer(prompt + answer_prefix, add_special_tokens=False)["input_ids"]
                    answer_pos = len(prefix_ids) - 1 if ids[: len(prefix_ids)] == prefix_ids else -1
                ids, labels = ids[:max_length], labels[:max_length]
                if answer_pos >= len(ids) - (1 if completion else 0):
                    answer_pos = -1
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["answer_pos"].append(answer_pos)
                out["length"].append(len(ids))
            return out

        dataset = datasets.Dataset.from_list(rows)
        key = hashlib.sha256(json.dumps({
            "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer), "max_length": max_length,
            "template": getattr(tokenizer, "chat_template", ""), "rows": rows, "revision": 2,
        }, sort_keys=True).encode()).hexdigest()[:16]
        cache_file, lock = None, contextlib.nullcontext()
        if self.cache_dir is not None:
            (self.cache_dir / "tokenized").mkdir(parents=True, exist_ok=True)
            cache_file = str(self.cache_dir / "tokenized" / f"{key}.arrow")
            # ranks started together (srun, torchrun) on a cold cache: the first tokenizes and writes, the others
            # wait for it and read its file (no process group exists yet for a barrier: the data comes first)
            from ..locks import file_lock

            lock = file_lock(cache_file + ".lock", "paths.cache_dir (data.cache_dir)")
        with lock:
            if cache_file is not None:
                self.stats["tokenization_cached"] = Path(cache_file).exists()
            tokenized = dataset.map(tokenize, batched=True, remove_columns=[c for c in ("prompt", "completion", "answer_prefix") if c in dataset.column_names],
                                    cache_file_name=cache_file, load_from_cache_file=True,
                                    desc="tokenizing teacher answers")
        self.target_kind.check_tokenized(tokenized, max_length)
        return tokenized

    # ---------------------------------------------------------------- loaders
    def _collator(self) -> Collator:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return Collator(pad, self.targets)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer else 1
        sampler = self.target_kind.batch_sampler(
            self.train_set["length"], [self.targets[s].scenario for s in self.train_set["scenario"]],
            len(self.train_targets), shuffle=True, group_by_length=self.group_by_length, seed=self.seed,
            num_replicas=num_replicas, rank=rank, accumulate=accumulate, splits=self.splits)
        progress = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.completed) if trainer else None
        return ResumableDataLoader(
            WeightedExamples(self.train_set.with_format(columns=["input_ids", "labels", "answer_pos", "scenario"])),
            batch_sampler=sampler, collate_fn=self._collator(), num_workers=self.num_workers, batches_done=progress,
            world_size=sampler.num_replicas, rank=sampler.rank,
        )

    def val_dataloader(self) -> DataLoader:
        # every rank sees every validation example (few); val/alignment is computed on all of them anyway
        sampler = LengthGroupedBatchSampler(self.val_set["length"], self.eval_batch_size, shuffle=False,
                                            group_by_length=self.group_by_length)
        return DataLoader(self.val_set.with_format(columns=["input_ids", "labels", "answer_pos", "scenario"]),
                          batch_sampler=sampler, collate_fn=self._collator(), num_workers=self.num_workers)
