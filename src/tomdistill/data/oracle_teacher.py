"""Teacher samples from the oracle agent, written in the sample record schema (records.FEATURES).

`python train.py` with `data.teacher=null` trains on these: the oracle is a transparent,
known-truth teacher (docs/scenarios.md) that costs milliseconds, so the embedded default needs no
sampling run first. One directory holds both modes of `sample.py`:
- `shard-generate.parquet`: `n` sampled answers per scenario, each with a motivation (SFT data);
- `shard-score.parquet`: one record per scenario with the exact `action_probs` (soft labels).
The directory is keyed by catalogue version, the augment split (`Catalogue.augment_fingerprint`), `n`
and seed, written atomically, and reused.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import datasets

from ..records import FEATURES
from ..scenarios import Catalogue, answer_text, build_messages, prompt_version
from ..scenarios.catalogue import AUGMENT_SPLIT
from ..scenarios.oracle import action_probabilities, oracle_identity, motivation, sample_actions
from ..scenarios.prompts import plain_prompt


def oracle_records(catalogue: Catalogue, n: int, seed: int, mode: str = "generate", splits=None) -> list[dict]:
    """Records of the oracle teacher: `mode` is `generate` (n answers per scenario) or `score`."""
    version = prompt_version(catalogue)
    records = []
    for number, scenario in enumerate(catalogue.scenarios(splits)):
        prompt = plain_prompt(build_messages(scenario, "teacher"))
        base = {
            "model": oracle_identity(), "role": "teacher", "game": scenario.game.name,
            "context": scenario.context.name, "split": scenario.split, "prompt_version": version,
            "prompt": prompt, "seed": seed,
        }
        if mode == "score":
            probs = action_probabilities(scenario)
            best = max(probs, key=probs.get)
            records.append({**base, "sample_index": 0, "completion": answer_text(best), "action": best,
                            "motivation": "", "action_probs": json.dumps(probs), "action_mass": 1.0})
            continue
        draws = sample_actions(scenario, n, seed=seed * 100_003 + number)
        for index, action in enumerate(draws):
            why = motivation(scenario, action, seed=seed * 1_000_003 + number * 1009 + index)
            records.append({**base, "sample_index": index, "completion": answer_text(action, why), "action": action,
                            "motivation": why, "action_probs": "", "action_mass": math.nan})
    return records


def write_records(records: list[dict], path: Path) -> None:
    datasets.Dataset.from_list(records, features=FEATURES).to_parquet(str(path))


def oracle_teacher_dir(catalogue: Catalogue, cache_dir: str | Path, n: int = 16, seed: int = 0) -> Path:
    """A cached samples directory of the oracle teacher (both modes); built once per key."""
    key = f"{prompt_version(catalogue)}-{oracle_identity()}-n{n}-s{seed}"
    augment = catalogue.augment_fingerprint()
    if augment:  # the training-only augment split is not part of prompt_version: key it here
        key += f"-aug{augment}"
    target = Path(cache_dir) / "oracle_teacher" / key
    if (target / "manifest.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    write_records(oracle_records(catalogue, n, seed, "generate"), staging / "shard-generate.parquet")
    write_records(oracle_records(catalogue, n, seed, "score"), staging / "shard-score.parquet")
    (staging / "manifest.json").write_text(json.dumps(
        {"model": oracle_identity(), "role": "teacher", "modes": ["generate", "score"], "n": n, "seed": seed,
         "prompt_version": prompt_version(catalogue), "augment": augment or None,
         "augment_scenarios": len(catalogue.splits.get(AUGMENT_SPLIT, []))}, indent=2))
    if target.exists():  # lost a race with another process: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
        return target
    os.replace(staging, target)
    return target
