"""The evaluation report: summary.json, CSV/Markdown tables, PNG figures and report.md."""
from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pandas as pd

from tomdistill.metrics.null_students import DESCRIPTIONS as NULL_DESCRIPTIONS
from tomdistill.metrics.transfer import HEADLINE_METRIC, MIN_FORMAT_MASS, distance_shares

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


def build_summary(evaluation, reference=None, sources=None, artefacts=None, evaluated=None) -> dict:
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
        # per role: its samples, the model, the weights and the adapter that answered (evaluation.evaluated_model)
        "evaluated": evaluated or {},
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
        "training_cross_entropy": evaluation.training_cross_entropy,
        "format_rule": {"min_action_mass": MIN_FORMAT_MASS, "note": FORMAT_RULE},
        "warnings": evaluation.warnings,
        "warnings_folded": tables.fold_warnings(evaluation.warnings),  # one line per role and kind, as report.md shows
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


def write_report(evaluation, output: str | Path, reference=None, sources=None, evaluated=None) -> dict:
    """Write every artefact into `output`; return the summary (also written as summary.json). `sources`: each role's
    samples as given; `evaluated`: what answered in them (evaluation.evaluated_models), named on report.md's first
    screen."""
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
        "warnings": (tables.warnings_table(evaluation.warnings), tables.warnings_table(evaluation.warnings).fillna("—")),
    }
    for name, (frame, markdown) in written.items():
        tables.write_table(frame, output, name, markdown)
    made = figures.write_figures(evaluation, output)
    artefacts = {"tables": [f"{n}.csv" for n in written] + [f"{n}.md" for n in written],
                 "figures": [p.name for p in made.values()], "report": "report.md"}
    summary = build_summary(evaluation, reference, sources, artefacts, evaluated)
    (output / "report.md").write_text(report_markdown(evaluation, summary, headline_md, made))
    # summary.json last and atomically: its presence marks a complete report (the pipeline relies on it)
    tmp = output / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output / SUMMARY)
    return summary


def compared_table(evaluation, summary: dict) -> pd.DataFrame:
    """What was compared: per role its model, the weights and adapter that answered, and its samples."""
    evaluated, sources = summary.get("evaluated") or {}, summary.get("sources") or {}
    rows = []
    for role, name in evaluation.models.items():
        facts = evaluated.get(role) or {}
        rows.append({"role": role, "model": f"`{name}`",
                     "weights": f"`{facts['weights']}`" if facts.get("weights") else "—",
                     "adapter": f"`{facts['adapter']}`" if facts.get("adapter") else "none",
                     "samples": f"`{facts.get('samples') or sources.get(role)}`" if (facts.get("samples") or sources.get(role))
                     else "—"})
    return pd.DataFrame(rows)


def outcome_sentence(summary: dict, metric: str = HEADLINE_METRIC) -> str:
    """How it came out, in one sentence: the tuned student's overall `metric` with its interval, per split, and
    whether it beats the best null student (compared with the interval, where there is one)."""
    headline = summary.get(metric) or {}
    overall = headline.get("overall") or {}
    splits = ", ".join(f"{split} {tables.percent(entry['value'], 1)}" if entry.get("value") is not None else
                       f"{split} {'off format' if entry.get('off_format') else '—'}"
                       for split, entry in headline.items() if split != "overall" and entry.get("n_scenarios"))
    if overall.get("value") is None:
        masses = ", ".join(f"{role} {mass:.2f}" for role, mass in (overall.get("action_mass") or {}).items()
                           if mass is not None)
        why = (f"withheld: the students put too little probability on the public-goods answers (mass {masses})"
               if overall.get("off_format") else "not computed (see the warnings)")
        return f"**Outcome:** the overall {metric} is {why}; per split: {splits}."
    value, low, high = overall["value"], overall.get("ci_low"), overall.get("ci_high")
    interval = f" [{tables.percent(low, 1)}, {tables.percent(high, 1)}]" if low is not None and high is not None else ""
    text = (f"**Outcome:** the tuned student removed {tables.percent(value, 1)}{interval} of the base student's distance "
            f"to the teacher overall ({metric}; {splits})")
    nulls = [(name, (splits_of.get("overall") or {}).get(metric)) for name, splits_of in
             (summary.get("null_students") or {}).items()]
    nulls = [(name, v) for name, v in nulls if v is not None]
    if nulls:
        name, best = max(nulls, key=lambda item: item[1])
        best_text = f"the null student `{name}` ({tables.percent(best, 1)}), which knows only the teacher's averages"
        above, below = (low, high) if interval else (value, value)
        if above > best:
            text += f", above every null student (best: {best_text})"
        elif below < best:
            text += f", below {best_text}"
        else:
            text += f", not distinguishable from {best_text}"
    return text + "."


