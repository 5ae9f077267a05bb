"""The scenario catalogue (validation, extension by data), prompts for both roles, prompt_version."""
import shutil
from pathlib import Path

import pytest
import yaml

from tomdistill import CATALOGUE_DIR
from tomdistill.scenarios import (
    CatalogueError,
    build_messages,
    load_catalogue,
    prompt_version,
    render_prompt,
)


@pytest.fixture()
def catalogue_copy(tmp_path) -> Path:
    target = tmp_path / "catalogue"
    shutil.copytree(CATALOGUE_DIR, target)
    return target


def _edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_shipped_catalogue_has_the_four_splits(catalogue):
    counts = {split: len(catalogue.scenarios([split])) for split in catalogue.splits}
    assert counts == {"in_sample": 20, "oos_context": 12, "oos_payoffs": 20, "oos_game": 4}  # public goods in 4 contexts
    doubled = catalogue.games["prisoners_dilemma_x2"]
    assert doubled.payoff("D", "C") == 2 * catalogue.games["prisoners_dilemma"].payoff("D", "C")


def _error_for(catalogue_dir: Path) -> str:
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(catalogue_dir)
    return str(caught.value)


def test_missing_payoff_names_file_and_key(catalogue_copy):
    game = catalogue_copy / "games" / "stag_hunt.yaml"
    _edit(game, lambda d: d["payoffs"]["D"].pop("C"))
    message = _error_for(catalogue_copy)
    assert str(game) in message and "payoffs.D" in message


def test_unknown_action_names_file_and_key(catalogue_copy):
    game = catalogue_copy / "games" / "snowdrift.yaml"
    _edit(game, lambda d: d["payoffs"].update({"X": {"C": 1, "D": 2}}))
    message = _error_for(catalogue_copy)
    assert str(game) in message and "'payoffs'" in message and "X" in message


def test_unknown_action_label_list_is_refused(catalogue_copy):
    game = catalogue_copy / "games" / "snowdrift.yaml"
    _edit(game, lambda d: d.update({"actions": ["C", "E"]}))
    message = _error_for(catalogue_copy)
    assert str(game) in message and "'actions'" in message


def test_wrong_shape_names_file_and_key(catalogue_copy):
    game = catalogue_copy / "games" / "prisoners_delight.yaml"
    _edit(game, lambda d: d["payoffs"].update({"C": [10, 3]}))
    message = _error_for(catalogue_copy)
    assert str(game) in message and "payoffs.C" in message


def test_non_numeric_payoff_names_the_cell(catalogue_copy):
    game = catalogue_copy / "games" / "prisoners_delight.yaml"
    _edit(game, lambda d: d["payoffs"]["C"].update({"D": "three"}))
    assert "payoffs.C.D" in _error_for(catalogue_copy)


def test_duplicate_game_name_names_both_files(catalogue_copy):
    copy = catalogue_copy / "games" / "zz_copy.yaml"
    shutil.copy(catalogue_copy / "games" / "stag_hunt.yaml", copy)
    message = _error_for(catalogue_copy)
    assert str(copy) in message and "duplicate game name 'stag_hunt'" in message and "stag_hunt.yaml" in message


def test_duplicate_context_name(catalogue_copy):
    copy = catalogue_copy / "contexts" / "zz_team.yaml"
    shutil.copy(catalogue_copy / "contexts" / "team.yaml", copy)
    assert "duplicate context name 'team'" in _error_for(catalogue_copy)


def test_missing_context_key_names_file_and_key(catalogue_copy):
    context = catalogue_copy / "contexts" / "friends.yaml"
    _edit(context, lambda d: d.pop("framing"))
    message = _error_for(catalogue_copy)
    assert str(context) in message and "'framing'" in message


def test_unknown_split_names_file_and_split(catalogue_copy):
    splits = catalogue_copy / "splits.yaml"
    _edit(splits, lambda d: d.update({"holdout": {"games": ["stag_hunt"], "contexts": ["team"]}}))
    message = _error_for(catalogue_copy)
    assert str(splits) in message and "'holdout'" in message


