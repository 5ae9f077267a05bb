"""scenarios.augment: the training-only `augment` split of payoff variants (scenarios/augment.py)."""
import itertools
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from tomdistill import CATALOGUE_DIR
from tomdistill.scenarios import (
    AUGMENT_SPLIT, CatalogueError, build_messages, catalogue_from_config, load_catalogue, prompt_version,
)
from tomdistill.scenarios.oracle import DEFAULT_PRECISION, action_probabilities

ROOT = Path(__file__).resolve().parents[1]
CELLS = [("C", "C"), ("C", "D"), ("D", "C"), ("D", "D")]


def four(game) -> list[float]:
    return [game.payoff(m, t) for m, t in CELLS]


def signs(values) -> list[int]:
    """How every pair of the four payoffs compares: the payoff ordering, ties included."""
    return [(a > b) - (a < b) for a, b in itertools.combinations(values, 2)]


def variants_of(catalogue) -> list:
    return [catalogue.games[name] for name in sorted(catalogue.generated)]


def evaluated_games(catalogue) -> set[str]:
    return {g for split, pairs in catalogue.splits.items() if split != AUGMENT_SPLIT for g, _ in pairs}


def rescaling_of(a, b) -> bool:
    ratios = {round(x / y, 9) for x, y in zip(a, b)}
    return len(ratios) == 1 and ratios.pop() > 0


def extra_game(tmp_path, name: str, payoffs: dict, contexts=("team",)) -> Path:
    """An extra directory whose game joins the in_sample split."""
    extra = tmp_path / f"extra_{name}"
    (extra / "games").mkdir(parents=True)
    (extra / "games" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "kind": "matrix", "payoffs": payoffs}))
    (extra / "splits.yaml").write_text(yaml.safe_dump({"in_sample": {"games": [name], "contexts": list(contexts)}}))
    return extra


TIED = {"C": {"C": 4, "D": 1}, "D": {"C": 4, "D": 2}}  # R = T > P > S


@pytest.mark.parametrize("spec", [
    {"variants": 5, "seed": 0},                                  # [1, 30]: drawn by rejection
    {"variants": 5, "seed": 3, "low": 1, "high": 8},             # a small grid: drawn from the exact list
    {"variants": 3, "seed": 1, "low": -5, "high": 5, "integer": False},
])
def test_every_variant_keeps_its_games_ordering_within_the_range(tmp_path, spec):
    catalogue = load_catalogue(CATALOGUE_DIR, [extra_game(tmp_path, "tied", TIED)], augment=spec)
    variants = variants_of(catalogue)
    in_sample_matrix = {g for g, _ in catalogue.splits["in_sample"] if catalogue.games[g].kind == "matrix"}
    assert {v.base for v in variants} == in_sample_matrix == {"prisoners_dilemma", "snowdrift", "stag_hunt",
                                                              "prisoners_delight", "tied"}
    low, high = spec.get("low", 1), spec.get("high", 30)
    for variant in variants:
        base = catalogue.games[variant.base]
        assert signs(four(variant)) == signs(four(base)), variant.name
        assert all(low <= v <= high for v in four(variant)), variant.name
        step = 1 if spec.get("integer", True) else 0.1
        assert all(abs(v / step - round(v / step)) < 1e-9 for v in four(variant)), variant.name
        assert variant.name.startswith(f"{base.name}_v") and variant.kind == "matrix"
    for name in in_sample_matrix:
        assert sum(v.base == name for v in variants) == spec["variants"]
        mine = [tuple(four(v)) for v in variants if v.base == name]
        assert len(set(mine)) == len(mine)  # distinct variants
    tied = [four(v) for v in variants if v.base == "tied"]
    assert all(r == t for r, _, t, _ in tied)  # a tie stays a tie


def test_same_seed_same_matrices_another_seed_others():
    first = load_catalogue(CATALOGUE_DIR, augment={"variants": 3, "seed": 7})
    again = load_catalogue(CATALOGUE_DIR, augment={"variants": 3, "seed": 7})
    other = load_catalogue(CATALOGUE_DIR, augment={"variants": 3, "seed": 8})
    assert [(v.name, v.payoffs) for v in variants_of(first)] == [(v.name, v.payoffs) for v in variants_of(again)]
    assert first.splits[AUGMENT_SPLIT] == again.splits[AUGMENT_SPLIT]
    assert {tuple(four(v)) for v in variants_of(first)} != {tuple(four(v)) for v in variants_of(other)}
    assert first.augment_fingerprint() == again.augment_fingerprint() != other.augment_fingerprint()


