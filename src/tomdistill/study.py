"""The study's plan: which stages a configuration asks for, their command lines, and the table that
compares its training variants (`study.json`). Shared by the local pipeline (`pipeline.py`) and the
cluster launcher (`cluster.py`), which both run these stages.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from . import PROJECT_ROOT
from .metrics.transfer import HEADLINE_METRIC, TRANSFER_METRICS
from .scenarios.catalogue import REPORT_SPLITS

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


def write_study(study_dir: Path, variant_names: list[str], seed_list: list[int | None], show: bool = False) -> dict:
    """study.json (written atomically) from every evaluation's summary.json; `show` prints the tables."""
    table = study_table(study_dir, variant_names, seed_list)
    tmp = study_dir / "study.json.tmp"
    tmp.write_text(json.dumps(table, indent=2))
    os.replace(tmp, study_dir / "study.json")
    if show:
        print_study(table)
    return table
