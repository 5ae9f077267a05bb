"""Log an evaluation to Weights & Biases: tables, figures and the headline numbers (offline-safe)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tomdistill.metrics.transfer import TRANSFER_METRICS
from tomdistill.tracking import resolve_wandb_mode

from .tables import HEADLINE_COLUMNS


def headline_metrics(summary: dict) -> dict[str, float]:
    """Flat run-summary keys, e.g. `alignment/in_sample`, `improvement/overall_ci_low` (fractions), `null/teacher_mean/
    alignment/in_sample` (a null student's point value); a public-goods split off format has no value, only its
    `alignment/oos_game_off_format` flag."""
    out = {}
    for metric in TRANSFER_METRICS:
        for split in HEADLINE_COLUMNS:
            entry = summary[metric].get(split) or {}
            for key, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if entry.get(key) is not None:
                    out[f"{metric}/{split}{suffix}"] = entry[key]
            if "off_format" in entry:
                out[f"{metric}/{split}_off_format"] = int(bool(entry["off_format"]))
    for name, splits in (summary.get("null_students") or {}).items():
        for split, entry in splits.items():
            for metric in TRANSFER_METRICS:
                if entry.get(metric) is not None:
                    out[f"null/{name}/{metric}/{split}"] = entry[metric]
    return out


def _table(frame: pd.DataFrame):
    import wandb

    frame = frame.copy()
    for column in frame.columns:  # W&B tables want one type per column
        if frame[column].dtype == object:
            frame[column] = frame[column].astype(str)
    return wandb.Table(dataframe=frame.reset_index(drop=True))


def log_to_wandb(evaluation, output: Path, summary: dict, logger_cfg: dict, run_config: dict | None = None) -> str:
    """One W&B run per evaluation; returns the mode used. Never blocks on the network (see tracking)."""
    import wandb

    mode = resolve_wandb_mode(logger_cfg.get("mode", "auto"))
    if mode == "disabled":
        return mode
    run = wandb.init(
        project=logger_cfg.get("project", "tomdistill"), entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"), tags=list(logger_cfg.get("tags") or []) + ["evaluate"],
        job_type="evaluate", dir=str(output), mode=mode, config=run_config,
        settings=wandb.Settings(init_timeout=60, silent=True),
    )
    try:
        tables = {
            "propensities": evaluation.propensities, "transfer_scenarios": evaluation.scenarios,
            "transfer_groups": evaluation.groups[evaluation.groups["kind"] != "scenario"],
            "cooperation": evaluation.cooperation, "significance_payoffs": evaluation.significance,
            "null_students": evaluation.null_students,
            "warnings": pd.DataFrame({"warning": evaluation.warnings or [""]}),
        }
        log = {f"tables/{name}": _table(frame) for name, frame in tables.items() if not frame.empty}
        for path in sorted(Path(output).glob("*.png")):
            log[f"figures/{path.stem}"] = wandb.Image(str(path))
        run.log(log)
        for key, value in headline_metrics(summary).items():
            run.summary[key] = value
        run.summary["models"] = summary["models"]
        run.summary["undefined_scenarios"] = len(summary["undefined_scenarios"])
        run.summary["unparsed"] = {role: entry["total"] for role, entry in summary["unparsed"].items()}
    finally:
        wandb.finish()
    return mode
