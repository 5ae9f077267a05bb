"""Sampling: ask a model (or the oracle) every scenario many times and store what it said.

`run(cfg)` is what `sample.py` calls; the pieces — settings, shards, backends, summary, manifest —
are importable on their own (tests, notebooks).
"""
from .backends import Backend, HFBackend, OracleBackend, VLLMBackend, make_backend
from .manifest import PLAN
from .runner import run, select_scenarios
from .settings import SamplerSettings, SamplingConfigError, settings_from_config
from .shards import Shard, derive_seed, plan_shards, shards_for_rank
from .summary import ScenarioSummary, summarise

__all__ = [
    "run", "select_scenarios", "Backend", "HFBackend", "OracleBackend", "VLLMBackend", "make_backend", "PLAN",
    "SamplerSettings", "SamplingConfigError", "settings_from_config", "Shard", "derive_seed", "plan_shards",
    "shards_for_rank", "ScenarioSummary", "summarise",
]
