"""Null students (issue 49, item 5) and public goods off format (item 4): the students that learned nothing but the
teacher's averages, scored beside the tuned one, and the public-goods numbers withheld where the students mostly
answer outside the format."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tomdistill.evaluation import compute_evaluation, reference_evaluation
from tomdistill.metrics import MIN_FORMAT_MASS, format_verdict, null_propensities, uniform_amounts_propensity
from tomdistill.metrics.transfer import alignment
from tomdistill.reference import paper_published
from tomdistill.report import build_summary
from tomdistill.report import tables

BASES = {"prisoners_dilemma_x2": "prisoners_dilemma"}
ENDOWMENTS = {"public_goods": 10}


def records(spec: dict, role: str) -> pd.DataFrame:
    """Generate-mode records: spec maps (split, game, context) to {role: {action: count}}."""
    rows = [{"model": role, "split": split, "game": game, "context": context, "action": action, "action_probs": "",
             "action_mass": math.nan, "prompt_version": "test"}
            for (split, game, context), answers in spec.items() for action, count in answers[role].items()
            for _ in range(count)]
    return pd.DataFrame(rows)


def scored(spec: dict, role: str, masses: dict | None = None) -> pd.DataFrame:
    """Score-mode records: spec maps (split, game, context) to {role: {action: probability}}; `masses` gives a
    scenario's action_mass (default 1)."""
    rows = [{"model": role, "split": split, "game": game, "context": context, "action": max(probs, key=probs.get),
             "action_probs": json.dumps(probs), "action_mass": (masses or {}).get((role, game, context), 1.0),
             "prompt_version": "test"}
            for (split, game, context), by_role in spec.items() for probs in [by_role[role]]]
    return pd.DataFrame(rows)


def share(c: int, n: int = 10) -> dict:
    return {"C": c, "D": n - c}


# teacher / base propensities (C out of 10; public goods: everyone gives 8 / 2 dollars): the hand computations below
SPEC = {
    ("in_sample", "prisoners_dilemma", "business"): {"teacher": share(2), "base": share(6), "tuned": share(3)},
    ("in_sample", "stag_hunt", "friends"): {"teacher": share(8), "base": share(4), "tuned": share(7)},
    ("in_sample", "prisoners_dilemma", "friends"): {"teacher": share(6), "base": share(2), "tuned": share(5)},
    ("oos_context", "stag_hunt", "athletes"): {"teacher": share(9), "base": share(1), "tuned": share(5)},
    ("oos_payoffs", "prisoners_dilemma_x2", "business"): {"teacher": share(1), "base": share(9), "tuned": share(5)},
    ("oos_game", "public_goods", "party"): {"teacher": {"8": 10}, "base": {"2": 10}, "tuned": {"5": 10}},
}


def evaluate(spec=SPEC, make=records, **kwargs):
    data = {role: make(spec, role) for role in ("teacher", "base", "tuned")}
    return compute_evaluation(data, endowments=ENDOWMENTS, game_bases=BASES, n_bootstrap=50, **kwargs)


def null_value(evaluation, student: str, split: str, metric: str = "alignment"):
    return evaluation.null_headline()[student][split][metric]


# --- by hand -----------------------------------------------------------------------------------------------

