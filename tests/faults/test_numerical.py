"""Numerical faults: a non-finite loss, or a loss that explodes under a too-high learning rate, stops
training with one line naming the step and batch, and no adapter is exported."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import write_teacher

from .common import ENV, ROOT, TINY_TRAIN, describe, files_under

# no validation, no warm-up: the learning rate acts from the first step
BASE = [*TINY_TRAIN, "loss=sft", "data.batch_size=4", "trainer.max_steps=8", "data.num_val_contexts=0",
        "optim.warmup_ratio=0"]
RUNS = {
    # lr 1e30: the adapter's first update overflows, the next loss is NaN
    "nan": ["optim.lr=1e30", "callbacks.divergence.factor=0"],
    # lr 30 on an output-layer adapter: the loss goes 10.8 -> ~1e2 -> ~4e5 (finite, exploding)
    "diverging": ["optim.lr=30", "model.lora.target_modules=[lm_head]"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, catalogue):
    """Both runs side by side (two processes), as `python train.py ...`."""
    root = tmp_path_factory.mktemp("numerical")
    teacher = write_teacher(root / "teacher", catalogue, n=2)
    processes = {}
    for name, extra in RUNS.items():
        command = [sys.executable, "train.py", *BASE, *extra, f"data.teacher={teacher}", f"output={root / name}"]
        processes[name] = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), root / name)
    return results


def assert_stopped_without_adapter(result, output) -> None:
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    written = files_under(output)
    assert not any(f.startswith("adapter") for f in written), written  # no NaN / exploded adapter exported
    assert "train_summary.json" not in written


def test_nan_loss_stops_training_naming_step_and_batch(runs):
    result, output = runs["nan"]
    assert_stopped_without_adapter(result, output)
    assert "error: non-finite training loss (nan) at global step 1, batch 1 (scenario indices [" in result.stderr, \
        describe(result)


def test_exploding_loss_from_a_too_high_learning_rate_is_detected(runs):
    result, output = runs["diverging"]
    assert_stopped_without_adapter(result, output)
    assert "error: training diverged: loss" in result.stderr and "at global step 3, batch 2" in result.stderr, \
        describe(result)
    # the scheduled learning rate at that step (cosine from 30)
    assert "callbacks.divergence.factor=10" in result.stderr and "lower optim.lr (now 2" in result.stderr


def test_divergence_detector_bad_setting_is_a_config_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", *BASE, "callbacks.divergence.factor=0.5",
                             f"output={tmp_path / 'run'}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "callbacks.divergence: factor must be > 1" in result.stderr, describe(result)
