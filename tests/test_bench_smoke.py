"""Smoke tests of the benchmarks' core functions on the tiny Llama: the tables are well formed.

Benchmarks are run by hand (`python -m bench.<name>`); nothing here asserts a timing.
"""
import math

import pytest


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_sample_throughput_core():
    from bench import sample_throughput

    result = sample_throughput.measure("tiny_llama", n=2, naive_samples=1, scenario_count=2, repetitions=1)
    for side in (result["naive"], result["tomdistill"]):
        assert len(side.seconds) == len(side.new_tokens) == 1
        assert _positive(side.completions_per_s) and _positive(side.new_tokens_per_s)
    assert result["tomdistill"].completions == 4 and result["naive"].completions == 2
    assert _positive(result["ratio"])
    assert sample_throughput.render(result, "t").row_count == 3


def test_score_vs_sample_core():
    from bench import score_vs_sample

    result = score_vs_sample.measure("tiny_llama", n=3, scenario_count=2, repetitions=2, mc_repetitions=1)
    assert len(result["score_seconds"]) == 2 and len(result["sample_seconds"]) == 1
    assert _positive(result["speedup"])
    assert 0.0 <= result["parsed_share"] <= 1.0
    for estimate in result["estimates"]:
        assert 0.0 <= estimate.p_score <= 1.0 and 0 <= estimate.parsed <= estimate.sampled == 3
    summary, agreement = score_vs_sample.render(result, "t")
    assert summary.row_count == 3 and agreement.row_count == 3


@pytest.mark.slow
def test_train_throughput_core(tmp_path):
    pytest.importorskip("trl")
    from bench import train_throughput

    result = train_throughput.measure("tiny_llama", steps=2, repetitions=1, batch_size=2, max_length=512,
                                      samples_per_scenario=2, cache_dir=tmp_path)
    for side in ("tomdistill", "trl"):
        s = result[side]
        assert _positive(s["useful_tokens_per_s"]) and _positive(s["peak_rss_mib"])
        assert 0.0 <= s["padding_fraction"] < 1.0 and s["useful_per_step"] > 0
    assert _positive(result["ratio"]) and result["examples"] == 40
    assert train_throughput.render(result, "t").row_count == 3


def test_soft_step_core():
    from bench import soft_step

    result = soft_step.measure("tiny_llama", steps=2, top_layers=1, augment=1)
    assert len(result["seconds"]) == 7 and all(_positive(s) for s in result["seconds"].values())
    assert result["scenarios"] == 32 and result["tokens"] > 32 * 100 and result["timed_steps"] == 1
    assert soft_step.render(result).row_count == 7


def test_train_memory_core(monkeypatch):
    from bench import train_memory
    from tomdistill.model import shared_prefix

    # the benchmark sets the suffix passes' cost process-wide (it runs alone); put it back after this test
    monkeypatch.setattr(shared_prefix, "PASS_COST_TOKENS", shared_prefix.PASS_COST_TOKENS)
    today, recipe = (train_memory.child(setting, "tiny_llama", augment=1, precision="fp32", steps=1)
                     for setting in (train_memory.SETTINGS[0], train_memory.SETTINGS[3]))
    for result in (today, recipe):
        assert all(_positive(result[key]) for key in ("loaded_mib", "forward_mib", "step_mib", "loss", "grad_norm"))
        assert result["scenarios"] == 32 and len(result["seconds"]) == 1 and result["passes"] >= 2
    assert recipe["held_mib"]["checkpointed layers' inputs"] > 0 and "MLP (frozen)" not in recipe["held_mib"]
    assert recipe["loss"] == pytest.approx(today["loss"], rel=1e-6)
    assert recipe["grad_norm"] == pytest.approx(today["grad_norm"], rel=1e-5)
    times = train_memory.step_times("tiny_llama", augment=1, precision="fp32", steps=2)
    assert len(times) == 3 and all(len(t) == 2 and all(_positive(s) for s in t) for t in times.values())
    peaks, held, timing = train_memory.render([today, recipe], times)
    assert peaks.row_count == 2 and timing.row_count == 3 and held.row_count >= 5