def test_split_naming_an_unknown_game(catalogue_copy):
    splits = catalogue_copy / "splits.yaml"
    _edit(splits, lambda d: d["oos_context"]["games"].append("chicken"))
    message = _error_for(catalogue_copy)
    assert str(splits) in message and "oos_context.games" in message and "'chicken'" in message


def test_asking_for_an_unknown_split(catalogue):
    with pytest.raises(CatalogueError, match="unknown split 'holdout'"):
        catalogue.scenarios(["holdout"])


def test_a_game_and_a_context_added_as_data_only(tmp_path, catalogue):
    extra = tmp_path / "extra"
    (extra / "games").mkdir(parents=True)
    (extra / "contexts").mkdir()
    (extra / "games" / "chicken.yaml").write_text(yaml.safe_dump({
        "name": "chicken", "title": "Chicken", "kind": "matrix",
        "payoffs": {"C": {"C": 6, "D": 2}, "D": {"C": 9, "D": 0}},
    }))
    (extra / "contexts" / "neighbours.yaml").write_text(yaml.safe_dump({
        "name": "neighbours", "coplayer": "your neighbour", "points": "a quiet street",
        "framing": "You and a neighbour each decide, at the same time and only once, how to share a driveway.",
        "oracle": {"regard": 0.2, "belief": 0.5},
    }))
    (extra / "splits.yaml").write_text(yaml.safe_dump({
        "oos_context": {"games": ["chicken", "stag_hunt"], "contexts": ["neighbours"]},
    }))
    extended = load_catalogue(CATALOGUE_DIR, [extra])
    ids = {s.id for s in extended.scenarios(["oos_context"])}
    assert {"chicken/neighbours", "stag_hunt/neighbours", "stag_hunt/athletes"} <= ids
    scenario = extended.scenario("chicken", "neighbours")
    user = build_messages(scenario, "student")[1]["content"]
    assert "you get 9 points and your neighbour gets 2 points" in user
    assert prompt_version(extended) != prompt_version(catalogue)  # a new catalogue is a new version


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_cfg):
    from tomdistill.model.loading import load_tokenizer

    return load_tokenizer(smollm2_cfg)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_prompt_through_smollm2_chat_template(smollm2_tokenizer, catalogue, role):
    scenario = catalogue.scenario("prisoners_dilemma", "business")
    prompt = render_prompt(smollm2_tokenizer, build_messages(scenario, role))
    system, user = prompt.split("<|im_start|>user\n")
    assert system.startswith("<|im_start|>system\n") and scenario.context.framing in system
    assert "you get 10 points and the CEO of the other firm gets 2 points" in user
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    if role == "teacher":
        assert "'Answer: C'" in user and "Motivation:" in user
    else:
        assert "'Answer: C'" in user and "Motivation" not in user and "Do not explain" in user


def test_public_goods_prompt_asks_for_dollars(smollm2_tokenizer, catalogue):
    scenario = catalogue.scenario("public_goods", "party")
    prompt = render_prompt(smollm2_tokenizer, build_messages(scenario, "student"))
    assert "Answer: <dollars>" in prompt and "from 0 to 10" in prompt and "multiplies the fund by 2.5" in prompt


def test_public_goods_in_a_pair_context_names_the_whole_group(catalogue, catalogue_copy):
    # 4 players: "you and the other athlete" would contradict "shared equally among all 4 of you"
    user = build_messages(catalogue.scenario("public_goods", "athletes"), "student")[1]["content"]
    assert "You and three other athletes of your sport each hold $10" in user and "all 4 of you" in user
    context = catalogue_copy / "contexts" / "athletes.yaml"
    _edit(context, lambda d: d.pop("group"))
    message = _error_for(catalogue_copy)
    assert "'oos_game'" in message and "'athletes'" in message and "'group'" in message and "4 players" in message


