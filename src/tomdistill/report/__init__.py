"""The evaluation report: summary.json, CSV/Markdown tables, PNG figures and report.md."""
from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pandas as pd

from tomdistill.metrics.null_students import DESCRIPTIONS as NULL_DESCRIPTIONS
from tomdistill.metrics.transfer import MIN_FORMAT_MASS, distance_shares

from . import figures, tables

PROPENSITY_BASIS = {
    "sampled": "share of C among parsed answers (unparsed answers are counted and reported, not part of the "
               "denominator); public goods: mean donation / endowment",
    "exact": "P(C), the model's exact probability of answering C, renormalised over C and D (score mode); public "
             "goods: expected donation / endowment over the complete answers 0..endowment",
}


def propensity_basis(evaluation) -> str:
    kind = evaluation.settings.get("propensity")
    if kind in PROPENSITY_BASIS:
        return PROPENSITY_BASIS[kind]
    return "; ".join(f"{k}: {v}" for k, v in PROPENSITY_BASIS.items())
SUMMARY = "summary.json"
NULL_STUDENTS_BASIS = (
    "students that learned nothing but the teacher's averages, built from the teacher's propensities on the "
    "training scenarios (in_sample: the trained scenarios where the adapter's record says which) and scored "
    "against the same teacher and base; point values, no interval; a group holding a scenario the null student "
    "does not answer has no value")
FORMAT_RULE = (
    f"a split holding public goods is reported only where the base and tuned students' mean mass on the "
    f"public-goods answers (score mode: action_mass; sampled answers: the share that parsed) is at least "
    f"{MIN_FORMAT_MASS:g}; otherwise its value is withheld (off_format: true, with the mass)")


def paper_note(evaluation, reference=None) -> str | None:
    """How these numbers relate to what the paper prints (for the paper's data, or beside a comparison)."""
    from tomdistill.reference import paper_published

    data = evaluation if evaluation.prompt_version == paper_published.PROMPT_VERSION else reference
    if data is None or not data.paper_convention:
        return None
    ours = data.headline("improvement")
    conv = data.paper_convention
    printed = paper_published.PRINTED
    parts = []
    for split in ("in_sample", "oos_context", "oos_game"):
        if split in conv and ours[split]["value"] is not None:
            parts.append(f"{split}: printed {tables.percent(printed[split], 0)}, the paper's arithmetic "
                         f"{tables.percent(conv[split])}, tomdistill {tables.percent(ours[split]['value'])}")
    short = data.propensities[(data.propensities["n_unparsed"] > 0) & (data.propensities["kind"] == "matrix")]
    rows = ", ".join(f"{r.role} {r.game}/{r.context} {int(r.n_C)}/{int(r.n_D)} of {r.n}" for r in short.itertuples())
    return ("The paper's published counts, recomputed. " + "; ".join(parts) + ". The paper's tables divide the C "
            f"counts by all draws even where fewer answers parsed ({rows or 'none here'}), and its public goods "
            "figure uses mean donations rounded to cents; tomdistill uses the share of C among parsed answers and "
            "exact means.")


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def build_summary(evaluation, reference=None, sources=None, artefacts=None) -> dict:
    scenarios = evaluation.scenarios
    undefined = scenarios[~scenarios["defined"]]
    unparsed = {}
    for role, table in evaluation.propensities.groupby("role", sort=False):
        rows = table[table["n_unparsed"] > 0]
        unparsed[role] = {
            "total": int(table["n_unparsed"].sum()),
            "scenarios": [{"split": r.split, "game": r.game, "context": r.context, "unparsed": int(r.n_unparsed),
                           "answers": int(r.n)} for r in rows.itertuples()],
        }
    summary = {
        "models": evaluation.models,
        "prompt_version": evaluation.prompt_version,
        "sources": sources or {},
        "propensity": propensity_basis(evaluation),
        "bootstrap": evaluation.settings.get("bootstrap"),
        "settings": evaluation.settings,
        "improvement": evaluation.headline("improvement"),
        "alignment": evaluation.headline("alignment"),
        "undefined_scenarios": [{"split": r.split, "game": r.game, "context": r.context, "gap": float(r.gap)}
                                for r in undefined.itertuples()],
        "unparsed": unparsed,
        "paper_convention": {"improvement": evaluation.paper_convention,
                             "note": "C divided by all draws (unparsed included); public goods means rounded to cents"},
        "null_students": evaluation.null_headline(),
        "null_students_basis": {"note": NULL_STUDENTS_BASIS, "students": NULL_DESCRIPTIONS},
        "format_rule": {"min_action_mass": MIN_FORMAT_MASS, "note": FORMAT_RULE},
        "warnings": evaluation.warnings,
    }
    if evaluation.action_mass:
        summary["action_mass"] = evaluation.action_mass
    if reference is not None:
        from tomdistill.reference import paper_published

        summary["compare"] = {"paper_published": {
            "improvement": reference.headline("improvement"), "alignment": reference.headline("alignment"),
            "null_students": reference.null_headline(), "printed": paper_published.PRINTED, "citation": paper_published.CITATION,
        }}
    note = paper_note(evaluation, reference)
    if note:
        summary["paper_note"] = note
    if artefacts:
        summary["artefacts"] = artefacts
    return _json_safe(summary)


