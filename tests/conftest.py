"""Shared test set-up: offline, CPU, and the embedded models' configs."""
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
             "WANDB_SILENT": "true", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
             "PROJECT_ROOT": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
# which of them the harness set (not the caller): the GPU check's runs leave those out, as a user's shell has
# none of them (tests/gpu/gpu_runs.py, environment)
_SET_HERE = {n for n in os.environ.get("TOMDISTILL_TEST_DEFAULTS", "").split(",") if n}
_SET_HERE |= {name for name in _DEFAULTS if name not in os.environ}
os.environ["TOMDISTILL_TEST_DEFAULTS"] = ",".join(sorted(_SET_HERE))
for _name, _value in _DEFAULTS.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def catalogue():
    from tomdistill import CATALOGUE_DIR
    from tomdistill.scenarios import load_catalogue

    return load_catalogue(CATALOGUE_DIR)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, catalogue):
    """The oracle teacher's samples (2 answers + exact scores per in-sample scenario), once per test module."""
    from helpers import write_teacher

    return write_teacher(tmp_path_factory.mktemp("teacher"), catalogue, n=2)


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text())


@pytest.fixture(scope="session")
def smollm2_cfg():
    return yaml.safe_load((ROOT / "conf/model/smollm2_135m.yaml").read_text())


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A crashed worker ends the run, naming the test it ran: pytest-xdist 3.8 replaces it under `--dist loadfile`,
    then can wait forever (pytest-xdist#1323, #1327). `--max-worker-restart N` still decides."""
    if getattr(config.option, "maxworkerrestart", "") is None:
        config.option.maxworkerrestart = "0"


def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (the README's test command): one worker per core, at most 4 — most tests are one
    single-threaded subprocess, the multi-rank ones start up to 4 more, each holding a model."""
    return max(1, min(4, len(os.sched_getaffinity(0))))
