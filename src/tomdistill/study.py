"""The study's plan: which stages a configuration asks for, their command lines, and the table that
compares its training variants (`study.json`). Shared by the local pipeline (`pipeline.py`) and the
cluster launcher (`cluster.py`), which both run these stages.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import PROJECT_ROOT
from .errors import UserError
from .metrics.transfer import HEADLINE_METRIC, TRANSFER_METRICS
from .scenarios.catalogue import REPORT_SPLITS

log = logging.getLogger(__name__)

STUDY_METRICS = (HEADLINE_METRIC, *(m for m in TRANSFER_METRICS if m != HEADLINE_METRIC))  # the headline first


@dataclass
class Stage:
    name: str
    script: str
    output: Path
    overrides: list[str] = field(default_factory=list)
    kind: str = ""  # teacher | student | train | evaluate: which `pipeline.cluster.*` resources a job gets
    needs: list[str] = field(default_factory=list)  # names of the stages whose outputs this one reads
    python: str | None = None  # the interpreter of its command (sample.py: `sampler.python`); None = this one

    def complete(self) -> bool:
        if self.script == "sample.py":
            manifest = self.output / "manifest.json"
            return manifest.exists() and json.loads(manifest.read_text()).get("complete", False)
        if self.script == "train.py":
            return (self.output / "adapter" / "adapter_model.safetensors").exists() and (
                self.output / "adapter" / "tomdistill_adapter.json"
            ).exists()
        return (self.output / "summary.json").exists()

    def has_outputs(self) -> bool:
        """Whether the stage left outputs that a rerun keeps or resumes from: samples or their plan, checkpoints or
        an adapter, a report. Its record (`stage.json`) and logs alone are not: the stage just starts again."""
        out = self.output
        if self.script == "sample.py":
            return ((out / "plan.json").exists() or (out / "manifest.json").exists()
                    or any((out / "train").glob("shard-*.parquet")))
        if self.script == "train.py":
            return (out / "adapter").exists() or any((out / "checkpoints").glob("*"))
        return self.complete()


def variants(cfg: DictConfig) -> dict[str, list[str]]:
    """{name: train overrides}; without `pipeline.variants`, one run of the config as it is, named
    `pipeline.default_variant`."""
    default = cfg.pipeline.get("default_variant") or "default"
    return {name: list(o or []) for name, o in (cfg.pipeline.variants or {default: []}).items()}


def seeds(cfg: DictConfig) -> list[int | None]:
    """Training seeds: `pipeline.seeds` (each variant trained once per seed), or [None] = the config's seed."""
    chosen = cfg.pipeline.get("seeds")
    return [int(s) for s in chosen] if chosen else [None]


def run_name(variant: str, seed: int | None) -> str:
    return variant if seed is None else f"{variant}_s{seed}"


def plan(cfg: DictConfig, study_dir: Path) -> list[Stage]:
    """The study's stages, in order, with their outputs under `study_dir`."""
    p = cfg.pipeline
    teacher = study_dir / "teacher"
    teacher_scores = study_dir / "teacher_scores"
    base = study_dir / "base"
    adapter = p.get("adapter") or "adapter"  # adapter (final step) | adapter_best (best val/alignment)
    against = p.get("evaluate_against") or "teacher_scores"
    if against not in ("teacher", "teacher_scores"):
        raise SystemExit(f"pipeline.evaluate_against={against!r}: expected teacher or teacher_scores")
    reference = teacher if against == "teacher" else teacher_scores
    reference_stage = "teacher samples" if against == "teacher" else "teacher choice probabilities"
    stages = [
        Stage("teacher samples", "sample.py", teacher, list(p.teacher), "teacher"),
        Stage("teacher choice probabilities", "sample.py", teacher_scores, list(p.teacher_scores), "teacher"),
        Stage("base student", "sample.py", base, list(p.student), "student"),
    ]
    for variant, train_overrides in variants(cfg).items():
        for seed in seeds(cfg):
            name = run_name(variant, seed)
            train_dir = study_dir / f"train_{name}"
            tuned = study_dir / f"tuned_{name}"
            seed_override = [] if seed is None else [f"seed={seed}"]
            stages += [
                Stage(
                    f"train [{name}]", "train.py", train_dir,
                    [f"data.teacher={teacher}", f"data.teacher_probs={teacher_scores}", *p.train, *train_overrides,
                     *seed_override],
                    "train", ["teacher samples", "teacher choice probabilities"],
                ),
                Stage(f"tuned student [{name}]", "sample.py", tuned, [*p.student, f"adapter={train_dir / adapter}"],
                      "student", [f"train [{name}]"]),
                Stage(
                    f"evaluate [{name}]", "evaluate.py", study_dir / f"evaluate_{name}",
                    [f"teacher={reference}", f"base={base}", f"tuned={tuned}", *p.evaluate],
                    "evaluate", [reference_stage, "base student", f"tuned student [{name}]"],
                ),
            ]
    return stages