def test_no_variant_is_an_evaluated_matrix_or_a_rescaling_of_one():
    for seed in range(20):
        catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 4, "seed": seed, "low": 1, "high": 20})
        evaluated = [four(catalogue.games[g]) for g in evaluated_games(catalogue)
                     if catalogue.games[g].kind == "matrix"]
        for variant in variants_of(catalogue):
            assert not any(rescaling_of(four(variant), m) for m in evaluated), (seed, variant.name)


def test_a_range_that_holds_only_the_evaluated_matrix_is_refused(tmp_path):
    # R > S > T > P, an ordering no shipped game has: in [1, 4] only (4, 3, 2, 1) keeps it
    extra = [extra_game(tmp_path, "ladder", {"C": {"C": 4, "D": 3}, "D": {"C": 2, "D": 1}})]
    with pytest.raises(CatalogueError, match=r"scenarios\.augment: only 0 payoff matrix\(es\) in \[1, 4\].*"
                                             r"ladder's ordering R > S > T > P.*variants=1"):
        load_catalogue(CATALOGUE_DIR, extra, augment={"variants": 1, "low": 1, "high": 4})
    # [1, 5]: five matrices keep the ordering, one of them the evaluated game: four remain
    four_left = load_catalogue(CATALOGUE_DIR, extra, augment={"variants": 4, "low": 1, "high": 5})
    drawn = {tuple(four(v)) for v in variants_of(four_left) if v.base == "ladder"}
    assert len(drawn) == 4 and (4, 3, 2, 1) not in drawn
    with pytest.raises(CatalogueError, match="only 4 payoff"):
        load_catalogue(CATALOGUE_DIR, extra, augment={"variants": 5, "low": 1, "high": 5})


def test_rescalings_of_an_evaluated_matrix_are_left_out(tmp_path):
    # (8, 6, 4, 2) is evaluated; its half (4, 3, 2, 1) lies on the grid [1, 8] too
    extra = [extra_game(tmp_path, "even", {"C": {"C": 8, "D": 6}, "D": {"C": 4, "D": 2}})]
    every = math.comb(8, 4) - 2
    catalogue = load_catalogue(CATALOGUE_DIR, extra, augment={"variants": every, "low": 1, "high": 8})
    drawn = {tuple(four(v)) for v in variants_of(catalogue) if v.base == "even"}
    assert len(drawn) == every and (8, 6, 4, 2) not in drawn and (4, 3, 2, 1) not in drawn
    with pytest.raises(CatalogueError, match=f"only {every} payoff"):
        load_catalogue(CATALOGUE_DIR, extra, augment={"variants": every + 1, "low": 1, "high": 8})


def test_augment_scenarios_are_in_sample_contexts_in_the_augment_split_only():
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 2, "scales": [3]})
    in_sample = catalogue.splits["in_sample"]
    augment = catalogue.scenarios([AUGMENT_SPLIT])
    assert len(augment) == (2 + 1) * len(in_sample)  # public_goods is not in_sample here
    for scenario in augment:
        assert scenario.split == AUGMENT_SPLIT
        assert (scenario.game.base, scenario.context.name) in in_sample
    generated = {s.game.name for s in augment}
    assert generated == set(catalogue.generated)
    assert not generated & evaluated_games(catalogue)
    assert {s.game.name for s in augment if s.game.scale == 3} == {f"{g}_x3" for g, _ in in_sample}
    # the evaluated splits are those of the catalogue without augmentation
    plain = load_catalogue(CATALOGUE_DIR)
    assert {k: v for k, v in catalogue.splits.items() if k != AUGMENT_SPLIT} == plain.splits


def test_a_game_filter_keeps_the_variants_of_the_games_it_names():
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 2})
    chosen = catalogue.scenarios(["in_sample", AUGMENT_SPLIT], games=["stag_hunt", "stag_hunt_x2"])
    assert {s.game.base or s.game.name for s in chosen} == {"stag_hunt"}
    assert sum(s.split == AUGMENT_SPLIT for s in chosen) == 2 * sum(s.split == "in_sample" for s in chosen) > 0
    # outside the augment split the filter is exact: stag_hunt does not bring in stag_hunt_x2
    assert [s.game.name for s in catalogue.scenarios(["oos_payoffs"], games=["stag_hunt"])] == []


def test_prompt_version_unchanged_while_the_training_data_is_named():
    plain = load_catalogue(CATALOGUE_DIR)
    specs = [{"variants": 2}, {"variants": 2, "seed": 1}, {"scales": [3]}, {"variants": 1, "scales": [0.5]}]
    catalogues = [load_catalogue(CATALOGUE_DIR, augment=spec) for spec in specs]
    assert {prompt_version(c) for c in catalogues} == {prompt_version(plain)}
    assert plain.augment_fingerprint() == ""
    assert len({c.augment_fingerprint() for c in catalogues}) == len(specs)


