"""Sampling: backends, modes, shards, resume, determinism, data-parallel ranks, manifest."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tomdistill.records import MANIFEST, load_samples, read_manifest
from tomdistill.sampling import SamplingConfigError, run
from tomdistill.sampling import runner as runner_module
from tomdistill.sampling.backends import RowSeededSampler
from tomdistill.scenarios import UNPARSED
from tomdistill.scenarios import oracle as oracle_agent

ROOT = Path(__file__).resolve().parents[1]
TWO_GAMES = ["scenarios.games=[prisoners_dilemma,stag_hunt]", "scenarios.contexts=[team,business]",
             "scenarios.splits=[in_sample]"]


def make_cfg(output: Path, *overrides: str):
    """The config `python sample.py output=... <overrides>` would run with (Hydra resolvers included)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"output={output}", "sampler.progress=false", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in conf/paths resolves as in a real run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def records_by_key(directory: Path) -> dict:
    data = load_samples(directory)
    nan_free = lambda r: {k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}  # noqa: E731
    return {(r["game"], r["context"], r["sample_index"]): nan_free(r) for r in data}


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("sampler.mode=sample", "sampler.mode"),
    ("sampler.backend=openai", "sampler.backend"),
    ("role=judge", "role"),
    ("sampler.n=0", "sampler.n"),
    ("sampler.top_p=1.5", "sampler.top_p"),
    ("sampler.temperature=-1", "sampler.temperature"),
    ("sampler.shard_size=0", "sampler.shard_size"),
    ("sampler.dtype=int3", "sampler.dtype"),
    ("scenarios.games=[chess]", "scenarios.games"),
])
def test_bad_config_value_names_the_key(tmp_path, override, key):
    with pytest.raises(SamplingConfigError, match=key.replace(".", r"\.")):
        run(make_cfg(tmp_path, "sampler=oracle", override))


def test_sample_py_reports_a_bad_value_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "sample.py", "sampler=oracle", "sampler.mode=sample", f"output={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "sampler.mode: must be one of generate|score" in result.stderr and "Traceback" not in result.stderr