def write_report(evaluation, output: str | Path, reference=None, sources=None) -> dict:
    """Write every artefact into `output`; return the summary (also written as summary.json)."""
    from tomdistill.reference import paper_published

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    headline = tables.headline_long(evaluation, "this run", null_students=True)
    if reference is not None:
        headline = pd.concat([headline, tables.headline_long(reference, "paper (published counts)")], ignore_index=True)
    printed = paper_published.PRINTED if (reference is not None or
                                          evaluation.prompt_version == paper_published.PROMPT_VERSION) else None
    headline_md = tables.headline_markdown(headline, printed)
    written = {
        "headline": (headline, headline_md),
        "propensities": (evaluation.propensities, tables.propensity_markdown(evaluation.propensities)),
        "transfer_scenarios": (evaluation.scenarios, tables.scenario_markdown(evaluation.scenarios)),
        "transfer_groups": (evaluation.groups, tables.groups_markdown(evaluation.groups)),
        "cooperation": (evaluation.cooperation, tables.cooperation_markdown(evaluation.cooperation)),
        "null_students": (evaluation.null_students, tables.null_students_markdown(evaluation.null_students)),
        "distance_shares": (distance_shares(evaluation.scenarios), None),
        "significance_payoffs": (evaluation.significance, None),
        "significance_models": (evaluation.pairwise, None),
        "warnings": (pd.DataFrame({"warning": evaluation.warnings}), None),
    }
    for name, (frame, markdown) in written.items():
        tables.write_table(frame, output, name, markdown)
    made = figures.write_figures(evaluation, output)
    artefacts = {"tables": [f"{n}.csv" for n in written] + [f"{n}.md" for n in written],
                 "figures": [p.name for p in made.values()], "report": "report.md"}
    summary = build_summary(evaluation, reference, sources, artefacts)
    (output / "report.md").write_text(report_markdown(evaluation, summary, headline_md, made))
    # summary.json last and atomically: its presence marks a complete report (the pipeline relies on it)
    tmp = output / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output / SUMMARY)
    return summary


def report_markdown(evaluation, summary: dict, headline_md: pd.DataFrame, made: dict) -> str:
    models = ", ".join(f"{role}: `{name}`" for role, name in evaluation.models.items())
    parts = [
        "# tomdistill evaluation",
        f"Models — {models}. Prompt version `{evaluation.prompt_version}`.",
        f"Propensity ({tables.propensity_label(evaluation)}): {propensity_basis(evaluation)}.",
        "**improvement** (the paper's metric): per scenario `(p_base − p_tuned) / (p_base − p_teacher)`, mean over "
        "scenarios; above 100% = overshoot, undefined where |base − teacher| < "
        f"{evaluation.settings['epsilon']}. **alignment** (headline): `1 − Σ|p_tuned − p_teacher| / Σ|p_base − p_teacher|`; "
        "100% = indistinguishable from the teacher, 0 = unchanged, negative = moved away. Intervals: "
        f"{int(100 * evaluation.settings['confidence'])}% percentile bootstrap, {evaluation.settings['n_bootstrap']} "
        f"resamples ({evaluation.settings.get('bootstrap')}); a group of one scenario under the scenario bootstrap "
        "has no interval (—). `in_sample` counts the scenarios the adapter was trained on; `heldout_context` the "
        "in-sample games in contexts held out for validation.",
    ]
    labels = evaluation.settings.get("teacher_labels")
    if labels:
        by_split = ", ".join(f"{split} {n}" for split, n in labels.get("scenarios_by_split", {}).items())
        parts.append(f"Training: {sum(labels.get('scenarios_by_split', {}).values())} scenarios ({by_split}); teacher "
                     f"labels used: {labels.get('distributions', 0)} choice distributions, "
                     f"{labels.get('answers', 0)} sampled answers.")
    parts += ["## Headline", tables.markdown_table(headline_md),
              f"Null students ({tables.HEADLINE_METRIC}, point values): {NULL_STUDENTS_BASIS}. "
              + "; ".join(f"`{name}`: {text}" for name, text in NULL_DESCRIPTIONS.items())
              + ". A tuned student at or below them shows no sign that training taught more than the teacher's averages. "
              "Public goods: " + FORMAT_RULE + "."]
    if summary.get("paper_note"):
        parts.append("> " + summary["paper_note"])
    parts.append("## Warnings")
    parts.append("\n".join(f"- {w}" for w in evaluation.warnings) if evaluation.warnings else "None.")
    if not evaluation.null_students.empty:
        parts += ["## Null students per split", tables.markdown_table(tables.null_students_markdown(evaluation.null_students))]
    parts += ["## Transfer per split, game and context", tables.markdown_table(tables.groups_markdown(evaluation.groups))]
    parts += ["## Where the distance to the teacher lies (per split and game: Σ|p_tuned − p_teacher|, its share of "
              "the split's, Σ|p_base − p_teacher|)", tables.markdown_table(distance_shares(evaluation.scenarios))]
    parts += ["## Transfer per scenario", tables.markdown_table(tables.scenario_markdown(evaluation.scenarios))]
    parts += ["## Cooperation per group (mean propensity)", tables.markdown_table(tables.cooperation_markdown(evaluation.cooperation))]
    if not evaluation.significance.empty:
        parts += ["## Tuned model: in-sample game vs scaled payoffs (two-proportion z-test, unpooled SE)",
                  tables.markdown_table(evaluation.significance)]
    parts += ["## Figures", "\n".join(f"![{name}]({path.name})" for name, path in made.items())]
    parts += ["## Answers per scenario and model", tables.markdown_table(tables.propensity_markdown(evaluation.propensities))]
    return "\n\n".join(parts) + "\n"
