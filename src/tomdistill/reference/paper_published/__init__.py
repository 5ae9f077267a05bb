"""The paper's published answer counts as three sample datasets (teacher / base / tuned).

The counts (`counts.csv`, see README.md for source and licence) are expanded into one record per
answer in the standard schema and written as parquet shards into a cache directory, so that the
evaluation reads them through `records.load_samples` — the same code path as a user's samples.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from tomdistill.records import FEATURES, MANIFEST

NAME = "paper_published"
PROMPT_VERSION = "paper-lfb"
ROLES = ("teacher", "base", "tuned")
MODELS = {"teacher": "llama2-70b-chat", "base": "llama2-7b-chat", "tuned": "llama2-7b-chat-ft"}
CITATION = (
    "Lore, Ilami & Heydari (2024), Large Model Strategic Thinking, Small Model Efficiency: "
    "Transferring Theory of Mind in Large Language Models, arXiv:2408.05241; counts from the "
    "public repository sepehrilami/LFB (MIT licence)"
)
# What the paper prints for the headline numbers (abstract): kept to set beside recomputed values.
PRINTED = {"in_sample": 0.46, "oos_context": 0.18, "oos_game": 0.28}
COUNTS_FILE = Path(__file__).with_name("counts.csv")


def counts() -> pd.DataFrame:
    """The published counts: one row per (split, game, context, model role, action)."""
    return pd.read_csv(COUNTS_FILE, dtype={"action": str})


def records(role: str) -> pd.DataFrame:
    """One record per published answer of `role` ("teacher", "base" or "tuned"), in the record schema."""
    if role not in ROLES:
        raise ValueError(f"reference {NAME}: unknown role {role!r}; expected one of {ROLES}")
    table = counts()
    table = table[table["model"] == role]
    rows = []
    for (split, game, context), group in table.groupby(["split", "game", "context"], sort=False):
        index = 0
        for action, count in zip(group["action"], group["count"]):
            for _ in range(int(count)):
                rows.append({
                    "model": MODELS[role],
                    "role": "teacher" if role == "teacher" else "student",
                    "game": game, "context": context, "split": split,
                    "sample_index": index, "seed": 0, "prompt_version": PROMPT_VERSION,
                    "prompt": "", "completion": "", "action": action, "motivation": "",
                    "action_probs": "", "action_mass": math.nan,
                })
                index += 1
    return pd.DataFrame(rows, columns=list(FEATURES))


def materialise(cache_dir: str | Path) -> dict[str, Path]:
    """Write the three datasets as parquet shards under `cache_dir` (once per counts version).

    Returns {role: directory}. Writes are atomic (temp dir + rename), so concurrent runs are safe.
    """
    digest = hashlib.sha256(COUNTS_FILE.read_bytes()).hexdigest()[:10]
    root = Path(cache_dir) / "reference" / f"{NAME}-{digest}"
    out = {}
    for role in ROLES:
        target = root / role
        if not (target / MANIFEST).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{role}-"))
            frame = records(role)
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, schema=FEATURES.arrow_schema, preserve_index=False)
            pq.write_table(table, tmp / "shard-00000.parquet")
            manifest = {"reference": NAME, "role": role, "model": MODELS[role], "prompt_version": PROMPT_VERSION,
                        "records": len(frame), "source": CITATION}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        out[role] = target
    return out
