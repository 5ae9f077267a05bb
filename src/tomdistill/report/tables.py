"""Report tables: pandas frames built from an Evaluation, written as CSV and Markdown."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tomdistill.metrics.transfer import TRANSFER_METRICS
from tomdistill.scenarios.catalogue import REPORT_SPLITS

HEADLINE_COLUMNS = [*REPORT_SPLITS, "overall"]
EMPTY_NOTES = {
    "significance_payoffs": "not applicable: needs generate-mode counts of the tuned model in both in_sample and oos_payoffs",
    "significance_models": "not applicable: needs generate-mode counts (score-mode probabilities have no answer counts)",
    "warnings": "no warnings",
}


def propensity_label(evaluation) -> str:
    """What a propensity is in this evaluation: exact probabilities or shares of sampled answers."""
    kind = evaluation.settings.get("propensity")
    if kind == "exact":
        return "P(C)"
    if kind == "sampled":
        return "share of C among parsed answers"
    return "P(C) or share of C among parsed answers"


def present_columns(evaluation) -> list[str]:
    """The headline columns, without `heldout_context` when there is none (it is reported whenever there is one)."""
    counts = evaluation.headline("alignment")
    return [c for c in HEADLINE_COLUMNS if c != "heldout_context" or counts[c]["n_scenarios"] > 0]


def percent(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value))):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{100 * value:.{digits}f}%"


def with_interval(value, low, high, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if low is None or high is None or any(isinstance(x, float) and math.isnan(x) for x in (low, high)):
        return f"{percent(value)} [—]"  # no interval (e.g. one scenario under the scenario bootstrap)
    return f"{percent(value)} [{percent(low, digits)}, {percent(high, digits)}]"


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else float_format.format(value)
        if isinstance(value, (bool,)):
            return "yes" if value else "no"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *body])


def write_table(frame: pd.DataFrame, directory: Path, name: str, markdown: pd.DataFrame | None = None) -> None:
    """`name.csv` (full precision) and `name.md` (the `markdown` view, or the same frame).

    An empty table is written as one `note` row saying so, never as an empty file.
    """
    if frame.empty:
        frame = markdown = pd.DataFrame({"note": [EMPTY_NOTES.get(name, "nothing to report")]})
    frame.to_csv(directory / f"{name}.csv", index=False)
    (directory / f"{name}.md").write_text(markdown_table(markdown if markdown is not None else frame) + "\n")


def headline_long(evaluation, source: str) -> pd.DataFrame:
    """One row per metric × split (overall included): value, CI, scenario counts."""
    rows = []
    for metric in TRANSFER_METRICS:
        for split, entry in evaluation.headline(metric).items():
            rows.append({"source": source, "metric": metric, "split": split, **entry})
    return pd.DataFrame(rows)


def headline_markdown(long: pd.DataFrame, printed: dict | None = None) -> pd.DataFrame:
    """Rows: source × metric; columns: splits; cells: value [CI]."""
    rows = []
    for (source, metric), group in long.groupby(["source", "metric"], sort=False):
        row = {"source": source, "metric": metric}
        for entry in group.itertuples():
            row[entry.split] = with_interval(entry.value, entry.ci_low, entry.ci_high)
        rows.append(row)
    if printed:
        rows.append({"source": "paper (as printed)", "metric": "improvement",
                     **{s: percent(printed.get(s), 0) if s in printed else "—" for s in HEADLINE_COLUMNS}})
    held_out = long[(long["split"] == "heldout_context") & (long["n_scenarios"] > 0)]
    columns = [c for c in HEADLINE_COLUMNS if c != "heldout_context" or len(held_out)]
    return pd.DataFrame(rows, columns=["source", "metric", *columns]).fillna("—")


def propensity_markdown(propensities: pd.DataFrame) -> pd.DataFrame:
    view = propensities[["role", "model", "split", "game", "context", "mode", "n", "n_parsed", "n_unparsed",
                         "n_C", "n_D", "p", "p_se", "mean_donation", "donation_se"]].copy()
    for column in ("n_C", "n_D"):
        view[column] = view[column].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    return view


def scenario_markdown(scenarios: pd.DataFrame) -> pd.DataFrame:
    view = scenarios[["split", "game", "context", "p_teacher", "p_base", "p_tuned", "gap"]].copy()
    view["improvement"] = [
        with_interval(v, lo, hi) if d else "undefined (gap < ε)"
        for v, lo, hi, d in zip(scenarios["improvement"], scenarios["improvement_ci_low"],
                                scenarios["improvement_ci_high"], scenarios["defined"])
    ]
    view["alignment"] = [with_interval(v, lo, hi) for v, lo, hi in
                         zip(scenarios["alignment"], scenarios["alignment_ci_low"], scenarios["alignment_ci_high"])]
    return view


def groups_markdown(groups: pd.DataFrame) -> pd.DataFrame:
    view = groups[groups["kind"] != "scenario"][["kind", "split", "group", "n_scenarios", "n_defined"]].copy()
    chosen = groups[groups["kind"] != "scenario"]
    for metric in TRANSFER_METRICS:
        view[metric] = [with_interval(v, lo, hi) for v, lo, hi in
                        zip(chosen[metric], chosen[f"{metric}_ci_low"], chosen[f"{metric}_ci_high"])]
    return view


def cooperation_markdown(cooperation: pd.DataFrame) -> pd.DataFrame:
    wide = cooperation.pivot_table(index=["by", "group"], columns="role", values="p", sort=False).reset_index()
    return wide[["by", "group", *[r for r in ("teacher", "base", "tuned") if r in wide.columns]]]
