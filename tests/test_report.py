"""The evaluation report (src/tomdistill/report): warnings folded per model and kind, report.md's first screen, and
what the figures draw (computed by pure functions, so tested on their tables, not on pixels)."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from tomdistill.evaluation import EvaluationWarning, compute_evaluation
from tomdistill.records import MIN_MASS
from tomdistill.report import figures, outcome_sentence, tables, write_report

GAMES = ("prisoners_dilemma", "stag_hunt", "snowdrift")
CONTEXTS = ("team", "business", "friends")


def score_records(mass: dict[str, float], party_mass: float = 0.9) -> dict[str, pd.DataFrame]:
    """Score-mode records for 9 in-sample scenarios, one oos_context scenario (a one-scenario context) and public
    goods, with each role's `action_mass` everywhere (the students': `party_mass` on the public goods answers)."""
    rng = np.random.default_rng(0)
    rows = [("in_sample", g, c) for g in GAMES for c in CONTEXTS] + [("oos_context", "stag_hunt", "athletes")]
    p = {"teacher": rng.uniform(0.1, 0.4, len(rows)), "base": rng.uniform(0.7, 0.9, len(rows))}
    p["tuned"] = (p["teacher"] + p["base"]) / 2 + rng.normal(0, 0.05, len(rows))
    out = {}
    for role in ("teacher", "base", "tuned"):
        records = [{"split": s, "game": g, "context": c, "action": "C", "model": f"{role}-model", "prompt_version": "v1",
                    "action_probs": json.dumps({"C": p[role][i], "D": 1 - p[role][i]}), "action_mass": mass[role]}
                   for i, (s, g, c) in enumerate(rows)]
        donation = {"teacher": 7, "base": 3, "tuned": 5}[role]
        probs = {str(a): (0.6 if a == donation else 0.04) for a in range(11)}
        records.append({"split": "oos_game", "game": "public_goods", "context": "party", "action": str(donation),
                        "model": f"{role}-model", "prompt_version": "v1", "action_probs": json.dumps(probs),
                        "action_mass": mass[role] if role == "teacher" else party_mass})
        out[role] = pd.DataFrame(records)
    return out


def evaluation(mass=None, **kwargs):
    mass = mass or {"teacher": 1.0, "base": 0.9, "tuned": 0.9}
    return compute_evaluation(score_records(mass, **kwargs), endowments={"public_goods": 10}, n_bootstrap=200)


# --- warnings -----------------------------------------------------------------------------------

def test_repeated_warnings_fold_to_one_line_per_model_and_kind():
    repeated = [EvaluationWarning(f"base: action_mass g/c{i}: only 0.3{i % 10} of the probability falls on the actions",
                                  role="base", kind="action_mass_low", scenario=f"g/c{i}", detail=f"0.3{i % 10}")
                for i in range(53)]
    tuned = [EvaluationWarning(str(w).replace("base", "tuned"), role="tuned", kind="action_mass_low",
                               scenario=w.scenario, detail=w.detail) for w in repeated]
    plain = "the tuned samples do not say which scenarios their adapter was trained on"
    folded = tables.fold_warnings([plain, *repeated, *tuned], examples=4)
    assert len(folded) == 3
    assert folded[0] == plain  # a single warning stays as it is
    assert folded[1].startswith("53× base: action_mass g/c0: only 0.30")  # the count and the first in full
    assert "likewise g/c1 (0.31), g/c2 (0.32), g/c3 (0.33), g/c4 (0.34) and 48 more" in folded[1]
    assert folded[2].startswith("53× tuned:")


def test_low_mass_everywhere_gives_one_report_line_per_model_and_the_full_list_in_warnings_md(tmp_path):
    result = evaluation({"teacher": 1.0, "base": 0.3, "tuned": 0.4}, party_mass=0.3)
    mass_warnings = [w for w in result.warnings if "action_mass" in w]
    assert len(mass_warnings) == 2 * 11  # every scenario of both students, as before: nothing is lost
    summary = write_report(result, tmp_path)
    assert summary["warnings"] == [str(w) for w in result.warnings]  # summary.json keeps every warning's text
    folded_mass = [w for w in summary["warnings_folded"] if "action_mass" in w]
    assert [w.split(":")[0] for w in folded_mass] == ["11× base", "11× tuned"]
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Warnings", 1)[1].split("\n## ", 1)[0]
    assert sum(line.startswith("- ") for line in section.splitlines()) == len(summary["warnings_folded"])
    full = pd.read_csv(tmp_path / "warnings.csv")
    assert len(full) == len(result.warnings) and set(full.loc[full["kind"] == "action_mass_low", "role"]) == {"base", "tuned"}


# --- report.md's first screen -------------------------------------------------------------------

def test_the_first_screen_names_what_was_compared_and_how_it_came_out(tmp_path):
    evaluated = {"teacher": {"samples": "runs/x/teacher", "model": "teacher-model", "weights": "recorded answers",
                             "adapter": None},
                 "base": {"samples": "runs/x/base", "model": "base-model", "weights": "/models/small", "adapter": None},
                 "tuned": {"samples": "runs/x/tuned", "model": "tuned-model", "weights": "/models/small",
                           "adapter": "/runs/x/train/adapter"}}
    summary = write_report(evaluation(), tmp_path, sources={r: e["samples"] for r, e in evaluated.items()},
                           evaluated=evaluated)
    first_screen = "\n".join((tmp_path / "report.md").read_text().splitlines()[:25])
    for text in ("runs/x/base", "runs/x/tuned", "/runs/x/train/adapter", "/models/small", "**Outcome:**",
                 "## Headline", "| this run | alignment |"):
        assert text in first_screen
    assert summary["evaluated"] == evaluated and summary["sources"]["tuned"] == "runs/x/tuned"


def test_the_outcome_sentence_compares_the_interval_with_the_best_null_student():
    def summary(value, low, high, null):
        return {"alignment": {"in_sample": {"value": 0.8, "n_scenarios": 4},
                              "overall": {"value": value, "ci_low": low, "ci_high": high, "n_scenarios": 4}},
                "null_students": {"teacher_mean": {"overall": {"alignment": null}},
                                  "uniform_amounts": {"overall": {"alignment": None}}}}

    assert "removed 60.0% [50.0%, 70.0%]" in outcome_sentence(summary(0.6, 0.5, 0.7, 0.3))
    assert "above every null student" in outcome_sentence(summary(0.6, 0.5, 0.7, 0.3))
    assert "below the null student `teacher_mean`" in outcome_sentence(summary(0.6, 0.5, 0.7, 0.8))
    assert "not distinguishable from the null student" in outcome_sentence(summary(0.6, 0.5, 0.7, 0.62))
    assert "overall alignment is not computed" in outcome_sentence(summary(None, None, None, 0.3))
    withheld = summary(None, None, None, 0.3)
    withheld["alignment"]["overall"].update(off_format=True, action_mass={"base": 0.26, "tuned": 0.9})
    assert ("overall alignment is withheld: the students put too little probability on the public-goods answers "
            "(mass base 0.26, tuned 0.90); per split: in_sample 80.0%.") in outcome_sentence(withheld)


# --- figures ------------------------------------------------------------------------------------

def test_one_scenario_groups_get_no_interval_and_low_mass_groups_are_marked():
    result = evaluation({"teacher": 1.0, "base": 0.9, "tuned": 0.9})
    props = result.propensities.copy()
    props.loc[(props["role"] == "tuned") & (props["context"] == "friends"), "action_mass"] = 0.2
    bars = figures.transfer_bars(result.groups, props, "oos_context", "context")
    assert list(bars["n_scenarios"].unique()) == [1] and not bars["has_interval"].any()
    bars = figures.transfer_bars(result.groups, props, "in_sample", "context")
    assert bars["has_interval"].all()
    assert set(bars.loc[bars["low_mass"], "group"]) == {"friends"}


def test_an_interval_cut_at_the_axis_is_marked_with_its_bound():
    bars = pd.DataFrame({"value": [0.5, 0.8, 0.3], "ci_low": [0.4, -2.0, math.nan], "ci_high": [0.6, 3.5, math.nan],
                         "has_interval": [True, True, False]})
    limits = figures.axis_limits(bars["value"])
    assert limits == (-0.25, 1.25)
    clipped = figures.clip_intervals(bars, limits)
    assert list(clipped["cut_low"]) == [False, True, False] and list(clipped["cut_high"]) == [False, True, False]
    assert clipped.loc[1, "draw_low"] == -0.25 and clipped.loc[1, "draw_high"] == 1.25
    assert clipped.loc[0, "draw_high"] == 0.6 and math.isnan(clipped.loc[2, "draw_low"])  # none drawn: no interval


def test_the_heatmap_and_the_cooperation_bars_mark_low_mass():
    result = evaluation({"teacher": 1.0, "base": 0.3, "tuned": 0.9})
    values, texts = figures.heatmap_cells(result.scenarios, result.propensities)
    marked = texts.apply(lambda column: column.str.endswith("*"))
    assert marked["base"].to_dict() == {row: "public_goods" not in row for row in texts.index}  # party: mass 0.9
    assert not marked["tuned"].any() and not marked["teacher"].any()
    assert values.shape == (len(result.scenarios), 3)
    bars = figures.cooperation_bars(result.propensities, "game")
    assert set(bars.loc[bars["low_mass"], "role"]) == {"base"}
    assert (bars["min_mass"] < MIN_MASS).equals(bars["low_mass"])


def test_the_figures_are_readable_at_their_printed_size(tmp_path):
    built = figures.build_figures(evaluation({"teacher": 1.0, "base": 0.3, "tuned": 0.9}, party_mass=0.3))
    assert set(built) == set(figures.FIGURES)
    try:
        for name, fig in built.items():
            assert fig.get_size_inches()[0] <= figures.PRINT_WIDTH, name
            assert figures.smallest_font(fig) >= figures.MIN_FONT, name
    finally:
        import matplotlib.pyplot as plt

        for fig in built.values():
            plt.close(fig)


@pytest.mark.parametrize("manifest, weights, adapter", [
    ({"model": "m", "adapter": "/a", "config": {"model": {"name_or_path": "/ckpt"}}}, "/ckpt", "/a"),
    ({"model": "m", "config": {"paths": {"cache_dir": "/c"}, "model": {"gguf": {"package": "p", "file": "f.gguf"},
                                                                       "cache_name": "snap"}}},
     "/c/models/snap (from p/f.gguf)", None),
    ({"model": "t", "recording": {"source": "reference:paper_published/teacher"}},
     "recorded answers from reference:paper_published/teacher", None),
    ({}, None, None),
])
def test_the_evaluated_weights_and_adapter_come_from_the_samples_manifest(manifest, weights, adapter):
    from tomdistill.evaluation import evaluated_model

    facts = evaluated_model(manifest, "runs/x/base")
    assert (facts["weights"], facts["adapter"], facts["samples"]) == (weights, adapter, "runs/x/base")
