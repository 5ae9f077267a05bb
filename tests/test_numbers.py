"""Numbers a researcher can publish: exact public-goods scoring, the oracle's definition, honest splits,
no silent mixing, intervals that mean something. Each test failed on the code before these fixes."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tomdistill.evaluation import BOOTSTRAP_SCENARIOS, compute_evaluation, label_heldout_scenarios
from tomdistill.metrics.propensity import answer_table
from tomdistill.records import SamplesError, load_samples, mass_warning
from tomdistill.scoring import (
    action_distribution, action_logprobs, answer_logprob, prepare_item, score_prompt, score_scenarios,
)
from tomdistill.scenarios import oracle


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    from tomdistill.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_cfg, padding_side="left")


class ScriptedModel(torch.nn.Module):
    """A causal LM whose next token is fixed by the previous one (`script`), with probability ≈ 1."""

    def __init__(self, vocab: int, script: dict[int, int], default: int):
        super().__init__()
        self.vocab, self.script, self.default = vocab, script, default
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # for `next(model.parameters()).device`

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **_):
        nxt = torch.tensor([[self.script.get(int(t), self.default) for t in row] for row in input_ids])
        logits = torch.full((*input_ids.shape, self.vocab), -60.0)
        logits.scatter_(-1, nxt.unsqueeze(-1), 0.0)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits + self.anchor)


def always_answers(tokenizer, amount: str) -> ScriptedModel:
    """A student that answers `amount` after `Answer:` every time, then ends its turn."""
    ids = tokenizer("Answer: " + amount, add_special_tokens=False)["input_ids"]
    script = {a: b for a, b in zip(ids, ids[1:])}
    script[ids[-1]] = tokenizer.eos_token_id
    return ScriptedModel(len(tokenizer), script, tokenizer.eos_token_id)


# --- 1. public goods: each amount is a complete answer ---------------------------------------------

def test_a_student_that_always_gives_10_has_mass_1_and_mean_donation_10(tokenizer, catalogue):
    # before: P(" 1") already held every answer starting with 1, so " 10" counted twice (mass 2.0, mean $5.50)
    party = catalogue.scenario("public_goods", "party")
    (prompt, probs, mass), = score_scenarios(always_answers(tokenizer, "10"), tokenizer, [party])
    assert mass == pytest.approx(1.0, abs=1e-6) and mass <= 1 + 1e-6
    assert probs["10"] == pytest.approx(1.0, abs=1e-6) and probs["1"] < 1e-6
    assert sum(int(a) * p for a, p in probs.items()) == pytest.approx(10.0, abs=1e-4)
    (_, probs, mass), = score_scenarios(always_answers(tokenizer, "1"), tokenizer, [party])
    assert probs["1"] == pytest.approx(1.0, abs=1e-6) and mass == pytest.approx(1.0, abs=1e-6)


def test_amounts_are_disjoint_on_a_real_model(tokenizer, catalogue, tiny_model_cfg):
    from tomdistill.model.loading import load_causal_lm

    model = load_causal_lm(tiny_model_cfg)
    party = catalogue.scenario("public_goods", "party")
    item = prepare_item(tokenizer, score_prompt(tokenizer, party), party.game.actions)
    assert item.open_ended and sorted(tokenizer.decode([i]) for i in item.extension_ids) == list("0123456789")
    logprobs = action_logprobs(model, tokenizer, [item])[0]
    probs, mass = action_distribution(logprobs)
    assert 0 < mass <= 1 + 1e-6
    # P(1 complete) + P(10 complete) ≤ P(the tokens of " 1"), which holds every answer that starts with 1
    with torch.no_grad():
        ids = torch.tensor([item.prompt_ids + item.continuation_ids[1]])
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        n = len(item.continuation_ids[1])
        starts_with_1 = math.exp(sum(float(lp[-n - 1 + k, t]) for k, t in enumerate(item.continuation_ids[1])))
    assert math.exp(float(logprobs["1"])) + math.exp(float(logprobs["10"])) <= starts_with_1 * (1 + 1e-5)


def test_answer_logprob_multiplies_by_the_chance_that_no_digit_follows():
    tokens = torch.log(torch.tensor([0.5, 0.8]))
    extension = torch.log(torch.tensor([0.1, 0.15]))  # 25% that another digit follows
    assert math.exp(float(answer_logprob(tokens, extension))) == pytest.approx(0.5 * 0.8 * 0.75)
    assert math.exp(float(answer_logprob(tokens))) == pytest.approx(0.4)


def test_vllm_scoring_is_exact_and_agrees_with_hf(tokenizer, catalogue, tiny_model_cfg):
    """The vLLM backend's scoring (prompt log-probabilities only) against the hf backend's, on one model."""
    from tomdistill.model.loading import load_causal_lm
    from tomdistill.sampling.backends import VLLMBackend

    model = load_causal_lm(tiny_model_cfg).eval()

    class FakeLLM:  # vLLM's `LLM.generate` with prompt_logprobs=0: the log-probability of every prompt token
        def generate(self, prompts, params, lora_request=None, use_tqdm=False):
            assert params.prompt_logprobs == 0 and not getattr(params, "logprobs", None)
            outputs = []
            for prompt in prompts:
                ids = prompt["prompt_token_ids"]
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
                positions = [None] + [{t: SimpleNamespace(logprob=float(lp[i, t]))} for i, t in enumerate(ids[1:])]
                outputs.append(SimpleNamespace(prompt_logprobs=positions))
            return outputs

    backend = VLLMBackend.__new__(VLLMBackend)
    backend.settings, backend.shuffle_seed, backend.lora_request = SimpleNamespace(role="student"), None, None
    backend.tokenizer, backend.llm = tokenizer, FakeLLM()
    backend._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    scenarios = [catalogue.scenario("public_goods", "party"), catalogue.scenario("stag_hunt", "team")]
    from_vllm = backend.score(scenarios)
    from_hf = score_scenarios(model, tokenizer, scenarios)
    for v, (_, probs, mass) in zip(from_vllm, from_hf):
        assert v.mass == pytest.approx(mass, rel=1e-4) and v.mass <= 1 + 1e-6
        assert v.probs == pytest.approx(probs, abs=1e-5)


def test_an_impossible_or_tiny_mass_is_reported():
    assert "not disjoint" in mass_warning("public_goods/party", 2.0)
    assert "only 0.300" in mass_warning("stag_hunt/team", 0.3)
    assert mass_warning("stag_hunt/team", 1.0 + 1e-7) is None and mass_warning("x/y", 0.5) is None


# --- 3. the oracle: `others` is the total payoff of the other players --------------------------------

def test_the_party_teacher_follows_the_catalogue_definition(catalogue):
    party = catalogue.scenario("public_goods", "party")
    game, w, lam = party.game, party.context.regard, oracle.DEFAULT_PRECISION
    n, m = game.players, game.multiplier
    # a dollar given: −1 + m/n to the donor, (n − 1)·m/n to the others in total, so P(d) ∝ exp(λ d s)
    slope = (1 - w) * (m / n - 1) + w * (n - 1) * m / n
    weights = np.exp(lam * slope * np.arange(game.endowment + 1))
    expected = weights / weights.sum()
    probs = oracle.action_probabilities(party)
    assert [probs[str(d)] for d in range(game.endowment + 1)] == pytest.approx(list(expected), abs=1e-6)
    assert probs["0"] == pytest.approx(0.012, abs=5e-4) and probs["10"] == pytest.approx(0.279, abs=5e-4)
    assert sum(int(a) * p for a, p in probs.items()) == pytest.approx(7.65, abs=0.01)


def test_oracle_records_name_the_agent_and_its_precision(catalogue):
    from helpers import oracle_records

    records = oracle_records(catalogue, "score", n=1, splits=["oos_game"])
    assert records[0]["model"] == oracle.oracle_identity() != oracle.oracle_identity(0.9)
    assert records[0]["model"].startswith("oracle-logit")


# --- 4. splits say what was trained ------------------------------------------------------------------

def exact_records(rows: dict) -> dict[str, pd.DataFrame]:
    """Score-mode records per role from {(split, game, context): (p_teacher, p_base, p_tuned)}."""
    out = {}
    for r, role in enumerate(("teacher", "base", "tuned")):
        out[role] = pd.DataFrame([
            {"split": split, "game": game, "context": context, "action": "C", "model": role,
             "action_probs": json.dumps({"C": p[r], "D": 1 - p[r]}), "action_mass": 0.9}
            for (split, game, context), p in rows.items()])
    return out


ROWS = {
    ("in_sample", "prisoners_dilemma", "team"): (0.3, 0.8, 0.35),
    ("in_sample", "stag_hunt", "team"): (0.9, 0.8, 0.9),
    ("in_sample", "prisoners_dilemma", "business"): (0.3, 0.8, 0.7),   # held out: never trained
    ("in_sample", "stag_hunt", "business"): (0.55, 0.8, 0.75),         # held out: never trained
    ("oos_context", "stag_hunt", "athletes"): (0.4, 0.8, 0.6),
    ("oos_context", "prisoners_dilemma", "athletes"): (0.3, 0.8, 0.6),
    ("oos_game", "public_goods", "party"): (0.7, 0.5, 0.6),
}
TRAINING = {"trained_scenarios": ["prisoners_dilemma/team", "stag_hunt/team"], "validation_contexts": ["business"]}


def test_in_sample_counts_the_trained_scenarios_only_and_held_out_contexts_apart():
    before = compute_evaluation(exact_records(ROWS), n_bootstrap=1000)
    after = compute_evaluation(exact_records(ROWS), training=TRAINING, n_bootstrap=1000)
    a_before, a_after = before.headline("alignment"), after.headline("alignment")
    assert a_before["in_sample"]["n_scenarios"] == 4 and a_before["heldout_context"]["n_scenarios"] == 0
    assert a_after["in_sample"]["n_scenarios"] == 2 and a_after["heldout_context"]["n_scenarios"] == 2
    # trained: |0.35-0.3| + 0 over |0.8-0.3| + |0.8-0.9| = 1 - 0.05/0.6
    assert a_after["in_sample"]["value"] == pytest.approx(1 - 0.05 / 0.6)
    assert a_after["heldout_context"]["value"] == pytest.approx(1 - (0.4 + 0.2) / (0.5 + 0.25))
    assert a_after["overall"]["value"] == pytest.approx(a_before["overall"]["value"])


def test_stray_untrained_scenarios_are_named():
    records = exact_records(ROWS)["teacher"]
    relabelled, notes = label_heldout_scenarios(records, {"trained_scenarios": ["stag_hunt/team"],
                                                          "validation_contexts": ["business"]})
    assert (relabelled["split"] == "heldout_context").sum() == 3
    assert len(notes) == 1 and "prisoners_dilemma/team" in notes[0]


# --- 5. no silent mixing ------------------------------------------------------------------------------

def test_a_scenario_with_scores_and_samples_is_measured_by_the_scores_alone():
    rows = [{"split": "in_sample", "game": "stag_hunt", "context": "team", "action": a, "action_probs": ""}
            for a in ["D"] * 9 + ["C"]]
    rows.append({"split": "in_sample", "game": "stag_hunt", "context": "team", "action": "C",
                 "action_probs": json.dumps({"C": 0.9, "D": 0.1})})
    table = answer_table(pd.DataFrame(rows), "teacher")
    # before: the score record's argmax counted as one more answer among the ten samples (p = 2/11)
    assert list(table["mode"]) == ["score"] and table["value"].tolist() == pytest.approx([0.9])


def test_evaluation_says_which_scenarios_mixed_records():
    records = exact_records(ROWS)
    extra = records["teacher"].iloc[[0]].assign(action_probs="", action="D")
    records["teacher"] = pd.concat([records["teacher"], extra], ignore_index=True)
    result = compute_evaluation(records, n_bootstrap=1000)
    assert any("both score-mode records and sampled answers" in w and "prisoners_dilemma/team: 1 answers" in w
               for w in result.warnings)


def test_a_directory_of_several_runs_or_models_is_refused(tmp_path, catalogue):
    from helpers import write_teacher

    study = tmp_path / "study"
    write_teacher(study / "teacher" / "train", catalogue, n=1, modes=("generate",))
    write_teacher(study / "base" / "train", catalogue, n=1, modes=("score",))
    with pytest.raises(SamplesError, match="several runs"):
        load_samples(study, "teacher")

    def other_model(records):
        return [{**r, "model": "another-teacher"} if i % 2 else r for i, r in enumerate(records)]
    with pytest.raises(SamplesError, match="several models"):
        load_samples(write_teacher(tmp_path / "mixed", catalogue, n=2, modes=("generate",), edit=other_model), "teacher")


def test_prompt_version_covers_shuffling_and_the_answer_prefix(catalogue):
    from tomdistill.records import check_same_prompt_version
    from tomdistill.scenarios import prompt_version, scenario_version

    plain = prompt_version(catalogue)
    shuffled = prompt_version(catalogue, shuffle_seed=3)
    prefixed = prompt_version(catalogue, answer_prefix=True)
    assert len({plain, shuffled, prefixed, prompt_version(catalogue, shuffle_seed=4)}) == 4
    assert scenario_version(prefixed) == plain != scenario_version(shuffled)

    def dataset(version):
        import datasets
        return datasets.Dataset.from_dict({"prompt_version": [version]})
    # the teacher may be asked differently from the students; base and tuned must match exactly
    check_same_prompt_version({"teacher": dataset(plain), "base": dataset(prefixed), "tuned": dataset(prefixed)},
                              elicitation_may_differ=("teacher",))
    for base, tuned in ((plain, prefixed), (shuffled, shuffled)):
        with pytest.raises(SamplesError, match="prompt_version mismatch"):
            check_same_prompt_version({"teacher": dataset(plain), "base": dataset(base), "tuned": dataset(tuned)},
                                      elicitation_may_differ=("teacher",))


def test_sample_py_versions_score_mode_and_shuffled_prompts_apart(tmp_path):
    from test_sampling import make_cfg
    from tomdistill.sampling import run

    args = ("sampler=oracle", "scenarios.games=[stag_hunt]", "scenarios.contexts=[team]")
    versions = {}
    for name, extra in (("gen", ()), ("score", ("sampler.mode=score",)), ("shuffled", ("scenarios.shuffle_outcomes=true",))):
        versions[name] = load_samples(run(make_cfg(tmp_path / name, *args, *extra)))[0]["prompt_version"]
    assert versions["score"].endswith("+answer-prefix") and "-shuffle0" in versions["shuffled"]
    assert len(set(versions.values())) == 3


def test_evaluate_reads_the_catalogue_with_its_extra_dirs(tmp_path):
    from omegaconf import OmegaConf

    from tomdistill import CATALOGUE_DIR
    from tomdistill.evaluation import catalogue_facts

    extra = tmp_path / "extra"
    (extra / "games").mkdir(parents=True)
    (extra / "games" / "charity.yaml").write_text("name: charity\nkind: public_goods\nplayers: 3\nendowment: 20\n"
                                                  "multiplier: 2.0\n")
    cfg = OmegaConf.create({"catalogue_dir": str(CATALOGUE_DIR), "extra_dirs": [str(extra)]})
    endowments, _, problem = catalogue_facts(cfg)
    assert problem is None and endowments["charity"] == 20 and endowments["public_goods"] == 10


# --- 6. intervals that mean something ----------------------------------------------------------------

def test_a_one_scenario_group_has_no_interval_under_the_scenario_bootstrap(tmp_path):
    from tomdistill.report import write_report
    from tomdistill.report.tables import propensity_label

    result = compute_evaluation(exact_records(ROWS), training=TRAINING, n_bootstrap=1000)
    headline = result.headline("alignment")
    assert headline["oos_game"]["value"] is not None
    assert headline["oos_game"]["ci_low"] is None and headline["oos_game"]["ci_high"] is None  # was [v, v]
    assert headline["oos_context"]["ci_low"] is not None  # two scenarios: an interval
    assert result.settings["bootstrap"] == BOOTSTRAP_SCENARIOS and propensity_label(result) == "P(C)"
    summary = write_report(result, tmp_path / "report")
    assert summary["bootstrap"] == BOOTSTRAP_SCENARIOS and summary["alignment"]["oos_game"]["ci_low"] is None
    assert "scenarios resampled within each group" in (tmp_path / "report" / "report.md").read_text()
    assert "[—]" in (tmp_path / "report" / "headline.md").read_text()


# --- 7. reasoning-first students are said to be scored without their reasoning ------------------------

def test_a_reasoning_first_student_is_flagged():
    result = compute_evaluation(exact_records(ROWS), training={**TRAINING, "target": "motivation_answer"},
                                n_bootstrap=1000)
    assert any("scored with `Answer:` right after the prompt, without its reasoning" in w for w in result.warnings)


def test_the_report_says_how_many_teacher_labels_training_used(tmp_path):
    from tomdistill.report import write_report

    labels = {"distributions": 10, "answers": 0, "scenarios_by_split": {"augment": 8, "in_sample": 2}}
    result = compute_evaluation(exact_records(ROWS), training={**TRAINING, "teacher_labels": labels}, n_bootstrap=100)
    summary = write_report(result, tmp_path / "report")
    assert summary["settings"]["teacher_labels"] == labels
    assert ("Training: 10 scenarios (augment 8, in_sample 2); teacher labels used: 10 choice distributions, "
            "0 sampled answers.") in (tmp_path / "report" / "report.md").read_text()
    plain = compute_evaluation(exact_records(ROWS), training=TRAINING, n_bootstrap=100)  # an older adapter: no line
    write_report(plain, tmp_path / "plain")
    assert "teacher labels used" not in (tmp_path / "plain" / "report.md").read_text()
