"""On one GPU: the hf sampler (`python sample.py model=tiny_llama sampler.device=cuda`) in generate and score
mode, and in score mode with the adapter the ddp fit trained on the GPU. Peak GPU memory via peak_mem.py.
Seconds on one H100 (estimates): generate ~20, score ~15, score with the adapter ~15."""
from __future__ import annotations

import json
import math

import pytest

import gpu_runs

pytestmark = pytest.mark.gpu


def load(directory):
    from tomdistill.records import load_samples, read_manifest

    return load_samples(directory), read_manifest(directory)


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT + 60)
def test_hf_generate_on_cuda(runs, record_property):
    output, peak = runs.sample("generate")
    record_property("gpu_mem_gb", peak)
    data, manifest = load(output)
    assert peak and peak > 0, "sample.py never allocated CUDA memory"
    assert len(data) == gpu_runs.SAMPLE_SCENARIO_COUNT * gpu_runs.SAMPLE_N
    assert set(data["model"]) == {"tiny_llama"} and manifest["complete"] is True
    assert all(c.startswith("Answer: ") for c in data["completion"])
    assert len(set(data["completion"])) > 1  # sampled, not greedy


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT + 60)
def test_hf_score_on_cuda(runs, record_property):
    output, peak = runs.sample("score")
    record_property("gpu_mem_gb", peak)
    data, manifest = load(output)
    assert peak and peak > 0, "sample.py never allocated CUDA memory"
    assert len(data) == gpu_runs.SAMPLE_SCENARIO_COUNT and manifest["complete"] is True
    for record in data:
        probs = json.loads(record["action_probs"])
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4), probs
        assert 0 < record["action_mass"] <= 1
        assert len(probs) == (11 if record["game"] == "public_goods" else 2)


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT * 3 + 60)
def test_hf_score_with_the_gpu_trained_adapter(runs, record_property):
    adapter = runs.train("ddp") / "adapter"
    base, _ = runs.sample("score")
    output, peak = runs.sample("score", adapter=adapter)
    record_property("gpu_mem_gb", peak)
    tuned, manifest = load(output)
    base_data, _ = load(base)
    assert manifest["adapter"] == str(adapter.resolve()) and manifest["complete"] is True
    before = {(r["game"], r["context"]): json.loads(r["action_probs"]) for r in base_data}
    after = {(r["game"], r["context"]): json.loads(r["action_probs"]) for r in tuned}
    assert before.keys() == after.keys()
    moved = max(abs(after[k][a] - before[k][a]) for k in before for a in before[k])
    record_property("note", f"adapter moved P(action) by up to {moved:.2e}")
    assert moved > 0, "the adapter changed no action probability: it was not applied"
