"""Report tables: pandas frames built from an Evaluation, written as CSV and Markdown."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tomdistill.metrics.transfer import HEADLINE_METRIC, MIN_FORMAT_MASS, TRANSFER_METRICS
from tomdistill.scenarios.catalogue import REPORT_SPLITS

HEADLINE_COLUMNS = [*REPORT_SPLITS, "overall"]
EMPTY_NOTES = {
    "significance_payoffs": "not applicable: needs generate-mode counts of the tuned model in both in_sample and oos_payoffs",
    "significance_models": "not applicable: needs generate-mode counts (score-mode probabilities have no answer counts)",
    "warnings": "no warnings",
    "null_students": "no null students: the teacher dataset holds no in_sample (training) scenario",
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


NULL_SOURCE = "null student: {}"


def _flat(entry: dict) -> dict:
    """A headline entry as flat columns: its public-goods format verdict as off_format and <role>_action_mass."""
    entry = dict(entry)
    masses = entry.pop("action_mass", None) or {}
    entry.pop("reason", None)
    return {**entry, **{f"{role}_action_mass": mass for role, mass in masses.items()}}


def headline_long(evaluation, source: str, null_students: bool = False) -> pd.DataFrame:
    """One row per metric × split (overall included): value, CI, scenario counts, and where the split holds public
    goods whether it is off format (value withheld) with the students' mass on the answers. With `null_students`,
    one row per null student × split too (the headline metric, point values: `point_only`)."""
    rows = []
    for metric in TRANSFER_METRICS:
        for split, entry in evaluation.headline(metric).items():
            rows.append({"source": source, "metric": metric, "split": split, **_flat(entry)})
    if null_students:
        for name, splits in evaluation.null_headline().items():
            for split, entry in splits.items():
                flat = _flat(entry)
                rows.append({"source": NULL_SOURCE.format(name), "metric": HEADLINE_METRIC, "split": split,
                             "value": flat.pop(HEADLINE_METRIC), "ci_low": None, "ci_high": None, "point_only": True,
                             **{k: v for k, v in flat.items() if k not in TRANSFER_METRICS}})
    return pd.DataFrame(rows)


def off_format_text(masses: dict) -> str:
    """The cell of a withheld public-goods number: "off format (tuned mass 0.31)"."""
    low = [f"{role} mass {mass:.2f}" for role, mass in masses.items()
           if mass is not None and not (isinstance(mass, float) and math.isnan(mass)) and mass < MIN_FORMAT_MASS]
    return "off format" + (f" ({', '.join(low)})" if low else "")


def _true(value) -> bool:
    """A flag column's value (True, or NaN/None where the row has no such flag)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _headline_cell(entry) -> str:
    if _true(getattr(entry, "off_format", None)):
        return off_format_text({role: getattr(entry, f"{role}_action_mass", None) for role in ("base", "tuned")})
    if _true(getattr(entry, "point_only", None)):
        return percent(entry.value)
    return with_interval(entry.value, entry.ci_low, entry.ci_high)


def headline_markdown(long: pd.DataFrame, printed: dict | None = None) -> pd.DataFrame:
    """Rows: source × metric; columns: splits; cells: value [CI] (a null student's: its point value; a public-goods
    split off format: "off format" with the mass)."""
    rows = []
    for (source, metric), group in long.groupby(["source", "metric"], sort=False):
        row = {"source": source, "metric": metric}
        for entry in group.itertuples():
            row[entry.split] = _headline_cell(entry)
        rows.append(row)
    if printed:
        rows.append({"source": "paper (as printed)", "metric": "improvement",
                     **{s: percent(printed.get(s), 0) if s in printed else "—" for s in HEADLINE_COLUMNS}})
    held_out = long[(long["split"] == "heldout_context") & (long["n_scenarios"] > 0)]
    columns = [c for c in HEADLINE_COLUMNS if c != "heldout_context" or len(held_out)]
    return pd.DataFrame(rows, columns=["source", "metric", *columns]).fillna("—")


def propensity_markdown(propensities: pd.DataFrame) -> pd.DataFrame:
    view = propensities[["role", "model", "split", "game", "context", "mode", "n", "n_parsed", "n_unparsed",
                         "n_C", "n_D", "p", "p_se", "mean_donation", "donation_se",
                         *[c for c in ("action_mass",) if c in propensities]]].copy()
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


def null_students_markdown(null_students: pd.DataFrame) -> pd.DataFrame:
    """The null students' table for reading: percent values, "off format" where the base student is."""
    if null_students.empty:
        return null_students
    view = null_students[["null_student", "split", "n_scenarios", "n_answered"]].copy()
    for metric in TRANSFER_METRICS:
        view[metric] = [off_format_text({"base": mass}) if _true(off) else percent(value)
                        for value, off, mass in zip(null_students[metric], null_students["off_format"],
                                                    null_students["base_action_mass"])]
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


# --- warnings -----------------------------------------------------------------------------------

def _warning_key(warning) -> tuple:
    """Whom a warning concerns and what kind it is (evaluation.EvaluationWarning); an untagged one is its own kind."""
    kind = getattr(warning, "kind", None)
    return (getattr(warning, "role", None), kind) if kind else (None, str(warning))


def fold_warnings(warnings, examples: int = 4) -> list[str]:
    """One line per (role, kind), in order of first appearance: a single warning as it is, a repeated one as
    "N× <the first one> — likewise <a few other scenarios> and M more" (a per-scenario problem, e.g. low action
    mass, repeats for every scenario of a model; the full list is warnings.md/csv)."""
    grouped: dict[tuple, list] = {}
    for warning in warnings:
        grouped.setdefault(_warning_key(warning), []).append(warning)
    lines = []
    for members in grouped.values():
        first = members[0]
        if len(members) == 1:
            lines.append(str(first))
            continue
        others = list(dict.fromkeys(
            " ".join(x for x in (getattr(w, "scenario", None), f"({w.detail})" if getattr(w, "detail", None) else None) if x)
            for w in members[1:]))
        others = [o for o in others if o]
        shown = others[:examples]
        likewise = (f" — likewise {', '.join(shown)}" + (f" and {len(others) - len(shown)} more" if len(others) > len(shown)
                                                          else "")) if shown else ""
        lines.append(f"{len(members)}× {first}{likewise}")
    return lines


def warnings_table(warnings) -> pd.DataFrame:
    """Every warning (warnings.csv/md): its text, and the role, kind, scenario and detail it is tagged with."""
    return pd.DataFrame({"warning": [str(w) for w in warnings],
                         **{k: [getattr(w, k, None) for w in warnings] for k in ("role", "kind", "scenario", "detail")}},
                        columns=["warning", "role", "kind", "scenario", "detail"])