def test_each_null_student_is_computed_by_hand():
    """Training: PD/business 0.2, SH/friends 0.8, PD/friends 0.6 -> mean 8/15; business 0.2, friends 0.7; PD 0.4,
    SH 0.8. Base-teacher distances: in_sample 0.4 each (1.2), athletes 0.8, PD x2/business 0.8, party 0.6."""
    ev = evaluate()
    m = 8 / 15
    expected = {
        "teacher_mean": {"in_sample": 1 - (abs(m - .2) + abs(m - .8) + abs(m - .6)) / 1.2,  # 4/9
                         "oos_context": 1 - (.9 - m) / .8, "oos_payoffs": 1 - (m - .1) / .8, "oos_game": 1 - (.8 - m) / .6},
        # knows the context: business 0.2, friends 0.7; athletes and party were not trained: the overall mean
        "context_mean": {"in_sample": 1 - (0 + .1 + .1) / 1.2, "oos_context": 1 - (.9 - m) / .8,
                         "oos_payoffs": 1 - .1 / .8, "oos_game": 1 - (.8 - m) / .6},
        # knows the game: PD 0.4 (the doubled PD is a PD), SH 0.8; public goods was not trained: the overall mean
        "game_mean": {"in_sample": 1 - (.2 + 0 + .2) / 1.2, "oos_context": 1 - .1 / .8,
                      "oos_payoffs": 1 - .3 / .8, "oos_game": 1 - (.8 - m) / .6},
        # public goods only: $5 expected of $10, 0.3 from the teacher's 0.8 against the base's 0.6
        "uniform_amounts": {"in_sample": None, "oos_context": None, "oos_payoffs": None, "oos_game": 1 - .3 / .6},
    }
    assert expected["teacher_mean"]["in_sample"] == pytest.approx(4 / 9)
    for student, splits in expected.items():
        for split, value in splits.items():
            got = null_value(ev, student, split)
            assert (got is None) if value is None else got == pytest.approx(value), (student, split, got, value)
    # overall: every scenario's distance over every base distance (3.4)
    after = (abs(m - .2) + abs(m - .8) + abs(m - .6)) + (.9 - m) + (m - .1) + (.8 - m)
    assert null_value(ev, "teacher_mean", "overall") == pytest.approx(1 - after / 3.4)
    assert null_value(ev, "uniform_amounts", "overall") is None  # it answers no two-action game
    # improvement over the same defined scenarios: (base − null) / (base − teacher)
    assert null_value(ev, "teacher_mean", "oos_game", "improvement") == pytest.approx((.2 - m) / (.2 - .8))
    assert null_value(ev, "game_mean", "in_sample", "improvement") == pytest.approx(
        np.mean([(.6 - .4) / (.6 - .2), (.4 - .8) / (.4 - .8), (.2 - .4) / (.2 - .6)]))
    table = ev.null_students.set_index(["null_student", "split"])
    assert table.loc[("uniform_amounts", "overall"), "n_answered"] == 1
    assert table.loc[("teacher_mean", "in_sample"), "n_scenarios"] == 3


def test_null_students_learn_from_the_trained_scenarios_only():
    """With the adapter's training record the held-out context is not training data: business (held out) is
    answered with the overall training mean by context_mean, and PD's mean is friends' alone."""
    training = {"trained_scenarios": ["stag_hunt/friends", "prisoners_dilemma/friends"],
                "validation_contexts": ["business"]}
    ev = evaluate(training=training)
    scenarios = ev.scenarios.assign(endowment=[np.nan] * 5 + [10])
    trained = pd.DataFrame({"game": ["stag_hunt", "prisoners_dilemma"], "context": ["friends", "friends"],
                            "p": [.8, .6]})
    nulls = null_propensities(trained, scenarios, BASES)
    by_scenario = dict(zip(scenarios["game"] + "/" + scenarios["context"], nulls["context_mean"]))
    assert by_scenario["prisoners_dilemma/business"] == pytest.approx(.7)  # the held-out context: the overall mean
    assert by_scenario["prisoners_dilemma_x2/business"] == pytest.approx(.7)
    # heldout_context holds PD/business (teacher 0.2, base 0.6): every mean-based null student gives 0.7 or 0.6
    assert null_value(ev, "context_mean", "heldout_context") == pytest.approx(1 - .5 / .4)
    assert null_value(ev, "game_mean", "heldout_context") == pytest.approx(1 - .4 / .4)
    assert null_value(ev, "teacher_mean", "in_sample") == pytest.approx(1 - (.1 + .1) / .8)


