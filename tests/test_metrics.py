"""Propensities and the two transfer metrics: hand-computed cases and the paper's published numbers."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from tomdistill.metrics import transfer
from tomdistill.metrics.propensity import PropensityError, answer_table, donation_shares, scenario_propensities


# --- hand-computed cases (teacher, base, tuned) ---------------------------------------------------
# overshoot: base 0.8 -> tuned 0.2 past the teacher at 0.4: improvement 150%, alignment 1 - 0.2/0.4 = 50%
# perfect match: tuned = teacher: both 100%
# moving away: base 0.6, teacher 0.4, tuned 0.7: improvement -0.1/0.2 = -50%, alignment 1 - 0.3/0.2 = -50%
# undefined gap: base 0.5, teacher 0.505 (|gap| < 0.01): improvement undefined, alignment still defined
TEACHER = np.array([0.4, 0.3, 0.4, 0.505])
BASE = np.array([0.8, 0.9, 0.6, 0.5])
TUNED = np.array([0.2, 0.3, 0.7, 0.6])


def test_per_scenario_hand_computed():
    out = transfer.scenario_transfer(TEACHER, BASE, TUNED, epsilon=0.01)
    assert out["improvement"][:3] == pytest.approx([1.5, 1.0, -0.5])
    assert math.isnan(out["improvement"][3])
    assert list(out["defined"]) == [True, True, True, False]
    assert out["alignment"][:3] == pytest.approx([0.5, 1.0, -0.5])
    assert out["alignment"][3] == pytest.approx(1 - 0.095 / 0.005)  # defined, and rightly very negative


def test_group_aggregates_hand_computed():
    scenarios = pd.DataFrame({"split": ["in_sample"] * 4, "game": ["a", "b", "a", "b"], "context": ["x", "x", "y", "y"]})
    groups, masks = transfer.group_masks(scenarios)
    defined = np.abs(BASE - TEACHER) >= 0.01
    out = transfer.group_transfer(TEACHER, BASE, TUNED, masks, defined)
    by_name = {(g["kind"], g["group"]): i for i, g in enumerate(groups)}
    overall = by_name[("overall", "overall")]
    # the undefined scenario is left out of the improvement mean ...
    assert out["improvement"][overall] == pytest.approx((1.5 + 1.0 - 0.5) / 3)
    assert out["n_defined"][overall] == 3 and out["n_scenarios"][overall] == 4
    # ... but alignment sums distances over every scenario: 1 - (0.2+0+0.3+0.095)/(0.4+0.6+0.2+0.005)
    assert out["alignment"][overall] == pytest.approx(1 - 0.595 / 1.205)
    game_b = by_name[("game", "b")]
    assert out["improvement"][game_b] == pytest.approx(1.0)  # only the defined b scenario
    assert out["alignment"][by_name[("context", "x")]] == pytest.approx(1 - 0.2 / 1.0)
    assert out["alignment"][by_name[("scenario", "a/y")]] == pytest.approx(-0.5)


def test_distance_shares_say_which_game_holds_a_splits_remaining_distance():
    # the held-out context: the prisoner's dilemma closed (0.1 of 0.5 left), the stag hunt kept 0.3 of its 0.4
    scenarios = pd.DataFrame({
        "split": ["heldout_context", "heldout_context", "oos_context"],
        "game": ["prisoners_dilemma", "stag_hunt", "stag_hunt"],
        "p_teacher": [0.3, 0.5, 0.4], "p_base": [0.8, 0.9, 0.4], "p_tuned": [0.4, 0.8, 0.4]})
    table = transfer.distance_shares(scenarios).set_index(["split", "game"])
    held_out = table.loc["heldout_context"]
    assert held_out["remaining"].tolist() == pytest.approx([0.1, 0.3])
    assert held_out["share_of_split"].tolist() == pytest.approx([0.25, 0.75])
    assert held_out["alignment"].tolist() == pytest.approx([1 - 0.1 / 0.5, 1 - 0.3 / 0.4])
    # the group alignments weigh up to the split's: 1 - 0.4 / 0.9
    assert 1 - held_out["remaining"].sum() / held_out["base_distance"].sum() == pytest.approx(
        transfer.alignment([0.8, 0.9], [0.4, 0.8], [0.3, 0.5]))
    nothing_left = table.loc[("oos_context", "stag_hunt")]  # no gap before or after: no share, no alignment
    assert math.isnan(nothing_left["share_of_split"]) and math.isnan(nothing_left["alignment"])
    with pytest.raises(ValueError, match="p_tuned"):
        transfer.distance_shares(scenarios.drop(columns="p_tuned"))


def test_group_with_no_defined_scenario_is_nan():
    scenarios = pd.DataFrame({"split": ["in_sample"], "game": ["a"], "context": ["x"]})
    _, masks = transfer.group_masks(scenarios)
    out = transfer.group_transfer([0.5], [0.5], [0.6], masks, [False])
    assert np.isnan(out["improvement"]).all() and np.isnan(out["alignment"]).all()


def test_existing_api_still_works():
    assert transfer.improvement(BASE, TUNED, TEACHER) == pytest.approx(2 / 3)
    assert transfer.alignment(BASE[:3], TUNED[:3], TEACHER[:3]) == pytest.approx(1 - 0.5 / 1.2)
    assert transfer.improvement_per_scenario(BASE, TUNED, TEACHER)[0] == pytest.approx(1.5)
    assert transfer.alignment_per_scenario(BASE, TUNED, TEACHER)[2] == pytest.approx(-0.5)


# --- propensities ---------------------------------------------------------------------------------

def _records(rows):
    return pd.DataFrame(rows, columns=["split", "game", "context", "action", "action_probs"])


def test_generate_mode_counts_unparsed_and_uses_parsed_answers():
    rows = [("in_sample", "snowdrift", "friends", a, "") for a in ["C"] * 6 + ["D"] * 3 + ["unparsed"]]
    props = scenario_propensities(answer_table(_records(rows), "teacher"), "teacher").iloc[0]
    assert (props["n"], props["n_parsed"], props["n_unparsed"], props["n_C"], props["n_D"]) == (10, 9, 1, 6, 3)
    assert props["p"] == pytest.approx(6 / 9)
    assert props["p_se"] == pytest.approx(math.sqrt((6 / 9) * (3 / 9) / 9))


def test_public_goods_mean_donation_and_share():
    rows = [("oos_game", "public_goods", "party", a, "") for a in ["5", "5", "7", "8"]]
    props = scenario_propensities(answer_table(_records(rows), "base", {"public_goods": 10}), "base").iloc[0]
    assert props["kind"] == "public_goods"
    assert props["mean_donation"] == pytest.approx(6.25)
    assert props["p"] == pytest.approx(0.625)
    assert props["donation_se"] == pytest.approx(np.std([5, 5, 7, 8]) / 2)


def test_score_mode_uses_action_probs():
    rows = [("in_sample", "stag_hunt", "team", "C", json.dumps({"C": 0.6, "D": 0.2})),
            ("oos_game", "public_goods", "party", "5", json.dumps({"0": 0.5, "10": 0.5}))]
    props = scenario_propensities(answer_table(_records(rows), "tuned", {"public_goods": 10}), "tuned")
    assert list(props["mode"]) == ["score", "score"]
    assert props["p"].tolist() == pytest.approx([0.75, 0.5])


def test_donation_shares_are_answer_frequencies_or_the_scored_distribution():
    """public_goods.png draws these: a score-mode model's P(amount) (renormalised over the amounts, averaged over
    its records), not one bar at its expected donation; sampled answers by frequency; two-action games left out."""
    sampled = [("oos_game", "public_goods", "party", a, "") for a in ["5", "5", "7", "8", "unparsed"]]
    shares = donation_shares(_records(sampled), answer_table(_records(sampled), "base", {"public_goods": 10}))
    assert shares["amount"].tolist() == list(range(11))
    assert shares.set_index("amount")["share"][[5, 7, 8]].tolist() == pytest.approx([0.5, 0.25, 0.25])
    scored = [("oos_game", "public_goods", "party", "2", json.dumps({"0": 0.1, "2": 0.3, "10": 0.1, "C": 0.5})),
              ("oos_game", "public_goods", "party", "2", json.dumps({"2": 1.0})),
              ("in_sample", "stag_hunt", "team", "C", json.dumps({"C": 0.6, "D": 0.2}))]
    table = answer_table(_records(scored), "tuned", {"public_goods": 10})
    shares = donation_shares(_records(scored), table).set_index("amount")["share"]
    assert len(shares) == 11 and shares.sum() == pytest.approx(1.0)
    assert shares[[0, 2, 10]].tolist() == pytest.approx([0.1, 0.8, 0.1])  # (0.2, 0.6, 0.2) and (0, 1, 0), averaged
    mean = sum(a * p for a, p in shares.items())
    expected = scenario_propensities(table, "tuned")
    assert mean == pytest.approx(expected.set_index("game").loc["public_goods", "mean_donation"])


def test_no_parsed_answers_is_an_error_naming_dataset_and_scenario():
    rows = [("in_sample", "snowdrift", "friends", "unparsed", "")] * 3
    with pytest.raises(PropensityError, match=r"base dataset, scenario snowdrift/friends.*no parsed answers"):
        scenario_propensities(answer_table(_records(rows), "base"), "base")


def test_unknown_split_is_an_error():
    with pytest.raises(PropensityError, match=r"tuned dataset, scenario snowdrift/friends.*unknown split name 'holdout'"):
        answer_table(_records([("holdout", "snowdrift", "friends", "C", "")]), "tuned")


def test_unreadable_actions_are_an_error():
    with pytest.raises(PropensityError, match="neither C/D"):
        answer_table(_records([("in_sample", "snowdrift", "friends", "maybe", "")]), "teacher")


# --- the paper's numbers from the shipped reference data ------------------------------------------

@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    from tomdistill.evaluation import reference_evaluation

    return reference_evaluation(tmp_path_factory.mktemp("cache"), n_bootstrap=200)


@pytest.mark.parametrize("split, improvement, alignment", [
    ("in_sample", 46.65, 33.02), ("oos_context", 18.26, 15.10), ("oos_payoffs", 39.95, 18.76), ("oos_game", 28.32, 28.32),
])
def test_paper_numbers_from_reference_data(paper, split, improvement, alignment):
    assert 100 * paper.headline("improvement")[split]["value"] == pytest.approx(improvement, abs=0.005)
    assert 100 * paper.headline("alignment")[split]["value"] == pytest.approx(alignment, abs=0.005)


def test_paper_arithmetic_explains_printed_numbers(paper):
    # The paper divides by all 300 draws and rounds the donation means: 46.26% / 17.90% / 28.48%.
    conv = paper.paper_convention
    assert 100 * conv["in_sample"] == pytest.approx(46.26, abs=0.005)
    assert 100 * conv["oos_context"] == pytest.approx(17.90, abs=0.005)
    assert 100 * conv["oos_game"] == pytest.approx(28.48, abs=0.005)


def test_reference_data_shape(paper):
    props = paper.propensities
    assert set(paper.models.values()) == {"llama2-70b-chat", "llama2-7b-chat", "llama2-7b-chat-ft"}
    assert len(paper.scenarios) == 53 and (props["n"] == 300).all()
    friends = props[(props["role"] == "teacher") & (props["game"] == "snowdrift") & (props["context"] == "friends")].iloc[0]
    assert (friends["n_C"], friends["n_D"], friends["n_unparsed"]) == (231, 68, 1)
    assert friends["p"] == pytest.approx(231 / 299)
    pg = props[props["kind"] == "public_goods"].set_index("role")["mean_donation"]
    assert pg.to_dict() == pytest.approx({"teacher": 7.0, "base": 5.4933, "tuned": 5.92}, abs=1e-4)


def test_training_val_alignment_and_evaluation_agree_on_the_same_score_records():
    """Training's `val/alignment` (model/lora_module.py: choice_propensity per scenario, then `alignment`) and
    evaluation's (records -> answer table -> scenario propensities -> alignment) are one computation."""
    from tomdistill.metrics.propensity import choice_propensity

    rng = np.random.default_rng(3)
    contexts = ["team", "friends", "business", "diplomacy"]

    def records(role):
        rows = []
        for context in contexts:
            c, d, rest = rng.dirichlet([2, 2, 0.3])  # some mass off the actions, as a student's scores have
            rows.append({"split": "in_sample", "game": "stag_hunt", "context": context, "action": "C" if c > d else "D",
                         "action_probs": json.dumps({"C": c, "D": d})})
        return pd.DataFrame(rows)

    data = {role: records(role) for role in ("teacher", "base", "tuned")}
    training = {role: [choice_propensity(json.loads(raw)) for raw in frame["action_probs"]] for role, frame in data.items()}
    evaluation = {role: scenario_propensities(answer_table(frame, role), role)["p"].to_numpy()
                  for role, frame in data.items()}
    for role in data:
        assert evaluation[role] == pytest.approx(training[role], abs=1e-12)
    value = transfer.alignment(training["base"], training["tuned"], training["teacher"])
    assert transfer.alignment(evaluation["base"], evaluation["tuned"], evaluation["teacher"]) == pytest.approx(value, abs=1e-12)
    assert math.isfinite(value)


def test_mass_shortfall_sums_how_far_each_split_falls_below_the_floor():
    from tomdistill.metrics.transfer import mass_shortfall

    masses = {"in_sample": 1.0, "oos_payoffs": 0.9, "oos_game": 1.4e-6}
    assert mass_shortfall(masses, 0.95) == pytest.approx(0.05 + 0.95 - 1.4e-6)
    assert mass_shortfall(masses, None) == 0.0
    assert mass_shortfall({"in_sample": 0.97}, 0.95) == 0.0
    with pytest.raises(ValueError, match="min_action_mass=0"):
        mass_shortfall(masses, 0)