def test_two_augmentations_never_share_an_oracle_teacher_cache(tmp_path):
    from helpers import oracle_config
    from tomdistill.records import load_samples
    from tomdistill.sampling.oracle_teacher import oracle_teacher

    one = load_catalogue(CATALOGUE_DIR, augment={"variants": 1, "seed": 0})
    two = load_catalogue(CATALOGUE_DIR, augment={"variants": 1, "seed": 1})
    first, second = (oracle_teacher(c, tmp_path, oracle_config(n=1), ("score",))["score"] for c in (one, two))
    assert first != second
    games = set(load_samples(first, "teacher").unique("game"))
    assert set(one.generated) <= games and not set(two.generated) & games


def test_prompts_show_the_variants_payoffs():
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 2})
    for scenario in catalogue.scenarios([AUGMENT_SPLIT]):
        user = build_messages(scenario, "student")[1]["content"]
        coplayer = scenario.context.coplayer
        for mine, theirs in CELLS:
            mine_gets, theirs_gets = scenario.game.payoff(mine, theirs), scenario.game.payoff(theirs, mine)
            assert (f"If you choose {mine} and {coplayer} chooses {theirs}, you get {mine_gets:g} points and "
                    f"{coplayer} gets {theirs_gets:g} points") in user


def test_the_oracle_labels_every_variant():
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 3, "low": -10, "high": 40, "scales": [3]})
    for scenario in catalogue.scenarios([AUGMENT_SPLIT]):
        probs = action_probabilities(scenario)
        assert set(probs) == {"C", "D"} and sum(probs.values()) == pytest.approx(1)
        assert all(0 < p < 1 for p in probs.values())
        w, b = scenario.context.regard, scenario.context.belief
        u = lambda m, t: (1 - w) * scenario.game.payoff(m, t) + w * scenario.game.payoff(t, m)  # noqa: E731
        gap = b * (u("C", "C") - u("D", "C")) + (1 - b) * (u("C", "D") - u("D", "D"))
        assert probs["C"] == pytest.approx(1 / (1 + math.exp(-DEFAULT_PRECISION * gap)))


@pytest.mark.parametrize("spec, message", [
    ({"variants": -1}, r"scenarios\.augment\.variants: expected an integer ≥ 0, got -1"),
    ({"variants": "2"}, r"scenarios\.augment\.variants: expected an integer ≥ 0, got '2'"),
    ({"variants": True}, r"scenarios\.augment\.variants: expected an integer ≥ 0"),
    ({"variants": 1, "seed": 1.5}, r"scenarios\.augment\.seed: expected an integer"),
    ({"variants": 1, "low": 5, "high": 5}, r"scenarios\.augment\.low/high: expected low < high"),
    ({"variants": 1, "low": "a"}, r"scenarios\.augment\.low: expected a number"),
    ({"variants": 1, "integer": "yes"}, r"scenarios\.augment\.integer: expected true or false"),
    ({"scales": [0]}, r"scenarios\.augment\.scales: expected a list of positive numbers"),
    ({"scales": 3}, r"scenarios\.augment\.scales: expected a list of positive numbers"),
    ({"scales": [2]}, r"scenarios\.augment\.scales: scale 2 turns prisoners_dilemma into the payoffs of "
                      r"prisoners_dilemma_x2"),
    ({"scales": [1]}, r"scenarios\.augment\.scales: scale 1 turns prisoners_dilemma into the payoffs of "
                      r"prisoners_dilemma\b"),
    ({"varients": 2}, r"scenarios\.augment: unknown key\(s\) \['varients'\]"),
    ({"variants": 1, "low": 1, "high": 3}, r"scenarios\.augment\.low/high: the range \[1, 3\] \(integers\) holds 3 "
                                           r"distinct payoff\(s\), too few to keep prisoners_dilemma's ordering "
                                           r"T > R > P > S \(4 distinct payoffs\)"),
])
def test_bad_config_names_the_key(spec, message):
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(CATALOGUE_DIR, augment=spec)


