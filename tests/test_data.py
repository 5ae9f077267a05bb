"""TeacherQADataModule: loss masking, soft targets, held-out contexts, length grouping, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import TINY, run_train, write_teacher
from tomdistill.data.batching import LengthGroupedBatchSampler, padding_fraction
from tomdistill.data.datamodule import IGNORE_INDEX, DataError, TeacherQADataModule
from tomdistill.losses import SFTLoss, SFTPlusSoftLoss, SoftLabelLoss
from tomdistill.records import SamplesError
from tomdistill.scenarios import ANSWER_PREFIX, answer_text
from tomdistill.scenarios.oracle import action_probabilities


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    from tomdistill.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_cfg, padding_side="right")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, catalogue):
    return write_teacher(tmp_path_factory.mktemp("teacher"), catalogue, n=3)


LOSSES = {"sft": SFTLoss, "soft": SoftLabelLoss, "sft_soft": SFTPlusSoftLoss}
KIND_KEYS = ("target", "samples_per_scenario", "batch_size", "scenario_batch_size", "balance_games",
             "augment_per_step", "augment_from_step")


def make(teacher, tokenizer, catalogue, tmp_path, loss="sft", **kwargs):
    kind = {k: kwargs.pop(k) for k in list(kwargs) if k in KIND_KEYS}  # what the loss's kind of target reads
    dm = TeacherQADataModule(teacher, tokenizer, catalogue, cache_dir=tmp_path / "cache",
                             target_kind=LOSSES[loss]().target_kind(**kind), **kwargs)
    dm.setup("fit")
    return dm


def make_on_the_oracle(tokenizer, catalogue, tmp_path, loss="soft", **kwargs):
    """train.py without data.teacher: the recipe samples the oracle teacher, the datamodule reads its directories."""
    from helpers import oracle_config
    from tomdistill.training import oracle_teacher_directories

    directories = oracle_teacher_directories(catalogue, LOSSES[loss]().target_kind().teacher_modes, oracle_config(),
                                             tmp_path / "cache")
    return make(directories["teacher"], tokenizer, catalogue, tmp_path, loss=loss,
                teacher_probs=directories["teacher_probs"], **kwargs)


def test_labels_mask_everything_but_the_assistant_turn_token_by_token(teacher_dir, tokenizer, catalogue, tmp_path):
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, loss="sft_soft")
    end = dm._end_of_turn()
    assert end == "<|im_end|>"
    for example in dm.train_set.select(range(5)):
        ids, labels = example["input_ids"], example["labels"]
        target = dm.targets[example["scenario"]]
        prompt_ids = tokenizer(target.item.prompt[: -len(ANSWER_PREFIX)], add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        assert ids[:start] == prompt_ids
        for position, (token, label) in enumerate(zip(ids, labels)):
            assert label == (IGNORE_INDEX if position < start else token), position
        completion = tokenizer.decode(ids[start:])
        assert completion.startswith(f"{ANSWER_PREFIX} ") and completion.endswith(end)
        assert "Motivation:" in completion
        action = completion[len(ANSWER_PREFIX) + 1]
        # the answer position predicts the action token, exactly as exact scoring tokenizes it
        pos = example["answer_pos"]
        assert ids[: pos + 1] == target.item.prompt_ids
        assert [ids[pos + 1]] == target.item.continuation_ids[target.item.actions.index(action)]


def test_answer_only_target_has_no_motivation(teacher_dir, tokenizer, catalogue, tmp_path):
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, target="answer_only")
    example = dm.train_set[0]
    kept = [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]
    assert tokenizer.decode(kept) in {answer_text(a) + "<|im_end|>" for a in ("C", "D")}


def test_reasoning_before_the_answer_puts_the_answer_position_after_the_motivation(teacher_dir, tokenizer, catalogue,
                                                                                  tmp_path):
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, loss="sft", target="motivation_answer")
    for example in dm.train_set.select(range(5)):
        ids, labels, pos = example["input_ids"], example["labels"], example["answer_pos"]
        kept = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
        assert kept.startswith("Motivation: ") and kept.endswith("<|im_end|>")
        before, answer = kept[: -len("<|im_end|>")].rsplit("\n", 1)
        assert answer in (f"{ANSWER_PREFIX} C", f"{ANSWER_PREFIX} D") and len(before) > len("Motivation: ")
        # the soft loss's position: the last token of the "Answer:" that follows the reasoning
        assert tokenizer.decode(ids[: pos + 1]).endswith(before + "\n" + ANSWER_PREFIX)
        target = dm.targets[example["scenario"]]
        assert [ids[pos + 1]] == target.item.continuation_ids[target.item.actions.index(answer[-1])]


def test_a_soft_target_after_the_reasoning_is_refused(teacher_dir, tokenizer, catalogue, tmp_path):
    # the motivation already names the action: a soft target after it is meaningless, and evaluation scores
    # `Answer:` right after the prompt, where this target never trained the student
    with pytest.raises(DataError, match="motivation_answer"):
        make(teacher_dir, tokenizer, catalogue, tmp_path, loss="sft_soft", target="motivation_answer")


def test_soft_loss_is_refused_on_answers_that_share_their_first_token(tokenizer, catalogue, tmp_path):
    # every public-goods amount starts with the same space token: a first-token target would say
    # "emit a space" with certainty, whatever the teacher's donations
    teacher = write_teacher(tmp_path / "pg", catalogue, n=2, splits=("oos_game",))
    for loss in ("soft", "sft_soft"):
        with pytest.raises(DataError, match=r"scenario public_goods/\w+ has.*share their first token"):
            make(teacher, tokenizer, catalogue, tmp_path, loss=loss, splits=["oos_game"], num_val_contexts=0)
    dm = make(teacher, tokenizer, catalogue, tmp_path, loss="sft", splits=["oos_game"], num_val_contexts=0)
    assert len(dm.train_set) > 0


def test_soft_targets_come_from_score_records_or_answer_frequencies(teacher_dir, tokenizer, catalogue, tmp_path):
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, loss="soft")
    for target in dm.targets:
        exact = action_probabilities(target.scenario)
        assert target.teacher_probs == pytest.approx(exact)
        c, d = (target.item.continuation_ids[target.item.actions.index(a)][0] for a in "CD")
        assert target.first_token_ids == [c, d] and target.first_token_probs == pytest.approx([exact["C"], exact["D"]])
    # soft examples: one per scenario, the prompt up to "Answer:", answer position = last token
    assert len(dm.train_set) + len(dm.val_set) == len(dm.targets)
    example = dm.train_set[0]
    assert example["answer_pos"] == len(example["input_ids"]) - 1
    assert all(label == IGNORE_INDEX for label in example["labels"])

    generated = write_teacher(tmp_path / "gen", catalogue, n=4, modes=("generate",))
    dm = make(generated, tokenizer, catalogue, tmp_path, loss="soft")
    records = dm._load_records()
    for target in dm.targets:
        answers = [a for g, c, a in zip(records["game"], records["context"], records["action"])
                   if (g, c) == target.scenario.key]
        assert target.teacher_probs["C"] == pytest.approx(answers.count("C") / len(answers))


def test_validation_holds_out_whole_contexts_rotating_by_seed(teacher_dir, tokenizer, catalogue, tmp_path):
    seen = []
    for seed in (0, 1):
        dm = make(teacher_dir, tokenizer, catalogue, tmp_path, seed=seed, num_val_contexts=1)
        val = {t.scenario.context.name for t in dm.val_targets}
        train = {t.scenario.context.name for t in dm.train_targets}
        assert len(val) == 1 and not val & train and len(dm.val_targets) == 4
        assert {dm.targets[s].scenario.context.name for s in dm.val_set["scenario"]} == val
        assert not {dm.targets[s].scenario.context.name for s in dm.train_set["scenario"]} & val
        seen.append(val)
    assert seen[0] != seen[1]
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, val_contexts=["team", "friends"])
    assert dm.val_context_names == ["friends", "team"] and len(dm.val_targets) == 8
    with pytest.raises(DataError, match="not among the training contexts"):
        make(teacher_dir, tokenizer, catalogue, tmp_path, val_contexts=["athletes"])


def test_length_grouping_cuts_padding(teacher_dir, tokenizer, catalogue, tmp_path):
    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, batch_size=4)
    lengths = dm.train_set["length"]
    grouped = LengthGroupedBatchSampler(lengths, 4, group_by_length=True, seed=0).batches()
    plain = LengthGroupedBatchSampler(lengths, 4, group_by_length=False, seed=0).batches()
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(plain, lengths)
    assert dm.stats["padding_fraction"] < dm.stats["padding_fraction_random"]


def test_batches_split_evenly_over_ranks():
    lengths = list(range(10, 37))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(LengthGroupedBatchSampler(lengths, 4, num_replicas=2))
    covered = {i for r in ranks for b in r for i in b}
    assert covered == set(range(len(lengths)))


def test_one_rank_batches_and_their_order_are_unchanged():
    """Pinned: the single-process batches of this sampler before it learnt to split batches over ranks."""
    lengths = [(i * 7) % 13 + 1 for i in range(11)]
    expected = {(3, 1, True, True): [[9, 7, 5], [8, 6, 4], [2, 0], [3, 1, 10]],
                (3, 1, True, False): [[10, 3, 6], [1, 5, 9], [2, 7], [4, 8, 0]],
                (4, 2, False, True): [[9, 7, 5, 3], [1, 10, 8, 6], [4, 2, 0]]}
    for (size, seed, shuffle, grouped), batches in expected.items():
        for split in (False, True):
            sampler = LengthGroupedBatchSampler(lengths, size, shuffle=shuffle, group_by_length=grouped, seed=seed,
                                                split_batches=split)
            sampler.set_epoch(1)
            assert list(sampler) == batches and len(sampler) == len(batches)


@pytest.mark.parametrize("examples", [1, 2, 5, 9, 27])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_every_rank_gets_distinct_batches_and_as_many_as_the_others(examples, ranks):
    """Fewer batches than ranks included: the epoch's batches are cycled, never an empty rank (a hang)."""
    lengths = [10 + i % 7 for i in range(examples)]
    per_rank = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=ranks, rank=r, seed=3)) for r in range(ranks)]
    count = len(LengthGroupedBatchSampler(lengths, 4, num_replicas=ranks))
    assert count >= 1 and all(len(batches) == count for batches in per_rank)
    assert {i for batches in per_rank for b in batches for i in b} == set(range(examples))
    distinct = {tuple(b) for batches in per_rank for b in batches}
    assert len(distinct) == math.ceil(examples / 4)  # each batch of the epoch; only the last round's fill repeats
    for k in range(count):  # within a step the ranks train distinct batches whenever there are enough of them
        assert len({tuple(batches[k]) for batches in per_rank}) == min(ranks, len(distinct))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 12])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_a_global_batch_splits_over_ranks_and_the_weighted_rank_losses_average_to_its_mean(size, ranks):
    from tomdistill.data.batching import shard

    batch = list(range(100, 100 + size))
    losses = {i: 0.3 + (i % 7) * 0.11 for i in batch}
    shards = [shard(batch, ranks, r) for r in range(ranks)]
    assert all(indices for indices, _ in shards)  # never an empty rank
    assert {i for indices, _ in shards for i in indices} == set(batch)
    if size >= ranks:  # no copies, shard sizes differ by at most one
        assert sorted(i for indices, _ in shards for i in indices) == batch
        assert max(len(i) for i, _ in shards) - min(len(i) for i, _ in shards) <= 1
    rank_losses = [sum(w * losses[i] for i, w in zip(indices, weights)) for indices, weights in shards]
    # DDP and DeepSpeed average the ranks' gradients; the weighted rank losses average to the global mean
    assert sum(rank_losses) / ranks == pytest.approx(sum(losses.values()) / size, rel=1e-12)


