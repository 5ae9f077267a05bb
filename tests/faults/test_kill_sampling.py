"""Kill and resume, sampling: `sample.py` (tiny Llama, generate mode) SIGKILLed at a seeded random
shard, then rerun, equals an uninterrupted run record for record."""
from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

from tomdistill.records import load_samples, read_manifest

from .common import TWO_BY_TWO, finish, ok, entry, start, wait_for

N, SHARD_SIZE = 6, 1  # 4 scenarios x 6 samples, one sample per shard: 24 shards
SHARDS = 4 * N // SHARD_SIZE
ARGS = ["model=tiny_llama", f"sampler.n={N}", f"sampler.shard_size={SHARD_SIZE}", "sampler.batch_size=1",
        "sampler.max_new_tokens=16", "sampler.progress=false", "seed=3", *TWO_BY_TWO]


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "train").glob("shard-*.parquet")) if (directory / "train").exists() else []


def records(directory: Path) -> list[dict]:
    def plain(record):
        return {k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}

    return sorted((plain(r) for r in load_samples(directory)), key=lambda r: (r["game"], r["context"], r["sample_index"]))


def test_sigkill_at_a_random_shard_then_rerun_equals_an_uninterrupted_run(tmp_path):
    kill_after = random.Random(20240611).randint(1, SHARDS // 2)  # shards written before the kill
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted reference runs beside the one that gets killed
    reference = start("sample.py", [*ARGS, f"output={reference_dir}"], tmp_path / "reference.log")
    victim = start("sample.py", [*ARGS, f"output={killed_dir}"], tmp_path / "killed.log")
    try:
        wait_for(lambda: len(shard_files(killed_dir)) >= kill_after, victim, what=f"{kill_after} shard(s)")
    finally:
        code = finish(victim, signal.SIGKILL)
    assert code == -signal.SIGKILL
    written = shard_files(killed_dir)
    assert kill_after <= len(written) < SHARDS, f"the kill came too late: {len(written)} shards written"
    assert not (killed_dir / "manifest.json").exists()  # a killed run is never marked complete
    assert json.loads((killed_dir / "plan.json").read_text())["n"] == N
    assert len(load_samples(killed_dir)) == len(written) * SHARD_SIZE  # every shard on disk is whole

    rerun = ok(entry("sample.py", [*ARGS, f"output={killed_dir}"]))
    assert finish(reference) == 0
    assert "samples:" in rerun.stdout

    # same shards, same records, no duplicate, none missing, no partial/temp file left
    assert shard_files(killed_dir) == shard_files(reference_dir) and len(shard_files(killed_dir)) == SHARDS
    resumed, expected = records(killed_dir), records(reference_dir)
    keys = [(r["game"], r["context"], r["sample_index"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 4 * N
    assert resumed == expected
    leftovers = [p.name for p in (killed_dir / "train").iterdir() if not p.name.startswith("shard-")]
    assert leftovers == []
    manifest = read_manifest(killed_dir)
    assert manifest["complete"] is True and manifest["records"] == 4 * N and manifest["shards"] == SHARDS
    assert manifest["counts"] == read_manifest(reference_dir)["counts"]