def warnings_pointer(n_warnings: int, n_lines: int) -> str:
    """The first screen's line on the warnings: how many, and where they are."""
    if not n_warnings:
        return "No warnings."
    if n_lines == n_warnings:
        return f"{n_warnings} warning(s): see [Warnings](#warnings)."
    return (f"{n_warnings} warnings, folded to {n_lines} line(s) (one per model and kind) under [Warnings](#warnings); "
            "every one in warnings.md.")


def report_markdown(evaluation, summary: dict, headline_md: pd.DataFrame, made: dict) -> str:
    """report.md. Its first screen says what was compared (teacher, base, tuned: models, weights, adapters,
    samples), the headline table and how it came out; the definitions, the warnings (one line per role and kind) and
    the detailed tables follow."""
    level = int(100 * evaluation.settings["confidence"])
    folded = summary.get("warnings_folded") or []
    parts = [
        "# tomdistill evaluation",
        outcome_sentence(summary),
        tables.markdown_table(compared_table(evaluation, summary)),
        f"## Headline ({level}% bootstrap intervals)",
        tables.markdown_table(headline_md),
        warnings_pointer(len(evaluation.warnings), len(folded)),
        f"Prompt version `{evaluation.prompt_version}`. "
        f"Propensity ({tables.propensity_label(evaluation)}): {propensity_basis(evaluation)}.",
        "**improvement** (the paper's metric): per scenario `(p_base − p_tuned) / (p_base − p_teacher)`, mean over "
        "scenarios; above 100% = overshoot, undefined where |base − teacher| < "
        f"{evaluation.settings['epsilon']}. **alignment** (headline): `1 − Σ|p_tuned − p_teacher| / Σ|p_base − p_teacher|`; "
        "100% = indistinguishable from the teacher, 0 = unchanged, negative = moved away. Intervals: "
        f"{level}% percentile bootstrap, {evaluation.settings['n_bootstrap']} "
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
    parts.append(f"Null students ({tables.HEADLINE_METRIC}, point values): {NULL_STUDENTS_BASIS}. "
                 + "; ".join(f"`{name}`: {text}" for name, text in NULL_DESCRIPTIONS.items())
                 + ". A tuned student at or below them shows no sign that training taught more than the teacher's "
                 "averages. Public goods: " + FORMAT_RULE + ".")
    floors = evaluation.training_cross_entropy
    if floors:
        parts.append("On the two-action training scenarios, the teacher's own entropy is "
                     f"{floors['teacher']:.3f} nats (the floor of the soft loss) and the null students' cross-entropy "
                     "against it " + ", ".join(f"`{name}` {value:.3f}" for name, value in floors.items()
                                               if name != "teacher")
                     + ": a training loss at `context_mean`'s has learned the contexts alone, and the gap from there "
                     "to the teacher's entropy is all the games add.")
    if summary.get("paper_note"):
        parts.append("> " + summary["paper_note"])
    parts.append("## Warnings")
    parts.append("\n".join(f"- {w}" for w in folded) + "\n\nOne line per model and kind; every warning: warnings.md."
                 if folded else "None.")
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