def stage_command(stage: Stage, common: list[str], extra: list[str] = ()) -> list[str]:
    """The stage's command line, decided when it starts: a training run that left `last.ckpt` resumes from it."""
    command = [stage.python or sys.executable, str(PROJECT_ROOT / stage.script), *common, *stage.overrides, *extra,
               f"output={stage.output}", f"hydra.run.dir={stage.output / 'hydra'}"]
    if stage.script == "train.py" and (stage.output / "checkpoints" / "last.ckpt").exists():
        command.append("ckpt_path=last")  # resume an interrupted training run
    return command


# --- what made a stage's outputs (`stage.json`) --------------------------------------------------------------------
#
# The pipeline writes OUTPUT/stage.json when it starts a stage (submits it, on a cluster), from the config the stage's
# command composes; before it skips or resumes a stage that has outputs, it compares that record with what this study
# asks. Written at the start, not the end, so an interrupted stage (training with last.ckpt and no adapter, sampling
# with some shards) is checked before it resumes: Stage.complete() stays the outputs' own test, and one record serves
# all three scripts (sampling's plan.json and training's config.yaml are each one script's, and config.yaml holds
# resolved, machine-specific paths).

RECORD = "stage.json"
# The config sections each script reads (sampling: src/tomdistill/sampling/settings.py; evaluation:
# src/tomdistill/evaluation.py): a change elsewhere changes none of its outputs, so it does not make them stale (a
# training setting must not throw away a teacher's samples). Training reads nearly everything: listed is what it does
# not read.
_READS = {"sample.py": ("model", "sampler", "scenarios", "role", "seed", "adapter"),
          "evaluate.py": ("teacher", "base", "tuned", "compare", "metrics", "scenarios", "seed")}
_TRAINING_IGNORES = ("output", "ckpt_path", "hydra", "paths", "pipeline", "logger", "task_name", "role", "adapter",
                     "sampler", "metrics", "hparams_search", "evaluate_only", "max_requeues")
# settings of how a stage runs, not of what it writes, so a resumed stage may change them (a smaller batch after
# running out of memory); the sampler's are those plan.json leaves out (src/tomdistill/sampling/manifest.py)
RUNTIME_KEYS = frozenset({
    "sampler.batch_size", "sampler.score_batch_size", "sampler.device", "sampler.device_map", "sampler.progress",
    "sampler.tensor_parallel_size", "sampler.gpu_memory_utilization", "sampler.python",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "data.num_workers", "data.cache_dir",
    "model.gradient_checkpointing", "callbacks.step_agreement.max_requeues",
})
# keys added to the config after records were written, each with the value that does what the code did before it:
# a record without the key matches a study that asks that value, so an upgrade leaves a study's stages resumable
ADDED_KEYS = {"data.balance_games": False, "scenarios.augment.games": [],
              "scenarios.group_training_games": ["volunteers_dilemma_2", "volunteers_dilemma_3", "volunteers_dilemma_5"]}
OVERWRITE_HINT = ("rerun with pipeline.overwrite=true to replace it and the stages that read it, "
                  "or choose another pipeline.name")


class StaleStageError(ValueError, UserError):
    """A stage's outputs were made by another configuration (or by a version that kept no record)."""


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _portable(value, study: str):
    """The study directory written as `<study>`: a study moved or copied elsewhere still matches its records."""
    if isinstance(value, str):
        return value.replace(study, "<study>")
    if isinstance(value, list):
        return [_portable(v, study) for v in value]
    return value


def stage_record(stage: Stage, cfg: DictConfig, common: list[str]) -> dict:
    """What the stage is made from: the keys of its composed config that its script reads (not resolved, so
    `${paths.root_dir}` stays as written on every machine), and its command's overrides for a reader."""
    study = str(stage.output.parent)
    sections = _READS.get(stage.script)
    config = {}
    for key, value in _flatten(OmegaConf.to_container(cfg, resolve=False)).items():
        top = key.split(".")[0]
        if (top not in sections if sections else top in _TRAINING_IGNORES) or key in RUNTIME_KEYS:
            continue
        config[key] = _portable(value, study)
    record = {"stage": stage.name, "script": stage.script,
              "overrides": [_portable(o, study) for o in [*common, *stage.overrides]], "config": config}
    return json.loads(json.dumps(record, default=str))  # as it reads back from stage.json


def write_record(stage: Stage, cfg: DictConfig, common: list[str]) -> None:
    """OUTPUT/stage.json, written atomically, as the stage starts."""
    stage.output.mkdir(parents=True, exist_ok=True)
    path = stage.output / RECORD
    tmp = path.with_name(f".{RECORD}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stage_record(stage, cfg, common), indent=2) + "\n")
    os.replace(tmp, path)


def _setting(config: dict, key: str) -> str:
    if key not in config:
        return f"{key} unset"
    value = config[key]
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict)) or value is None else value}"