def test_the_uniform_answer_is_half_the_endowment_by_hand():
    # every amount 0..E equally likely: expected donation E/2, the propensity (donation / endowment) 1/2
    assert uniform_amounts_propensity(10) == pytest.approx(sum(range(11)) / 11 / 10) == pytest.approx(0.5)
    assert uniform_amounts_propensity(4) == pytest.approx((0 + 1 + 2 + 3 + 4) / 5 / 4)
    scenarios = pd.DataFrame({"game": ["public_goods", "stag_hunt"], "context": ["party", "team"],
                              "kind": ["public_goods", "matrix"], "endowment": [10, np.nan]})
    training = pd.DataFrame({"game": ["stag_hunt"], "context": ["team"], "p": [0.9]})
    uniform = null_propensities(training, scenarios)["uniform_amounts"]
    assert uniform[0] == pytest.approx(0.5) and math.isnan(uniform[1])
    # a student spread evenly over $0–10 against a teacher giving $8 and a base giving $2: 1 − |5 − 8| / |2 − 8|
    assert alignment([0.2], [uniform[0]], [0.8]) == pytest.approx(0.5)


# --- public goods off format ---------------------------------------------------------------------------------

def test_the_format_floor_is_one_number():
    assert MIN_FORMAT_MASS == 0.5
    assert format_verdict({"base": 0.9, "tuned": 0.49})["off_format"]
    assert format_verdict({"base": 0.9, "tuned": 0.49})["reason"].endswith("tuned 0.49")
    assert not format_verdict({"base": 0.9, "tuned": 0.5})["off_format"]
    assert not format_verdict({"base": None, "tuned": 0.7})["off_format"]  # an unknown mass neither passes nor fails


@pytest.mark.parametrize("mass, off", [(0.49, True), (0.5, False)])
def test_a_public_goods_number_needs_half_the_mass_on_the_answers_score_mode(mass, off):
    spec = {key: {role: ({"8": 1.0} if role == "teacher" else {"2": 1.0} if role == "base" else {"5": 1.0})
                  if key[1] == "public_goods" else {"C": c["C"] / 10, "D": c["D"] / 10} for role, c in value.items()}
            for key, value in SPEC.items()}
    ev = evaluate(spec, lambda s, role: scored(s, role, {("tuned", "public_goods", "party"): mass}))
    for metric in ("alignment", "improvement"):
        headline = ev.headline(metric)
        for split in ("oos_game", "overall"):  # both hold the public-goods scenario
            entry = headline[split]
            assert entry["off_format"] is off and entry["action_mass"] == {"base": 1.0, "tuned": mass}
            if off:
                assert entry["value"] is None and entry["ci_low"] is None and "tuned 0.49" in entry["reason"]
            else:
                assert entry["value"] == pytest.approx(0.5 if split == "oos_game" and metric == "alignment"
                                                       else entry["value"])
                assert entry["value"] is not None
        assert "off_format" not in headline["in_sample"] and headline["in_sample"]["value"] is not None
    summary = build_summary(ev)
    assert summary["alignment"]["oos_game"]["off_format"] is off
    assert (summary["alignment"]["oos_game"]["value"] is None) is off
    assert summary["format_rule"]["min_action_mass"] == MIN_FORMAT_MASS
    cell = tables.headline_markdown(tables.headline_long(ev, "this run", null_students=True)).iloc[1]["oos_game"]
    assert (cell == "off format (tuned mass 0.49)") if off else cell.startswith("50.00%")
    # the tuned student's format does not touch the null students: they answer in format
    assert null_value(ev, "uniform_amounts", "oos_game") == pytest.approx(0.5)


@pytest.mark.parametrize("unparsed, off", [(51, True), (50, False)])
def test_sampled_answers_count_unparsed_ones_as_mass_off_the_format(unparsed, off):
    spec = dict(SPEC)
    spec[("oos_game", "public_goods", "party")] = {"teacher": {"8": 100}, "base": {"2": 100},
                                                   "tuned": {"5": 100 - unparsed, "unparsed": unparsed}}
    ev = evaluate(spec)
    entry = ev.headline("alignment")["oos_game"]
    assert entry["off_format"] is off and entry["action_mass"]["tuned"] == pytest.approx((100 - unparsed) / 100)
    assert (entry["value"] is None) is off


