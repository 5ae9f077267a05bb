"""Test helpers: oracle teacher datasets in the record schema, and running train.py."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama", "logger=csv"]


def write_teacher(directory: Path, catalogue, n: int = 2, seed: int = 0, modes=("generate", "score"),
                  splits=("in_sample",), edit=None) -> Path:
    """A samples directory (parquet shards + manifest) of the oracle teacher; `edit(records)` may alter them."""
    from tomdistill.data.oracle_teacher import oracle_records, write_records

    directory.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        records = oracle_records(catalogue, n, seed, mode, splits=list(splits))
        if edit is not None:
            records = edit(records)
        if records:
            write_records(records, directory / f"shard-{mode}.parquet")
        else:  # an empty shard, as a crashed sampler might leave
            import pyarrow.parquet as pq
            from tomdistill.records import FEATURES

            pq.write_table(FEATURES.arrow_schema.empty_table(), directory / f"shard-{mode}.parquet")
    (directory / "manifest.json").write_text(json.dumps({"modes": list(modes), "n": n}))
    return directory


def run_train(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess (as a user runs it). On `timeout` the whole process group is
    killed (the ranks Lightning started too, so a hung multi-rank run cannot outlive the test) and
    `subprocess.TimeoutExpired` is raised."""
    import signal

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                   "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, str(ROOT / "train.py"), *args]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # ranks left behind by a rank 0 that exited early
        os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f"train.py exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())