def test_the_config_group_and_no_leftover_key():
    cfg = OmegaConf.load(ROOT / "conf/scenarios/default.yaml")
    cfg.catalogue_dir = str(CATALOGUE_DIR)
    assert AUGMENT_SPLIT not in catalogue_from_config(cfg).splits  # off by default
    cfg.augment.variants = 2
    cfg.augment.scales = [3]
    catalogue = catalogue_from_config(cfg)
    assert len(catalogue.scenarios([AUGMENT_SPLIT])) == 3 * len(catalogue.splits["in_sample"])
    assert "augment_scales" not in OmegaConf.load(ROOT / "conf/scenarios/default.yaml")  # one group: augment.*


def test_evaluation_leaves_the_augment_split_out():
    from tomdistill.evaluation import compute_evaluation

    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 1})
    rows = {("in_sample", "prisoners_dilemma", "team"): (0.3, 0.8, 0.35),
            ("in_sample", "stag_hunt", "team"): (0.9, 0.8, 0.9),
            ("oos_context", "stag_hunt", "athletes"): (0.4, 0.8, 0.6)}
    augment = {(AUGMENT_SPLIT, s.game.name, s.context.name): (0.1, 0.9, 0.9)  # far off: would move alignment
               for s in catalogue.scenarios([AUGMENT_SPLIT], contexts=["team"])}

    def records(table):
        return {role: pd.DataFrame([
            {"split": split, "game": game, "context": context, "action": "C", "model": role,
             "action_probs": json.dumps({"C": p[r], "D": 1 - p[r]}), "action_mass": 0.9}
            for (split, game, context), p in table.items()]) for r, role in enumerate(("teacher", "base", "tuned"))}

    plain = compute_evaluation(records(rows), n_bootstrap=200).headline("alignment")
    with_augment = compute_evaluation(records({**rows, **augment}), n_bootstrap=200)
    assert with_augment.headline("alignment") == plain
    assert any("training-only" in w for w in with_augment.warnings)


def test_training_reads_the_variants_and_refuses_another_augmentations_teacher(tmp_path, tiny_model_cfg):
    """data.splits=[in_sample, augment] needs no datamodule change; the variant names carry their matrix, so
    teacher data of another augmentation (same prompt_version) cannot silently label these prompts."""
    from helpers import oracle_config
    from tomdistill.data.datamodule import DataError, TeacherQADataModule
    from tomdistill.losses import SoftLabelLoss
    from tomdistill.model.loading import load_tokenizer
    from tomdistill.sampling.oracle_teacher import oracle_teacher

    tokenizer = load_tokenizer(tiny_model_cfg, padding_side="right")
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 1, "seed": 0})
    other = load_catalogue(CATALOGUE_DIR, augment={"variants": 1, "seed": 1})

    def make(teacher, cat):
        dm = TeacherQADataModule(teacher, tokenizer, cat, target_kind=SoftLabelLoss().target_kind(), splits=["in_sample", AUGMENT_SPLIT],
                                 cache_dir=tmp_path / "cache")
        dm.setup("fit")
        return dm

    def scores(cat):
        return oracle_teacher(cat, tmp_path / "teacher", oracle_config(n=1), ("score",))["score"]

    dm = make(scores(catalogue), catalogue)
    trained = {t.scenario.game.name for t in dm.targets}
    assert set(catalogue.generated) <= trained
    for target in dm.targets:
        assert target.teacher_probs == pytest.approx(action_probabilities(target.scenario))
    from tomdistill.training import teacher_labels  # what the adapter and the evaluation report count

    held_out = len(dm.val_targets)
    assert teacher_labels(dm) == {"distributions": len(dm.targets) - held_out, "answers": 0,
                                  "scenarios_by_split": {AUGMENT_SPLIT: 4 * 4, "in_sample": 16}}
    with pytest.raises(DataError, match=r"no scenario \(\w+_v1_[0-9a-f]{6}, \w+\)"):
        make(scores(other), catalogue)


def test_a_soft_student_trains_on_variants_its_teacher_only_scored(tmp_path, tiny_model_cfg):
    """A 70b teacher need not generate answers for the variants: with data.teacher_probs, a per-scenario loss
    trains every scored scenario of data.splits; an SFT loss still trains on the sampled answers alone."""
    from helpers import write_teacher
    from tomdistill.data.datamodule import TeacherQADataModule
    from tomdistill.losses import SFTLoss, SoftLabelLoss
    from tomdistill.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_cfg, padding_side="right")
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 1})
    answers = write_teacher(tmp_path / "answers", catalogue, modes=("generate",), splits=("in_sample",))
    scores = write_teacher(tmp_path / "scores", catalogue, modes=("score",), splits=("in_sample", AUGMENT_SPLIT))

    def make(loss):
        dm = TeacherQADataModule(answers, tokenizer, catalogue, teacher_probs=scores, target_kind=loss.target_kind(),
                                 splits=["in_sample", AUGMENT_SPLIT], cache_dir=tmp_path / "cache")
        dm.setup("fit")
        return dm

    soft = make(SoftLabelLoss())
    assert {t.scenario.split for t in soft.targets} == {"in_sample", AUGMENT_SPLIT}
    assert {t.scenario.game.name for t in soft.targets} >= set(catalogue.generated)
    for target in soft.targets:
        assert target.teacher_probs == pytest.approx(action_probabilities(target.scenario))
    assert {t.scenario.split for t in make(SFTLoss()).targets} == {"in_sample"}  # no answers, nothing to imitate