def test_a_base_off_format_withholds_the_null_students_too():
    spec = dict(SPEC)
    spec[("oos_game", "public_goods", "party")] = {"teacher": {"8": 10}, "base": {"2": 4, "unparsed": 6},
                                                   "tuned": {"5": 10}}
    ev = evaluate(spec)
    assert ev.headline("alignment")["oos_game"]["off_format"]
    entry = ev.null_headline()["uniform_amounts"]["oos_game"]
    assert entry["off_format"] and entry["alignment"] is None and entry["action_mass"] == {"base": 0.4}
    assert ev.null_headline()["teacher_mean"]["in_sample"]["alignment"] is not None


# --- the paper's published counts ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return reference_evaluation(tmp_path_factory.mktemp("cache"), n_bootstrap=200)


def _by_hand_from_counts():
    """Per scenario and role: the share of C among parsed answers (public goods: mean donation / 10), from
    counts.csv alone."""
    counts = paper_published.counts()
    parsed = counts[counts["action"] != "unparsed"]
    rows = {}
    for (split, game, context, role), group in parsed.groupby(["split", "game", "context", "model"]):
        if game == "public_goods":
            value = (group["action"].astype(int) * group["count"]).sum() / group["count"].sum() / 10
        else:
            value = group.loc[group["action"] == "C", "count"].sum() / group["count"].sum()
        rows.setdefault((split, game, context), {})[role] = value
    return pd.DataFrame([{"split": k[0], "game": k[1], "context": k[2], **v} for k, v in rows.items()])


def test_the_teacher_mean_null_student_from_the_shipped_counts(paper):
    """70b teacher, the paper's 7b as base: answering everything with the 70b's mean in-sample share of C.
    (The issue's 0.51 / 0.52 / 0.47 are against SmolLM2's base scores, which the counts do not hold.)"""
    table = _by_hand_from_counts()
    mean = table.loc[table["split"] == "in_sample", "teacher"].mean()
    assert mean == pytest.approx(0.520, abs=5e-4)
    for split in ("in_sample", "oos_context", "oos_payoffs", "oos_game"):
        chosen = table[table["split"] == split]
        by_hand = 1 - (chosen["teacher"] - mean).abs().sum() / (chosen["base"] - chosen["teacher"]).abs().sum()
        assert null_value(paper, "teacher_mean", split) == pytest.approx(by_hand), split
    assert [round(null_value(paper, "teacher_mean", s), 2) for s in ("in_sample", "oos_context", "oos_payoffs")] \
        == [0.48, 0.49, 0.44]
    assert [round(null_value(paper, "context_mean", s), 2) for s in ("in_sample", "oos_context", "oos_payoffs")] \
        == [0.85, 0.49, 0.49]
    # public goods: the 70b gives $7 every time, the 7b $5 × 226 and $7 × 74 (mean $5.493); uniform: $5
    assert null_value(paper, "uniform_amounts", "oos_game") == pytest.approx(1 - (7 - 5) / (7 - 1648 / 300))