def test_soft_loader_splits_the_global_scenario_batch_over_ranks(teacher_dir, tokenizer, catalogue, tmp_path):
    from types import SimpleNamespace

    dm = make(teacher_dir, tokenizer, catalogue, tmp_path, loss="soft")
    scenarios = len(dm.train_targets)

    def first_batch(ranks, rank):
        dm.trainer = SimpleNamespace(world_size=ranks, global_rank=rank, fit_loop=None)
        loader = dm.train_dataloader()
        return len(loader), next(iter(loader))

    count, alone = first_batch(1, 0)
    assert count == 1 and "weight" not in alone and len(alone["scenario"]) == scenarios  # one rank: as before
    parts = [first_batch(3, r) for r in range(3)]
    assert all(count == 1 for count, _ in parts)
    assert sorted(s for _, b in parts for s in b["scenario"].tolist()) == sorted(alone["scenario"].tolist())
    assert all(len(b["scenario"]) in (scenarios // 3, -(-scenarios // 3)) for _, b in parts)
    for _, b in parts:
        torch.testing.assert_close(b["weight"], torch.full_like(b["weight"], 3 / scenarios))
    dm.trainer = None


def test_balanced_scenario_batches_deal_the_games_in_turn(catalogue):
    scenarios = catalogue.scenarios(["in_sample"])
    games = sorted({s.game.name for s in scenarios})
    lengths = [100 + 10 * games.index(s.game.name) for s in scenarios]  # a tokenizer where a game fixes the length

    def batches(**kwargs):
        kind = SoftLabelLoss().target_kind(scenario_batch_size=len(games), **kwargs)
        sampler = kind.batch_sampler(lengths, scenarios, len(scenarios), seed=3)
        dealt = [[scenarios[i].game.name for i in batch] for batch in sampler]
        assert sorted(i for batch in sampler for i in batch) == list(range(len(scenarios)))  # each once an epoch
        return dealt

    assert all(len(set(batch)) <= 2 for batch in batches())  # by length: one game's contexts together
    assert all(sorted(batch) == games for batch in batches(balance_games=True))  # balanced: every game once
    with pytest.raises(DataError, match=r"data.balance_games=true deals scenario batches .*scenario_batch_size > 0, "
                                        r"now 0"):
        SoftLabelLoss().target_kind(balance_games=True)
    with pytest.raises(DataError, match=r"data.balance_games=true .* now loss=sft"):
        SFTLoss().target_kind(balance_games=True, scenario_batch_size=4)


def test_tokenization_is_cached_across_runs(teacher_dir, tokenizer, catalogue, tmp_path):
    first = make(teacher_dir, tokenizer, catalogue, tmp_path)
    second = make(teacher_dir, tokenizer, catalogue, tmp_path)
    assert first.stats["tokenization_cached"] is False and second.stats["tokenization_cached"] is True
    assert list((tmp_path / "cache" / "tokenized").glob("*.arrow"))
    assert second.train_set["input_ids"] == first.train_set["input_ids"]


def test_unparsed_answers_are_dropped_and_counted(tokenizer, catalogue, tmp_path):
    def spoil(records):
        for record in records[:5]:
            record["action"], record["motivation"] = "unparsed", ""
        return records

    teacher = write_teacher(tmp_path / "t", catalogue, n=3, modes=("generate",), edit=spoil)
    dm = make(teacher, tokenizer, catalogue, tmp_path)
    assert dm.stats["unparsed_dropped"] == 5
    assert len(dm.train_set) + len(dm.val_set) == 20 * 3 - 5
    # the first scenario had only unparsed answers: left out (no target), named in the stats
    assert dm.stats["scenarios_left_out"] == ["prisoners_dilemma/diplomacy"] and len(dm.targets) == 19


def test_bad_teacher_data_is_refused_with_a_clear_message(tokenizer, catalogue, tmp_path):
    with pytest.raises(SamplesError, match="no such directory"):
        make(str(tmp_path / "missing"), tokenizer, catalogue, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamplesError, match="no parquet shards"):
        make(tmp_path / "empty", tokenizer, catalogue, tmp_path)
    zero = write_teacher(tmp_path / "zero", catalogue, modes=("generate",), edit=lambda r: [])
    with pytest.raises(SamplesError, match="empty"):
        make(zero, tokenizer, catalogue, tmp_path)
    oos = write_teacher(tmp_path / "oos", catalogue, splits=("oos_context",))
    with pytest.raises(DataError, match=r"no records of split\(s\) \['in_sample'\]"):
        make(oos, tokenizer, catalogue, tmp_path)

    def other_version(records):
        for record in records[:3]:
            record["prompt_version"] = "p0-deadbeef"
        return records

    mixed = write_teacher(tmp_path / "mixed", catalogue, modes=("generate",), edit=other_version)
    with pytest.raises(SamplesError, match="mixes prompt versions"):
        make(mixed, tokenizer, catalogue, tmp_path)
    only_scores = write_teacher(tmp_path / "scores", catalogue, modes=("score",))
    with pytest.raises(DataError, match="needs sampled answers"):
        make(only_scores, tokenizer, catalogue, tmp_path, loss="sft")


def test_tokenizer_without_chat_template_is_refused(teacher_dir, tiny_model_cfg, catalogue, tmp_path):
    from tomdistill.model.loading import load_tokenizer

    bare = load_tokenizer(tiny_model_cfg, padding_side="right")
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        make(teacher_dir, bare, catalogue, tmp_path)


def test_train_py_reports_data_errors_before_loading_a_model(tmp_path):
    result = run_train([*TINY, f"data.teacher={tmp_path}/nowhere", f"output={tmp_path}/out"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: teacher dataset" in result.stderr and "no such directory" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout


def test_payoff_augmentation_trains_on_rescaled_games_from_the_in_process_oracle(tokenizer, tmp_path):
    """scenarios.augment.scales + data.splits=[in_sample, augment]: the oracle teacher (cached per scales)
    gives the rescaled games too, and they become training scenarios with their own soft targets."""
    from tomdistill import CATALOGUE_DIR
    from tomdistill.scenarios import load_catalogue

    plain = load_catalogue(CATALOGUE_DIR)
    augmented = load_catalogue(CATALOGUE_DIR, augment={"scales": [0.5, 3]})
    plain_dm = make_on_the_oracle(tokenizer, plain, tmp_path, loss="soft")
    dm = make_on_the_oracle(tokenizer, augmented, tmp_path, loss="soft", splits=["in_sample", "augment"])
    assert plain_dm.teacher != dm.teacher  # same prompt_version, different data: keyed by the scales
    games = {t.scenario.game.name for t in dm.targets}
    assert {"stag_hunt", "stag_hunt_x0.5", "stag_hunt_x3"} <= games
    x3 = next(t for t in dm.targets if t.scenario.game.name == "stag_hunt_x3" and t.scenario.context.name == "team")
    assert x3.teacher_probs == pytest.approx(action_probabilities(x3.scenario))
    base = next(t for t in dm.targets if t.scenario.game.name == "stag_hunt" and t.scenario.context.name == "team")
    assert x3.teacher_probs["C"] != pytest.approx(base.teacher_probs["C"])  # rescaled payoffs: another choice
    assert len(dm.train_set) + len(dm.val_set) == 3 * len(plain.scenarios(["in_sample"]))


def test_evaluation_targets_are_the_report_splits_with_the_teachers_distribution(tmp_path, tokenizer, catalogue):
    teacher = write_teacher(tmp_path / "teacher", catalogue, n=1, modes=("score",),
                            splits=("in_sample", "oos_context", "oos_payoffs"))
    dm = make(teacher, tokenizer, catalogue, tmp_path, loss="soft")
    assert dm.evaluation_targets("in_sample") == [t for t in dm.train_targets if t.scenario.split == "in_sample"]
    assert dm.evaluation_targets("heldout_context") == dm.val_targets
    payoffs = dm.evaluation_targets("oos_payoffs")
    assert {t.scenario.key for t in payoffs} == {s.key for s in catalogue.scenarios(["oos_payoffs"])}
    for target in payoffs:  # the oracle's exact choice probabilities, and the prompt evaluation scores
        assert sum(target.teacher_probs.values()) == pytest.approx(1.0)
        assert target.item.prompt.endswith("Answer:") and target.item.actions == target.scenario.game.actions
    with pytest.raises(DataError, match="no records of split 'oos_game'"):
        dm.evaluation_targets("oos_game")
    with pytest.raises(DataError, match="unknown split 'oos'"):
        dm.evaluation_targets("oos")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_anchored_batches_hold_every_anchor_and_deal_the_pool_one_per_group_in_turns(ranks):
    from tomdistill.data.batching import AnchoredBatchSampler, shard

    anchors = [0, 1, 2, 3]
    groups = [[4, 5], [6, 7], [8, 9], [10, 11], [12, 13, 14]]  # uneven: the last group has three members
    lengths = [10] * 15
    sampler = AnchoredBatchSampler(lengths, anchors, groups, per_batch=5, seed=7, num_replicas=ranks)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = sampler.batches()
        assert len(batches) == len(sampler) == 3  # 11 pool examples, 5 a step
        assert all(b[:4] == anchors for b in batches)
        dealt = [i for b in batches for i in b[4:]]
        assert sorted(dealt) == list(range(4, 15))  # every variant exactly once an epoch
        first = set(batches[0][4:])
        assert all(len(first & set(g)) == 1 for g in groups)  # one of each group before any group's second
        for r in range(ranks):  # the ranks' shards rebuild each global batch
            sampler.rank = r
            mine = list(sampler)
            if ranks == 1:
                assert mine == batches
            else:
                assert [[i for i, _ in b] for b in mine] == [shard(b, ranks, r)[0] for b in batches]
        sampler.rank = 0
    sampler.set_epoch(2)
    sampler.resume_at(2, 1)  # a run restored mid-epoch (ResumableDataLoader) goes on with the next batch
    assert list(sampler) == sampler.batches()[1:] if ranks == 1 else len(list(sampler)) == 2
    again = AnchoredBatchSampler(lengths, anchors, groups, per_batch=5, seed=7)
    other = AnchoredBatchSampler(lengths, anchors, groups, per_batch=5, seed=8)
    assert again.batches() == AnchoredBatchSampler(lengths, anchors, groups, per_batch=5, seed=7).batches()
    assert again.batches() != other.batches()  # seeded


def test_augment_per_step_trains_every_in_sample_scenario_each_step_and_the_variants_in_turns(tokenizer, tmp_path):
    from types import SimpleNamespace

    from tomdistill import CATALOGUE_DIR
    from tomdistill.scenarios import load_catalogue

    augmented = load_catalogue(CATALOGUE_DIR, augment={"variants": 2})
    dm = make_on_the_oracle(tokenizer, augmented, tmp_path, loss="soft", splits=["in_sample", "augment"],
                            augment_per_step=8)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, fit_loop=None)
    loader = dm.train_dataloader()
    in_sample = [t for t in dm.train_targets if t.scenario.split == "in_sample"]
    variants = [t for t in dm.train_targets if t.scenario.split == "augment"]
    assert len(variants) == 2 * len(in_sample) and len(loader) == len(variants) // 8
    seen = []
    for batch in loader:
        scenarios = [dm.targets[s].scenario for s in batch["scenario"].tolist()]
        assert sorted(s.key for s in scenarios if s.split == "in_sample") == sorted(t.scenario.key for t in in_sample)
        dealt = [s for s in scenarios if s.split == "augment"]
        assert len(dealt) == 8 and len({(s.game.base, s.context.name) for s in dealt}) == 8
        seen += [s.key for s in dealt]
    assert sorted(seen) == sorted(t.scenario.key for t in variants)
    dm.trainer = None
    with pytest.raises(DataError, match="scenarios.augment.per_step=8, but no scenario of the 'augment' split"):
        plain = make_on_the_oracle(tokenizer, augmented, tmp_path, loss="soft", augment_per_step=8)
        plain.trainer = SimpleNamespace(world_size=1, global_rank=0, fit_loop=None)
        plain.train_dataloader()
    with pytest.raises(DataError, match="scenarios.augment.per_step=8 takes a per-scenario loss"):
        SFTLoss().target_kind(augment_per_step=8)
    with pytest.raises(DataError, match="choose one way to batch scenarios"):
        SoftLabelLoss().target_kind(augment_per_step=8, scenario_batch_size=4)
    # data.augment_from_step: the in-sample scenarios alone until that optimiser step (counted in batches of the
    # gradient accumulation), then the variants in turns as above
    late = make_on_the_oracle(tokenizer, augmented, tmp_path, loss="soft", splits=["in_sample", "augment"],
                              augment_per_step=8, augment_from_step=3)
    late.trainer = SimpleNamespace(world_size=1, global_rank=0, fit_loop=None, accumulate_grad_batches=2)
    sampler = late.train_dataloader().batch_sampler
    assert sampler.pool_from_batch == 6 and len(sampler) == 4
    anchors = sampler.anchors
    sizes = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        sizes += [len(b) for b in sampler.batches()]
        assert all(b[:len(anchors)] == anchors for b in sampler.batches())
    assert sizes == [len(anchors)] * 6 + [len(anchors) + 8] * 6
    from tomdistill.data.batching import AnchoredBatchSampler

    from_start = AnchoredBatchSampler(sampler.lengths, anchors, sampler.pool_groups, 8, seed=sampler.seed)
    sampler.set_epoch(1), from_start.set_epoch(1)
    assert sampler.batches()[2:] == from_start.batches()[2:]  # once they join, the same turns as from the start
    from tomdistill.scenarios.augment import augmentation_from_config
    from tomdistill.scenarios.schema import CatalogueError

    with pytest.raises(CatalogueError, match=r"scenarios.augment.from_step=3: expected 0, or a step ≥ 1 together with"):
        augmentation_from_config({"from_step": 3})
    with pytest.raises(CatalogueError, match=r"scenarios.augment.from_step: expected a whole number ≥ 0, got -1"):
        augmentation_from_config({"from_step": -1, "per_step": 8})
