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


def oracle_config(n: int = 2, seed: int = 0) -> dict:
    """`data.oracle` as conf/data/default.yaml composes it (conf/sampler/oracle.yaml), with `n` and `seed`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.oracle.sampler.n={n}", f"data.oracle.seed={seed}",
                                          "data.oracle.sampler.progress=false"])
    return OmegaConf.to_container(cfg.data.oracle)


def oracle_records(catalogue, mode: str, n: int = 2, seed: int = 0, splits=("in_sample",)) -> list[dict]:
    """The records `sample.py sampler=oracle role=teacher` writes for `splits` (sampling/runner.py's records of the
    OracleBackend), in plan order, without writing them."""
    from tomdistill.sampling.backends import OracleBackend
    from tomdistill.sampling.oracle_teacher import oracle_settings
    from tomdistill.sampling.runner import elicits_with_answer_prefix, sampled_shards
    from tomdistill.sampling.shards import plan_shards
    from tomdistill.scenarios import prompt_version

    settings = oracle_settings(oracle_config(n, seed), mode)
    plan = plan_shards(catalogue.scenarios(list(splits)), settings.samples_per_scenario, settings.shard_size)
    version = prompt_version(catalogue, None, elicits_with_answer_prefix(settings))
    return [r for _, records, _ in sampled_shards(OracleBackend(settings), settings, plan, version) for r in records]


def write_teacher(directory: Path, catalogue, n: int = 2, seed: int = 0, modes=("generate", "score"),
                  splits=("in_sample",), edit=None) -> Path:
    """A samples directory of the oracle teacher's records (`oracle_records`), one parquet file per mode;
    `edit(records)` may alter them. Both modes in one directory make the single dataset that training and
    evaluation also accept, which has one prompt_version: the score records carry the sampled answers'."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tomdistill.records import FEATURES, RECORD_COLUMNS

    from tomdistill.scenarios import scenario_version

    directory.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        records = oracle_records(catalogue, mode, n, seed, splits)
        if len(modes) > 1:  # the sampled answers' version is the scenario text's alone (no "+answer-prefix")
            records = [{**r, "prompt_version": scenario_version(r["prompt_version"])} for r in records]
        if edit is not None:
            records = edit(records)
        # an empty shard too, as a crashed sampler might leave
        table = pa.Table.from_pylist([{c: r[c] for c in RECORD_COLUMNS} for r in records], schema=FEATURES.arrow_schema)
        pq.write_table(table, directory / f"shard-{mode}.parquet")
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