def test_the_papers_7b_student_is_below_the_null_students_on_the_two_action_splits(paper):
    """The paper's 7b tuned student (0.33 / 0.15 / 0.19) is below every mean-based null student on the in-sample
    scenarios, the new contexts and the doubled payoffs. On public goods it is above them here: against the 7b's
    own base (mean $5.49, near the uniform $5) the null students move away from the 70b's $7; the issue's "below
    all of them" there is against SmolLM2's base."""
    tuned = paper.headline("alignment")
    assert [round(tuned[s]["value"], 2) for s in ("in_sample", "oos_context", "oos_payoffs", "oos_game")] \
        == [0.33, 0.15, 0.19, 0.28]
    for student in ("teacher_mean", "context_mean", "game_mean"):
        for split in ("in_sample", "oos_context", "oos_payoffs", "overall"):
            assert tuned[split]["value"] < null_value(paper, student, split), (student, split)
    for student in ("teacher_mean", "context_mean", "game_mean", "uniform_amounts"):
        assert tuned["oos_game"]["value"] > null_value(paper, student, "oos_game"), student
    assert not tuned["oos_game"]["off_format"]  # every published answer parsed: mass 1


def test_the_report_sets_the_null_students_beside_the_tuned_one(paper, tmp_path):
    from tomdistill.report import write_report

    summary = write_report(paper, tmp_path)
    assert set(summary["null_students"]) == {"teacher_mean", "context_mean", "game_mean", "uniform_amounts"}
    assert summary["null_students"]["teacher_mean"]["in_sample"]["alignment"] == pytest.approx(
        null_value(paper, "teacher_mean", "in_sample"))
    headline = (tmp_path / "headline.md").read_text()
    assert "null student: teacher_mean" in headline and "null student: uniform_amounts" in headline
    assert "## Null students per split" in (tmp_path / "report.md").read_text()
    assert pd.read_csv(tmp_path / "null_students.csv").shape[0] == 4 * 5  # 4 students × 4 splits and overall
    assert json.loads((tmp_path / "summary.json").read_text())["null_students"] == summary["null_students"]


def test_the_cross_entropy_on_the_training_scenarios_by_hand():
    from tomdistill.metrics.null_students import training_cross_entropy

    training = pd.DataFrame({"game": ["pd", "sh", "pd", "sh", "pg"], "context": ["a", "a", "b", "b", "a"],
                             "kind": ["matrix"] * 4 + ["public_goods"], "p": [0.2, 0.6, 0.4, 0.8, 0.9]})

    def ce(p, q):
        return -(p * math.log(q) + (1 - p) * math.log(1 - q))

    floors = training_cross_entropy(training)
    # the means mix in the public-goods share (as the null students do); only the two-action rows are scored
    by_context, by_game, overall = {"a": 1.7 / 3, "b": 0.6}, {"pd": 0.3, "sh": 0.7}, 2.9 / 5
    rows = [("pd", "a", 0.2), ("sh", "a", 0.6), ("pd", "b", 0.4), ("sh", "b", 0.8)]
    assert floors["teacher"] == pytest.approx(np.mean([ce(p, p) for _, _, p in rows]))
    assert floors["context_mean"] == pytest.approx(np.mean([ce(p, by_context[c]) for _, c, p in rows]))
    assert floors["game_mean"] == pytest.approx(np.mean([ce(p, by_game[g]) for g, _, p in rows]))
    assert floors["teacher_mean"] == pytest.approx(np.mean([ce(p, overall) for _, _, p in rows]))
    assert "uniform_amounts" not in floors and training_cross_entropy(training[training["kind"] != "matrix"]) == {}


def test_the_70bs_choices_are_its_context_means_to_within_a_hundredth_of_a_nat(paper, tmp_path):
    """From the shipped counts: on its 20 in-sample scenarios the 70b's own entropy is 0.627 nats and answering with
    its mean for each context costs 0.634, for each game 0.691: the games add 0.007 nats to learn, the contexts
    0.058 (docs/findings.md, "The real teacher")."""
    from tomdistill.report import write_report

    floors = paper.training_cross_entropy
    assert {k: round(v, 3) for k, v in floors.items()} == {
        "teacher": 0.627, "context_mean": 0.634, "game_mean": 0.691, "teacher_mean": 0.692}
    summary = write_report(paper, tmp_path)
    assert summary["training_cross_entropy"] == floors
    assert "the teacher's own entropy is 0.627 nats" in (tmp_path / "report.md").read_text()