def test_prompt_text_and_version_are_deterministic(catalogue, catalogue_copy):
    again = load_catalogue(CATALOGUE_DIR)
    assert prompt_version(again) == prompt_version(catalogue)
    scenario = catalogue.scenario("snowdrift", "friends")
    assert build_messages(scenario, "teacher") == build_messages(again.scenario("snowdrift", "friends"), "teacher")
    # changing what reaches a prompt changes the version
    _edit(catalogue_copy / "contexts" / "friends.yaml", lambda d: d.update({"points": "something else"}))
    assert prompt_version(load_catalogue(catalogue_copy)) != prompt_version(catalogue)


def test_shuffled_outcomes_are_seeded(catalogue):
    scenario = catalogue.scenario("stag_hunt", "team")
    plain = build_messages(scenario, "student")[1]["content"]
    first = build_messages(scenario, "student", shuffle_seed=3)[1]["content"]
    assert first == build_messages(scenario, "student", shuffle_seed=3)[1]["content"]
    assert sorted(first.splitlines()) == sorted(plain.splitlines())


def test_the_in_sample_games_list_the_same_numbers_in_a_context_only_their_lines_differ():
    """docs/scenarios.md: a prompt's numbers, taken without their outcome line, do not tell the four games apart."""
    import re
    from collections import Counter

    from tomdistill.scenarios.prompts import describe_game

    catalogue = load_catalogue(CATALOGUE_DIR)
    prompts = {s.game.name: describe_game(s) for s in catalogue.scenarios(["in_sample"], contexts=["friends"])}
    assert len(prompts) == 4
    numbers = {game: Counter(re.findall(r"\d+", text)) for game, text in prompts.items()}
    assert len({tuple(sorted(c.items())) for c in numbers.values()}) == 1  # one multiset of numbers
    lines = {game: tuple(re.findall(r"you get (\d+) points", text)) for game, text in prompts.items()}
    assert len(set(lines.values())) == 4  # which line carries which number does differ


def test_the_public_goods_analogy_scores_a_student_that_donates_as_the_teacher_plays_each_game(tmp_path):
    """scripts/public_goods_analogy.py: the oracle's P(C) of each in-sample game in public goods' own context, scored
    against the evaluation's base and teacher propensities (docs/findings.md, what limits public goods)."""
    import subprocess
    import sys

    import pandas as pd

    from tomdistill.metrics.transfer import alignment
    from tomdistill.scenarios.oracle import action_probabilities
    from tomdistill.scenarios.schema import Scenario

    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, str(root / "scripts" / "public_goods_analogy.py")]
    missing = subprocess.run([*script, "--evaluation", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "transfer_scenarios.csv: not found" in missing.stderr
    pd.DataFrame([{"split": "oos_game", "game": "public_goods", "context": "party", "p_teacher": 0.77,
                   "p_base": 0.35, "p_tuned": 0.19},
                  {"split": "in_sample", "game": "prisoners_dilemma", "context": "friends", "p_teacher": 0.41,
                   "p_base": 0.85, "p_tuned": 0.4}]).to_csv(tmp_path / "transfer_scenarios.csv", index=False)
    done = subprocess.run([*script, "--evaluation", str(tmp_path), "--output", str(tmp_path / "analogy.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "analogy.csv").set_index("played_as")
    catalogue = load_catalogue(CATALOGUE_DIR)
    dilemma = action_probabilities(Scenario(catalogue.games["prisoners_dilemma"], catalogue.contexts["party"], "x"))
    assert table.loc["prisoners_dilemma", "propensity"] == pytest.approx(dilemma["C"])
    assert table.loc["prisoners_dilemma", "alignment"] == pytest.approx(1 - abs(dilemma["C"] - 0.77) / 0.42)
    assert table.loc["the tuned student (measured)", "alignment"] == pytest.approx(alignment([0.35], [0.19], [0.77]))
    four = [g for g in table.index if g in catalogue.games]
    assert len(four) == 4 and table.loc["mean of the games", "propensity"] == pytest.approx(
        table.loc[four, "propensity"].mean())