def stale_reason(stage: Stage, cfg: DictConfig, common: list[str]) -> str | None:
    """Why the stage's existing outputs are not this study's (None when they are, or when it has none)."""
    if not stage.has_outputs():
        return None
    asked = stage_record(stage, cfg, common)["config"]
    try:
        previous = json.loads((stage.output / RECORD).read_text())
        # a key that became a runtime setting after the record was written is no change either
        made = {k: v for k, v in previous["config"].items() if k not in RUNTIME_KEYS}
        # nor is a key added since, where this stage reads it and asks the value that does what the code did before
        made = {**{k: v for k, v in ADDED_KEYS.items() if k not in made and k in asked}, **made}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return (f"{stage.output} holds outputs with no record of the configuration that made them ({RECORD}: made by "
                "an older tomdistill, or copied in)")
    missing = object()
    keys = sorted(k for k in made.keys() | asked.keys() if made.get(k, missing) != asked.get(k, missing))
    if not keys and previous.get("script") == stage.script:
        return None
    if not keys:
        return f"{stage.output} was made by {previous.get('script')}, this stage runs {stage.script}"
    # at most 3, those a reader recognises: changed values before added or removed keys, and for a changed config
    # group its name (loss.name, not loss._target_ or the keys only the new loss has)
    changed = [k for k in keys if k in made and k in asked] or keys
    shown = ([k for k in changed if "._" not in k] or changed)[:3]
    more = f" (and {len(keys) - len(shown)} more keys)" if len(keys) > len(shown) else ""
    return (f"{stage.output} was made with {', '.join(_setting(made, k) for k in shown)}, this study asks "
            f"{', '.join(_setting(asked, k) for k in shown)}{more}")


def check_stages(stages: list[Stage], configs: dict[str, DictConfig], common: list[str],
                 overwrite: bool = False) -> list[Stage]:
    """Refuse a study whose stages hold outputs made by another configuration (or from inputs that will be made
    again), before any stage is skipped or resumed. With `overwrite`, delete those stages' outputs and those of every
    stage that reads them (`Stage.needs`, transitively), so they run again; returns the stages cleared."""
    stale = {}
    complete = {s.name: s.complete() for s in stages}
    for stage in stages:
        reason = stale_reason(stage, configs[stage.name], common)
        redo = [n for n in stage.needs if not complete[n]]
        if reason is None and redo and stage.has_outputs():  # e.g. its training run's adapter was deleted since
            reason = f"{stage.output} was made from what {', '.join(redo)} made, which will be made again"
        if reason:
            stale[stage.name] = reason
    if not stale:
        return []
    if not overwrite:
        name, reason = next(iter(stale.items()))
        others = [n for n in stale if n != name]
        also = (f" (and {len(others)} more: {', '.join(others[:2])}{', …' if len(others) > 2 else ''})"
                if others else "")
        raise StaleStageError(f"{name}: {reason}{also}; {OVERWRITE_HINT}")
    cleared = set(stale)
    for stage in stages:  # the plan lists a stage after those it needs
        if cleared & set(stage.needs):
            cleared.add(stage.name)
    removed = []
    for stage in stages:
        if stage.name in cleared and stage.output.exists():
            why = stale.get(stage.name) or f"it reads what {', '.join(n for n in stage.needs if n in cleared)} made"
            log.warning(f"{stage.name}: pipeline.overwrite=true: removing {stage.output} ({why})")
            shutil.rmtree(stage.output)
            removed.append(stage)
    return removed


class EvaluationOnlyError(ValueError, UserError):
    """An evaluation-only configuration given to sample.py, train.py or the pipeline."""


def refuse_evaluation_only(cfg: DictConfig, app: str) -> None:
    """An experiment that only evaluates (`evaluate_only: true`, e.g. +experiment=paper_published: the paper's
    published counts) has nothing to sample or train: `app` would run the default recipe instead."""
    if not OmegaConf.select(cfg, "evaluate_only", default=False):
        return
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    which = f"+experiment={choice}" if choice else "this configuration"
    run = f"python evaluate.py {which}" if choice else "evaluate.py"
    raise EvaluationOnlyError(f"{which} only evaluates (evaluate_only: true): {app} would run the default recipe "
                              f"with it, not the experiment; run {run}")