def test_hydra_run_directory_is_the_output_and_a_climbing_output_is_refused(tmp_path):
    """sample.py's Hydra log and .hydra/ go into `output=` (conf/base.yaml), not into an outputs/ of the cwd;
    evaluate.py refuses `..` before Hydra would create a directory there."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sampler=oracle", "sampler.mode=score",
                             "scenarios.splits=[in_sample]", f"output={out}"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "manifest.json").exists() and (out / "sample.log").exists() and (out / ".hydra").is_dir()
    assert list(cwd.iterdir()) == []
    refused = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "output=new/../../escaped"],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "contains '..'" in refused.stderr
    assert list(cwd.iterdir()) == [] and not (tmp_path / "escaped").exists()


# --- oracle: score vs generate ---------------------------------------------------------------------

def test_oracle_score_probabilities_sum_to_one(tmp_path):
    out = run(make_cfg(tmp_path, "sampler=oracle", "sampler.mode=score"))
    data = load_samples(out)
    assert len(data) == 56 and set(data["sample_index"]) == {0}
    for record in data:
        probs = json.loads(record["action_probs"])
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert record["action"] == max(probs, key=probs.get)
        assert record["model"] == oracle_agent.oracle_identity() and record["action_mass"] == 1.0
        assert record["model"].startswith("oracle-logit") and "lambda0.6" in record["model"]
    assert read_manifest(out)["complete"] is True


def test_oracle_generate_frequencies_match_score_probabilities(tmp_path, catalogue):
    n = 2000
    out = run(make_cfg(tmp_path, "sampler=oracle", f"sampler.n={n}", "sampler.shard_size=500", *TWO_GAMES))
    data = load_samples(out)
    assert len(data) == 4 * n and UNPARSED not in data["action"]
    for (game, context), count in Counter(zip(data["game"], data["context"])).items():
        p = oracle_agent.action_probabilities(catalogue.scenario(game, context))["C"]
        share = sum(1 for r in data if r["game"] == game and r["context"] == context and r["action"] == "C") / count
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / count), (game, context, share, p)


def test_oracle_teacher_records_motivations_that_agree_with_the_choice(tmp_path):
    out = run(make_cfg(tmp_path, "sampler=oracle", "role=teacher", "sampler.n=20", *TWO_GAMES))
    for record in load_samples(out):
        assert record["completion"].startswith(f"Answer: {record['action']}\nMotivation: ")
        assert record["motivation"] and record["motivation"] in record["completion"]
        assert math.isnan(record["action_mass"]) and record["action_probs"] == ""


# --- output format, manifest, determinism, resume -----------------------------------------------------

def test_output_loads_with_datasets_and_manifest_is_complete(tmp_path):
    out = run(make_cfg(tmp_path, "sampler=oracle", "sampler.n=30", "sampler.shard_size=7", *TWO_GAMES))
    (out / "sample.log").write_text("a Hydra log file beside the shards\n")
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert len(loaded) == 4 * 30 and loaded.features == load_samples(out).features
    manifest = read_manifest(out)
    assert manifest["complete"] is True and manifest["mode"] == "generate" and manifest["n"] == 30
    assert manifest["counts"] == {f"{g}/{c}": 30 for g in ("prisoners_dilemma", "stag_hunt") for c in ("team", "business")}
    assert manifest["shards"] == 4 * 5 and manifest["prompt_version"].startswith("p1-")
    assert manifest["config"]["sampler"]["n"] == 30 and manifest["git"]["commit"]


def test_rerun_with_the_same_seed_is_identical_and_another_seed_differs(tmp_path):
    args = ("sampler=oracle", "role=teacher", "sampler.n=25", "sampler.shard_size=10", *TWO_GAMES)
    first = records_by_key(run(make_cfg(tmp_path / "a", *args)))
    second = records_by_key(run(make_cfg(tmp_path / "b", *args)))
    assert first == second
    other = records_by_key(run(make_cfg(tmp_path / "c", *args, "seed=1")))
    assert [r["completion"] for r in other.values()] != [r["completion"] for r in first.values()]


def test_shard_size_does_not_change_the_samples(tmp_path):
    args = ("sampler=oracle", "sampler.n=12", *TWO_GAMES)
    small = records_by_key(run(make_cfg(tmp_path / "a", *args, "sampler.shard_size=5")))
    large = records_by_key(run(make_cfg(tmp_path / "b", *args, "sampler.shard_size=12")))
    assert small == large


def test_resume_after_a_crash_has_no_duplicate_and_no_missing_record(tmp_path, monkeypatch):
    args = ("sampler=oracle", "sampler.n=20", "sampler.shard_size=6", *TWO_GAMES)
    reference = records_by_key(run(make_cfg(tmp_path / "reference", *args)))

    real_write, calls = runner_module.write_shard, []

    def crash_after_five(directory, shard, records):
        if len(calls) == 5:
            # a half-written temp file, as a kill during a write would leave
            (directory / "train" / f".{shard.filename}.999.part").write_bytes(b"PAR1 half")
            raise KeyboardInterrupt("simulated crash")
        calls.append(shard.filename)
        return real_write(directory, shard, records)

    out = tmp_path / "crashed"
    monkeypatch.setattr(runner_module, "write_shard", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(out, *args))
    assert not (out / MANIFEST).exists()  # an unfinished run is not marked complete
    assert len(list((out / "train").glob("shard-*.parquet"))) == 5
    assert len(load_samples(out)) == 5 * 6 - 4  # partial data is readable, the temp file is not read

    monkeypatch.setattr(runner_module, "write_shard", real_write)
    run(make_cfg(out, *args))
    resumed = load_samples(out)
    keys = list(zip(resumed["game"], resumed["context"], resumed["sample_index"]))
    assert len(keys) == len(set(keys)) == 4 * 20  # no duplicate, no missing record
    assert records_by_key(out) == reference
    assert read_manifest(out)["complete"] is True and not list((out / "train").glob(".*.part"))


def test_resuming_with_another_configuration_is_refused(tmp_path):
    run(make_cfg(tmp_path, "sampler=oracle", "sampler.n=5", *TWO_GAMES))
    with pytest.raises(SamplingConfigError, match="another configuration.*n: 5 there, 6 now"):
        run(make_cfg(tmp_path, "sampler=oracle", "sampler.n=6", *TWO_GAMES))


# --- data-parallel ranks ----------------------------------------------------------------------------

def test_two_processes_with_gloo_cover_every_shard_exactly_once(tmp_path):
    out = tmp_path / "dp"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "sample.py", "sampler=oracle", "sampler.n=20", "sampler.shard_size=6", "sampler.progress=false",
         *TWO_GAMES, f"output={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["complete"] is True and manifest["world_size"] == 2
    by_rank = manifest["written_by_rank"]
    assert len(by_rank) == 2 and all(by_rank)  # both ranks worked
    every = by_rank[0] + by_rank[1]
    assert len(every) == len(set(every)) == manifest["shards"] == 4 * 4  # each shard exactly once
    single = records_by_key(run(make_cfg(tmp_path / "single", "sampler=oracle", "sampler.n=20",
                                         "sampler.shard_size=6", *TWO_GAMES)))
    assert records_by_key(out) == single  # a shard's records do not depend on the rank that wrote it


# --- the hf backend -------------------------------------------------------------------------------

def test_row_seeded_sampler_draws_from_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = []
    for seed in range(3000):
        sampler = RowSeededSampler([seed], temperature=0.7, top_p=1.0, device="cpu")
        out = sampler(None, logits.clone())
        assert torch.isfinite(out).sum() == 1
        draws.append(int(out.argmax()))
    expected = torch.softmax(logits[0] / 0.7, -1)
    for token, p in enumerate(expected.tolist()):
        share = draws.count(token) / len(draws)
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(draws)) + 1e-3
    # a seed is a seed whichever batch row it lands in
    batch = RowSeededSampler([7, 11], 0.7, 1.0, "cpu")(None, logits.repeat(2, 1))
    alone = RowSeededSampler([11], 0.7, 1.0, "cpu")(None, logits.clone())
    assert torch.equal(batch[1], alone[0])


def test_hf_generate_and_score_on_the_tiny_llama(tmp_path):
    args = ("model=tiny_llama", "sampler.n=3", "sampler.shard_size=2", "sampler.batch_size=4",
            "scenarios.games=[prisoners_dilemma,public_goods]", "scenarios.contexts=[team,party]")
    out = run(make_cfg(tmp_path / "gen", *args))
    data = load_samples(out)
    assert len(data) == 2 * 3 and set(data["model"]) == {"tiny_llama"}
    # the assistant turn is prefilled with "Answer:" and the record holds the whole turn
    assert all(p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\nAnswer:") for p in data["prompt"])
    assert all(c.startswith("Answer: ") for c in data["completion"])
    manifest = read_manifest(out)
    # a random model answers garbage: kept and counted, never dropped
    assert manifest["unparsed"] == sum(a == UNPARSED for a in data["action"]) > 0
    assert records_by_key(run(make_cfg(tmp_path / "again", *args))) == records_by_key(out)

    scored = load_samples(run(make_cfg(tmp_path / "score", *args, "sampler.mode=score")))
    assert len(scored) == 2
    for record in scored:
        probs = json.loads(record["action_probs"])
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6) and 0 < record["action_mass"] < 1
        assert len(probs) == (11 if record["game"] == "public_goods" else 2)


def test_hf_prompt_is_encoded_once_without_changing_the_samples(tiny_model_cfg, catalogue):
    from omegaconf import OmegaConf

    from tomdistill.sampling.backends import GenerationRequest, HFBackend
    from tomdistill.sampling.settings import settings_from_config

    cfg = OmegaConf.create({"model": tiny_model_cfg, "role": "student", "seed": 0, "adapter": None,
                            "sampler": make_cfg(Path("/tmp"))["sampler"]})
    backend = HFBackend(cfg, settings_from_config(cfg))
    scenarios = [catalogue.scenario("stag_hunt", "team"), catalogue.scenario("public_goods", "party")]
    requests = [GenerationRequest(s, backend.prompt(s), [10 * i + j for j in range(3)], 0)
                for i, s in enumerate(scenarios)]
    shared = [[c.text for c in r] for r in backend.generate(requests)]
    backend._shared_prefix_cache = lambda encoded, per_prompt: {}  # plain num_return_sequences
    plain = [[c.text for c in r] for r in backend.generate(requests)]
    assert shared == plain and len({t for r in shared for t in r}) > 1


def test_hf_adapter_is_loaded(tmp_path, tiny_model_cfg):
    from peft import LoraConfig, get_peft_model

    from tomdistill.model.loading import load_causal_lm, tag_adapter

    model = get_peft_model(load_causal_lm(tiny_model_cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-trivial adapter (lora_B starts at zero)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    training = {"trained_scenarios": ["stag_hunt/team"], "validation_contexts": ["business"], "loss": "soft"}
    tag_adapter(adapter, "tiny_llama", {"training": training})
    args = ("model=tiny_llama", "sampler.mode=score", "scenarios.games=[stag_hunt]", "scenarios.contexts=[team]")
    base = load_samples(run(make_cfg(tmp_path / "base", *args)))[0]
    tuned_dir = run(make_cfg(tmp_path / "tuned", *args, f"adapter={adapter}"))
    tuned = load_samples(tuned_dir)[0]
    assert tuned["action_probs"] != base["action_probs"]
    assert read_manifest(tuned_dir)["adapter"] == str(adapter.resolve())
    assert read_manifest(tuned_dir)["adapter_training"] == training  # the tuned samples say what was trained
    with pytest.raises(Exception, match="trained on base model 'tiny_llama'"):
        run(make_cfg(tmp_path / "wrong", "model=smollm2_135m", "sampler.mode=score", *args[2:], f"adapter={adapter}"))


@pytest.mark.slow
def test_smollm2_generate_and_score(tmp_path):
    """The embedded default model end to end: sampled answers and exact action probabilities."""
    args = ("scenarios.games=[prisoners_dilemma]", "scenarios.contexts=[team]", "scenarios.splits=[in_sample]")
    scored = load_samples(run(make_cfg(tmp_path / "score", *args, "sampler.mode=score")))[0]
    probs = json.loads(scored["action_probs"])
    assert math.isclose(probs["C"] + probs["D"], 1.0, abs_tol=1e-6) and 0.0 < scored["action_mass"] <= 1.0
    generated = load_samples(run(make_cfg(tmp_path / "gen", *args, "sampler.n=16")))
    assert len(generated) == 16 and set(generated["model"]) == {"smollm2_135m"}
    assert all(r["prompt"].endswith("<|im_start|>assistant\nAnswer:") for r in generated)
    assert len(set(generated["completion"])) > 1  # sampled, not greedy


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_missing_says_how_to_install_it(tmp_path):
    from tomdistill.model.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="scripts/setup_vllm.sh"):
        run(make_cfg(tmp_path, "sampler=vllm", *TWO_GAMES))
