"""Shards: the unit of work and of output.

A shard is one scenario and a range of sample indices. Each is written atomically (a hidden temp
file, then `os.replace`) as `train/shard-<game>-<context>-<start>.parquet`, so a shard file either
holds all its records or does not exist; a rerun skips the shards that exist and so resumes a
killed run. Seeds derive from (seed, game, context, index) alone, so a shard's records do not
depend on which rank, batch or rerun produced them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..records import FEATURES, RECORD_COLUMNS, SHARD_GLOB
from ..scenarios import Scenario
from ..scenarios.schema import SHARD_TEMP_NAME

# Shards live in DIR/train/: `datasets.load_dataset("parquet", data_dir=DIR)` reads every file under
# DIR unless a split-named directory holds the data, and DIR also holds manifest.json, plan.json and
# Hydra's sample.log. ("train" is only datasets' name for an unsplit dataset.)
SHARD_DIR = "train"
# ".part": temp files are hidden and not *.parquet: no reader ever sees a half-written shard
TEMP_SUFFIX = SHARD_TEMP_NAME.rpartition("}")[2]


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the run seed and a path of names/indices (stable across Python runs)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Shard:
    scenario: Scenario
    start: int
    count: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.count)

    @property
    def filename(self) -> str:
        return self.scenario.shard_name(self.start)  # names fit a file name: scenarios/catalogue.py checks them

    def shard_seed(self, seed: int) -> int:
        return derive_seed(seed, self.scenario.game.name, self.scenario.context.name, "shard", self.start)

    def sample_seeds(self, seed: int) -> list[int]:
        """One seed per sample: a sample's draw is the same whichever shard size or batch holds it."""
        game, context = self.scenario.game.name, self.scenario.context.name
        return [derive_seed(seed, game, context, "sample", i) for i in self.indices]


def plan_shards(scenarios: list[Scenario], per_scenario: int, shard_size: int) -> list[Shard]:
    """Every (scenario, sample range) of at most `shard_size` samples, in a fixed order."""
    return [
        Shard(scenario, start, min(shard_size, per_scenario - start))
        for scenario in scenarios
        for start in range(0, per_scenario, shard_size)
    ]


def shards_for_rank(plan: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """Rank r takes shards r, r + W, r + 2W, … (round robin spreads scenarios evenly)."""
    return [shard for i, shard in enumerate(plan) if i % world_size == rank]


def shard_path(directory: Path, shard: Shard) -> Path:
    return Path(directory) / SHARD_DIR / shard.filename


def _temp_path(target: Path) -> Path:
    return target.with_name(SHARD_TEMP_NAME.format(name=target.name, pid=os.getpid()))


def missing_shards(directory: Path, plan: list[Shard]) -> list[Shard]:
    return [shard for shard in plan if not shard_path(directory, shard).exists()]


def write_shard(directory: Path, shard: Shard, records: list[dict]) -> Path:
    """Write a shard's records atomically; the file appears complete or not at all."""
    if len(records) != shard.count:
        raise RuntimeError(f"{shard.filename}: expected {shard.count} records, got {len(records)}")
    target = shard_path(directory, shard)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(target)
    # the schema carries the `datasets` features in its metadata, so load_dataset restores them exactly
    table = pa.Table.from_pylist([{c: r[c] for c in RECORD_COLUMNS} for r in records], schema=FEATURES.arrow_schema)
    pq.write_table(table, temp)
    os.replace(temp, target)
    return target


def remove_stale_temps(directory: Path) -> None:
    """Temp files left by a killed run (only called once every shard exists, so none is in use)."""
    for temp in (Path(directory) / SHARD_DIR).glob(f".{SHARD_GLOB}.*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    temp = _temp_path(path)
    temp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temp, path)