# --- training-only contexts (scenarios.augment.contexts) -----------------------------------------------------
TRAINING_CONTEXTS = list(OmegaConf.load(ROOT / "conf/scenarios/default.yaml").training_contexts)


def test_training_contexts_pair_every_in_sample_game_and_leave_the_evaluated_prompts_alone():
    plain = load_catalogue(CATALOGUE_DIR, augment={"variants": 2})
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 2, "contexts": TRAINING_CONTEXTS})
    in_sample_games = sorted({g for g, _ in catalogue.splits["in_sample"]})
    added = [p for p in catalogue.splits[AUGMENT_SPLIT] if p not in plain.splits[AUGMENT_SPLIT]]
    assert sorted(added) == sorted((g, c) for g in in_sample_games for c in TRAINING_CONTEXTS)
    assert not set(TRAINING_CONTEXTS) & catalogue.evaluated_contexts  # none of them is ever evaluated
    # the evaluated prompts are unchanged, so students compare; the training data is named apart
    assert prompt_version(catalogue) == prompt_version(plain) == prompt_version(load_catalogue(CATALOGUE_DIR))
    assert catalogue.augment_fingerprint() != plain.augment_fingerprint()
    # the oracle labels them from the context's own regard and belief
    scenario = catalogue.scenario("stag_hunt", "siblings")
    assert scenario.split == AUGMENT_SPLIT and scenario.context.belief == 0.85
    assert action_probabilities(scenario)["C"] > action_probabilities(catalogue.scenario("stag_hunt", "candidates"))["C"]


def test_the_eight_more_training_contexts_are_catalogue_contexts_no_split_evaluates_on_the_same_line():
    """docs/scenarios.md: `more_training_contexts` joins the first eight as valid augment contexts, 16 distinct."""
    everything = TRAINING_CONTEXTS + list(OmegaConf.load(ROOT / "conf/scenarios/default.yaml").more_training_contexts)
    assert len(set(everything)) == 16
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"contexts": everything})
    assert not set(everything) & catalogue.evaluated_contexts
    assert len(catalogue.splits[AUGMENT_SPLIT]) == 16 * len({g for g, _ in catalogue.splits["in_sample"]})
    for name in everything[8:]:  # b ≈ 0.2 + 1.3·w (docs/scenarios.md), within 0.06
        context = catalogue.scenario("stag_hunt", name).context
        assert abs(context.belief - (0.2 + 1.3 * context.regard)) <= 0.06, name


def test_the_paired_training_contexts_are_minimal_pairs_a_rival_below_its_partner():
    """docs/scenarios.md: four pairs share a domain and the choice sentence; only the relationship (w, b) moves."""
    paired = list(OmegaConf.load(ROOT / "conf/scenarios/default.yaml").paired_training_contexts)
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"contexts": TRAINING_CONTEXTS + paired})
    assert len(set(TRAINING_CONTEXTS + paired)) == 16 and not set(paired) & catalogue.evaluated_contexts
    for rival_name, partner_name in zip(paired[::2], paired[1::2]):
        rival, partner = (catalogue.scenario("stag_hunt", name) for name in (rival_name, partner_name))
        opening = lambda s: s.context.framing.split(",")[0]  # noqa: E731 - "You direct a hospital"
        choice = lambda s: s.context.framing.split(". ", 1)[1]  # noqa: E731 - "Each of you decides ..."
        assert opening(rival) == opening(partner) and choice(rival) == choice(partner), (rival_name, partner_name)
        assert rival.context.regard < partner.context.regard and rival.context.belief < partner.context.belief
        assert action_probabilities(rival)["C"] < action_probabilities(partner)["C"]