def study_table(study_dir: Path, variants: list[str], seeds: list[int | None] = (None,)) -> dict:
    """Alignment and improvement per split for every variant (and the paper's own numbers when an
    evaluation compared against them), from each evaluation's summary.json. With several training
    seeds a cell is the mean over seeds with its sample standard deviation (`sd`) and the per-seed `values`."""
    table = {}
    paper = None
    for variant in variants:
        runs = [json.loads((study_dir / f"evaluate_{run_name(variant, seed)}" / "summary.json").read_text())
                for seed in seeds]
        row = {}
        for metric in STUDY_METRICS:
            row[metric] = {}
            for split in runs[0][metric]:
                cells = [r[metric][split] for r in runs]
                if len(runs) == 1:
                    row[metric][split] = dict(cells[0])
                    continue
                values = [c.get("value") for c in cells]
                finite = [v for v in values if v is not None and v == v]
                mean = sum(finite) / len(finite) if finite else float("nan")
                sd = (sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) ** 0.5 if len(finite) > 1 else float("nan")
                row[metric][split] = {"value": mean, "sd": sd, "values": values, "seeds": list(seeds),
                                      "n_scenarios": cells[0].get("n_scenarios")}
        masses = [r.get("action_mass") or {} for r in runs]
        row["action_mass"] = {"base": masses[0].get("base"), "tuned": masses[0].get("tuned")}
        if len(runs) > 1 and all(m.get("tuned") for m in masses):
            tuned = [m["tuned"]["mean"] for m in masses]
            row["action_mass"]["tuned"] = {**masses[0]["tuned"], "mean": sum(tuned) / len(tuned), "values": tuned}
        table[variant] = row
        paper = (runs[0].get("compare") or {}).get("paper_published") or paper
    if paper:
        table["paper (70b → 7b, published counts)"] = {m: dict(paper[m]) for m in STUDY_METRICS}
    return table


def print_study(table: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    splits = [*REPORT_SPLITS, "overall"]
    for metric in STUDY_METRICS:
        out = Table(title=f"{metric} toward the teacher (1.0 = indistinguishable; 95% bootstrap CI, "
                          "or mean ± sd over training seeds)")
        out.add_column("variant")
        for split in splits:
            out.add_column(split, justify="right")
        if metric == "alignment":
            out.add_column("mass on actions (base → tuned)", justify="right")
        for variant, metrics in table.items():
            cells = []
            for split in splits:
                cell = metrics[metric].get(split) or {}
                value = cell.get("value")
                if value is None or value != value:
                    cells.append("—")
                elif "sd" in cell:  # several training seeds: mean ± sd
                    cells.append(f"{value:.2f} ± {cell['sd']:.2f} (n={len(cell['values'])})")
                else:
                    cells.append(f"{value:.2f} [{cell.get('ci_low') or float('nan'):.2f}, "
                                 f"{cell.get('ci_high') or float('nan'):.2f}]")
            if metric == "alignment":
                mass = metrics.get("action_mass") or {}
                base, tuned = (mass.get(k) or {} for k in ("base", "tuned"))
                cells.append(f"{base['mean']:.2f} → {tuned['mean']:.2f}" if base and tuned else "—")
            out.add_row(variant, *cells)
        console.print(out)


# --- what each stage took (`usage.json`) ---------------------------------------------------------------------------
#
# The local pipeline measures each stage's process as it ends: wall time, and the peak resident memory of the stage's
# largest process (the kernel's ru_maxrss of the child, the maximum over it and the processes it waited for, e.g.
# torchrun's workers), never below the pipeline's own peak (~0.4 GB: Linux starts a child's high-water mark at its
# parent's). A cluster launcher has the scheduler's accounting instead (`sacct -j JOB -o MaxRSS,Elapsed`).

USAGE = "usage.json"


def write_usage(stage: Stage, seconds: float, peak_rss_bytes: int) -> dict:
    """OUTPUT/usage.json, written atomically, as the stage ends."""
    usage = {"stage": stage.name, "seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss_bytes / 1e9, 2)}
    path = stage.output / USAGE
    tmp = path.with_name(f".{USAGE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(usage, indent=2) + "\n")
    os.replace(tmp, path)
    return usage


def study_usage(stages: list[Stage]) -> dict[str, dict]:
    """{stage name: its usage.json} for the stages that have one (a stage made by a launcher that measures none, or
    by an older tomdistill, has none)."""
    usage = {}
    for stage in stages:
        path = stage.output / USAGE
        if path.exists():
            usage[stage.name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "stage"}
    return usage


def write_study(study_dir: Path, variant_names: list[str], seed_list: list[int | None], show: bool = False,
                stages: list[Stage] = ()) -> dict:
    """study.json (written atomically): `variants`, the comparison table from every evaluation's summary.json, and
    `stages`, each stage's time and peak memory where measured; `show` prints the tables."""
    table = study_table(study_dir, variant_names, seed_list)
    study = {"variants": table, "stages": study_usage(list(stages))}
    tmp = study_dir / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=2))
    os.replace(tmp, study_dir / "study.json")
    if show:
        print_study(table)
    return study