def test_the_readout_probe_compares_named_lists_of_training_contexts_joined_by_plus():
    """scripts/readout_probe.py --training-contexts: one fit per argument; an unknown list is refused by name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readout_probe", ROOT / "scripts" / "readout_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    lists = ROOT / "conf/scenarios/default.yaml"
    paired = list(OmegaConf.load(lists).paired_training_contexts)
    assert probe.training_context_sets(None, lists) == {}
    assert probe.training_context_sets([], lists) == {"training_contexts": TRAINING_CONTEXTS}
    sets = probe.training_context_sets(["training_contexts+paired_training_contexts", "paired_training_contexts"], lists)
    assert sets == {"training_contexts+paired_training_contexts": TRAINING_CONTEXTS + paired,
                    "paired_training_contexts": paired}
    with pytest.raises(SystemExit, match="no list `paired`"):
        probe.training_context_sets(["training_contexts+paired"], lists)


def test_a_training_contexts_text_is_part_of_the_training_datas_name(tmp_path):
    import shutil

    shutil.copytree(CATALOGUE_DIR, tmp_path / "catalogue")
    first = load_catalogue(tmp_path / "catalogue", augment={"contexts": ["siblings"]}).augment_fingerprint()
    path = tmp_path / "catalogue/contexts/siblings.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["oracle"]["belief"] = 0.5
    path.write_text(yaml.safe_dump(spec))
    second = load_catalogue(tmp_path / "catalogue", augment={"contexts": ["siblings"]})
    assert second.augment_fingerprint() != first
    assert prompt_version(second) == prompt_version(load_catalogue(CATALOGUE_DIR))


@pytest.mark.parametrize("contexts, message", [
    (["athletes"], r"scenarios\.augment\.contexts: context 'athletes' is in the evaluated split\(s\) "
                   r"\['oos_context', 'oos_game'\]; a training-only context must be one no split uses"),
    (["team"], r"context 'team' is in the evaluated split\(s\) \['in_sample', 'oos_payoffs'\]"),
    (["nowhere"], r"scenarios\.augment\.contexts: unknown context 'nowhere'; the catalogue has \["),
    ("siblings", r"scenarios\.augment\.contexts: expected a list of context names \(or of lists of them\), "
                 r"got 'siblings'"),
    (["siblings", "siblings"], r"scenarios\.augment\.contexts: a context is listed twice"),
    ([["siblings"], ["volunteers", "siblings"]], r"scenarios\.augment\.contexts: a context is listed twice"),
    ([["siblings", ["volunteers"]]], r"scenarios\.augment\.contexts: expected a list of context names"),
])
def test_a_bad_training_context_is_refused_by_name(contexts, message):
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(CATALOGUE_DIR, augment={"contexts": contexts})


def test_named_lists_of_training_contexts_join_in_order_as_if_listed_one_by_one():
    """`contexts: [${scenarios.training_contexts}, ${scenarios.paired_training_contexts}]` (conf/experiment/)."""
    cfg = OmegaConf.load(ROOT / "conf/scenarios/default.yaml")
    lists = [list(cfg.training_contexts), list(cfg.paired_training_contexts)]
    joined = load_catalogue(CATALOGUE_DIR, augment={"contexts": OmegaConf.create(lists)})
    listed = load_catalogue(CATALOGUE_DIR, augment={"contexts": lists[0] + lists[1]})
    assert joined.splits[AUGMENT_SPLIT] == listed.splits[AUGMENT_SPLIT]
    assert [c for _, c in joined.splits[AUGMENT_SPLIT]][::4] == lists[0] + lists[1]


def test_training_contexts_can_frame_the_payoff_variants_instead_of_the_base_games():
    based = load_catalogue(CATALOGUE_DIR, augment={"variants": 2, "contexts": TRAINING_CONTEXTS})
    varied = load_catalogue(CATALOGUE_DIR, augment={"variants": 2, "contexts": TRAINING_CONTEXTS,
                                                    "context_payoffs": "variants"})
    in_sample_games = sorted({g for g, _ in varied.splits["in_sample"]})
    framed = [(g, c) for g, c in varied.splits[AUGMENT_SPLIT] if c in TRAINING_CONTEXTS]
    assert len(framed) == len(in_sample_games) * len(TRAINING_CONTEXTS)  # the pool keeps its size
    for position, context in enumerate(TRAINING_CONTEXTS):  # context i frames every game's variant i mod 2 + 1
        games = sorted(g for g, c in framed if c == context)
        assert [varied.games[g].base for g in games] == in_sample_games
        assert all(g.startswith(f"{varied.games[g].base}_v{position % 2 + 1}_") for g in games)
    assert not {g for g, _ in varied.splits[AUGMENT_SPLIT]} & set(in_sample_games)  # no base payoffs to train on
    assert varied.generated == based.generated  # the same variants, only framed differently
    assert varied.augment_fingerprint() != based.augment_fingerprint()
    assert prompt_version(varied) == prompt_version(based)


@pytest.mark.parametrize("augment, message", [
    ({"variants": 2, "contexts": ["siblings"], "context_payoffs": "scaled"},
     r"scenarios\.augment\.context_payoffs: expected one of \['base', 'variants'\], got 'scaled'"),
    ({"contexts": ["siblings"], "context_payoffs": "variants"},
     r"scenarios\.augment\.context_payoffs: 'variants' .* needs scenarios\.augment\.variants ≥ 1 \(got 0\)"),
])
def test_bad_context_payoffs_are_refused_by_name(augment, message):
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(CATALOGUE_DIR, augment=augment)


def test_a_training_context_is_never_the_held_out_one(tmp_path, tiny_model_cfg):
    """The held-out context rotates over the evaluated training contexts alone, so a seed holds out the same one
    with or without training-only contexts, and those train in every seed."""
    from helpers import oracle_config
    from tomdistill.data.datamodule import TeacherQADataModule
    from tomdistill.losses import SoftLabelLoss
    from tomdistill.model.loading import load_tokenizer
    from tomdistill.sampling.oracle_teacher import oracle_teacher

    tokenizer = load_tokenizer(tiny_model_cfg, padding_side="right")
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"contexts": ["bandmates", "siblings"]})
    scores = oracle_teacher(catalogue, tmp_path / "teacher", oracle_config(n=1), ("score",))["score"]
    for seed, held_out in ((0, "business"), (1, "diplomacy")):
        dm = TeacherQADataModule(scores, tokenizer, catalogue, target_kind=SoftLabelLoss().target_kind(), splits=["in_sample", AUGMENT_SPLIT],
                                 cache_dir=tmp_path / "cache", seed=seed)
        dm.setup("fit")
        assert dm.val_context_names == [held_out]
        trained = {t.scenario.context.name for t in dm.train_targets}
        assert {"bandmates", "siblings"} <= trained and held_out not in trained
        assert len(dm.train_targets) == 16 + 2 * 4


# ------------------------------------------------------------------ training-only games (scenarios.augment.games)
GROUP_GAMES = ["volunteers_dilemma_2", "volunteers_dilemma_3", "volunteers_dilemma_5"]


def test_the_group_games_are_catalogue_games_no_split_evaluates_listed_in_the_config():
    cfg = OmegaConf.load(ROOT / "conf/scenarios/default.yaml")
    assert list(cfg.group_training_games) == GROUP_GAMES
    catalogue = load_catalogue(CATALOGUE_DIR)
    assert all(catalogue.games[g].kind == "volunteer" for g in GROUP_GAMES)
    assert [catalogue.games[g].players for g in GROUP_GAMES] == [2, 3, 5]
    assert not set(GROUP_GAMES) & evaluated_games(catalogue)


def test_training_games_pair_every_in_sample_then_training_context_and_leave_the_evaluated_prompts_alone():
    plain = load_catalogue(CATALOGUE_DIR, augment={"variants": 2})
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"variants": 2, "contexts": ["siblings"], "games": GROUP_GAMES})
    in_sample_contexts = list(dict.fromkeys(c for _, c in catalogue.splits["in_sample"]))
    added = [p for p in catalogue.splits[AUGMENT_SPLIT] if p[0] in GROUP_GAMES]
    assert added == [(g, c) for g in GROUP_GAMES for c in [*in_sample_contexts, "siblings"]]
    assert prompt_version(catalogue) == prompt_version(plain) == prompt_version(load_catalogue(CATALOGUE_DIR))
    # the fingerprints of the studies run before training-only games existed are kept: demo, demo_long, none
    assert plain.fingerprint() == "bdb19905" and plain.augment_fingerprint() == "ade4ed16"
    assert load_catalogue(CATALOGUE_DIR, augment={"scales": [1.5]}).augment_fingerprint() == "d67e50d8"
    # the games' rules name the training data: another cost is another teacher cache
    alone = load_catalogue(CATALOGUE_DIR, augment={"games": GROUP_GAMES})
    assert alone.augment_fingerprint() not in ("", plain.augment_fingerprint())
    assert alone.augment_fingerprint() != load_catalogue(CATALOGUE_DIR, augment={"games": GROUP_GAMES[:2]}
                                                         ).augment_fingerprint()


def test_the_volunteers_dilemma_utilities_follow_from_its_rules():
    from tomdistill.scenarios.oracle import volunteer_utilities

    catalogue = load_catalogue(CATALOGUE_DIR)
    two, five = catalogue.games["volunteers_dilemma_2"], catalogue.games["volunteers_dilemma_5"]
    # selfish (regard 0): volunteering is sure of benefit − cost; waiting pays the benefit if anyone else volunteers
    assert volunteer_utilities(two, 0.0, 0.3) == pytest.approx({"C": 6.0, "D": 3.0})
    assert volunteer_utilities(five, 0.0, 0.3)["D"] == pytest.approx(10 * (1 - 0.7 ** 4))
    # all regard (1): the others' expected total; two players: the coplayer volunteers (6) or gains from me (10)
    assert volunteer_utilities(two, 1.0, 0.3) == pytest.approx({"C": 0.3 * 6 + 0.7 * 10, "D": 0.3 * 6})
    # three others, the benefit reaches a non-volunteer through the two others when I wait
    three = catalogue.games["volunteers_dilemma_3"]
    b = 0.4
    assert volunteer_utilities(three, 1.0, b)["D"] == pytest.approx(2 * (b * 6 + (1 - b) * 10 * (1 - (1 - b))))
    # the larger the group, the likelier someone else volunteers: a selfish player volunteers less
    from tomdistill.scenarios.schema import Scenario

    business = catalogue.contexts["business"]
    p = [action_probabilities(Scenario(catalogue.games[g], business, AUGMENT_SPLIT))["C"] for g in GROUP_GAMES]
    assert p[0] > p[1] > p[2]


def test_a_group_games_prompt_counts_the_players_in_a_context_without_a_group():
    catalogue = load_catalogue(CATALOGUE_DIR, augment={"games": GROUP_GAMES})
    five = catalogue.scenario("volunteers_dilemma_5", "team")
    coplayer = five.context.coplayer
    user = build_messages(five, "teacher")[1]["content"]
    assert f"You and {coplayer} and 3 others in the same position, 5 of you in all" in user
    assert "you get 6 points if you choose C, and 10 points if you choose D while someone else chooses C" in user
    assert "'Answer: C' with C or D" in user
    two = build_messages(catalogue.scenario("volunteers_dilemma_2", "team"), "student")[1]["content"]
    assert f"You and {coplayer}, 2 of you in all" in two


@pytest.mark.parametrize("games, message", [
    (["nowhere"], r"scenarios\.augment\.games: unknown game 'nowhere'; the catalogue's games no split uses: "
                  r"\['volunteers_dilemma_2', 'volunteers_dilemma_3', 'volunteers_dilemma_5'\]"),
    (["public_goods"], r"scenarios\.augment\.games: game 'public_goods' is in an evaluated split"),
    ("volunteers_dilemma_2", r"scenarios\.augment\.games: expected a list of game names, got 'volunteers_dilemma_2'"),
    (["volunteers_dilemma_2"] * 2, r"scenarios\.augment\.games: a game is listed twice"),
])
def test_a_bad_training_game_is_refused_by_name(games, message):
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(CATALOGUE_DIR, augment={"games": games})


@pytest.mark.parametrize("change, message", [
    ({"cost": 12}, r"volunteers_dilemma_2\.yaml: 'players' must be ≥ 2 and 0 < 'cost' < 'benefit'"),
    ({"players": 1}, r"'players' must be ≥ 2"),
    ({"benefit": None}, r"volunteers_dilemma_2\.yaml: missing required key 'benefit'"),
    ({"kind": "auction"}, r"key 'kind' must be one of \['matrix', 'public_goods', 'volunteer'\], got 'auction'"),
])
def test_a_bad_volunteers_dilemma_file_is_refused_naming_the_file_and_key(tmp_path, change, message):
    import shutil

    copy = tmp_path / "catalogue"
    shutil.copytree(CATALOGUE_DIR, copy)
    path = copy / "games" / "volunteers_dilemma_2.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(copy)


def test_the_oracle_teacher_labels_the_training_games_and_explains_them(tmp_path):
    from helpers import oracle_config
    from tomdistill.records import load_samples
    from tomdistill.sampling.oracle_teacher import oracle_teacher

    catalogue = load_catalogue(CATALOGUE_DIR, augment={"games": GROUP_GAMES[1:]})
    out = oracle_teacher(catalogue, tmp_path, oracle_config(n=2), ("generate", "score"))
    answers = load_samples(out["generate"], "teacher").to_pandas()
    group = answers[answers["game"].isin(GROUP_GAMES)]
    assert len(group) == 2 * 2 * 5 and set(group["action"]) <= {"C", "D"}
    assert group["motivation"].str.contains("others steps up|of us").all()
    scores = load_samples(out["score"], "teacher").to_pandas()
    assert set(GROUP_GAMES[1:]) <= set(scores["game"])
