"""Nothing lost, nothing stale (training): sweeps, resumes and reruns never overwrite or delete a user's results,
and a bad input stops with one line before anything a previous run wrote is touched."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from .common import TINY_TRAIN, describe, entry, files_under, ok

ARGS = [*TINY_TRAIN, "loss=sft_soft", "data.batch_size=4", "trainer.val_check_interval=1"]


def assert_one_line(result, *fragments: str) -> str:
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in files_under(directory) if not name.startswith(".hydra")
            and name != "train.log"}


def train_losses(output: Path) -> list[tuple[int, float]]:
    with open(output / "logs" / "metrics.csv") as handle:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, teacher):
    """A finished 2-step run (checkpoints, adapter, metrics)."""
    output = tmp_path_factory.mktemp("two") / "run"
    ok(entry("train.py", [*ARGS, "trainer.max_steps=2", f"data.teacher={teacher}", f"output={output}"]))
    return output


# 1. a multirun with output= gives each trial its own directory ----------------------------------------------------
def test_each_trial_of_a_multirun_with_output_writes_its_own_directory(tmp_path, teacher):
    output = tmp_path / "sweep"
    result = ok(entry("train.py", ["-m", *ARGS, "trainer.max_steps=1", "optim.lr=1e-4,2e-4", f"data.teacher={teacher}",
                                   f"output={output}", f"hydra.sweep.dir={tmp_path / 'hydra'}"]))
    for trial, lr in ((0, 1e-4), (1, 2e-4)):
        config = (output / str(trial) / "config.yaml").read_text()
        assert f"lr: {lr}" in config, config
        assert (output / str(trial) / "adapter" / "adapter_model.safetensors").exists(), describe(result)
    assert not (output / "adapter").exists()


# 2. resuming continues the training curve -------------------------------------------------------------------------
def test_a_resumed_run_continues_its_metrics_file(tmp_path, teacher, two_steps):
    output = tmp_path / "run"
    shutil.copytree(two_steps, output)
    before = train_losses(output)
    assert [step for step, _ in before] == [0, 1]
    ok(entry("train.py", [*ARGS, "trainer.max_steps=3", f"data.teacher={teacher}", f"output={output}",
                          "ckpt_path=last"]))
    after = train_losses(output)
    assert [step for step, _ in after] == [0, 1, 2]
    assert after[:2] == before  # the first run's rows, as they were


def test_rows_logged_after_the_resumed_checkpoint_move_aside_not_away(tmp_path):
    from tomdistill.loggers import SUPERSEDED, ContinuingWriter

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text("step,train/loss\n0,3.0\n1,2.0\n2,1.5\n")  # killed after step 2, saved at 2
    ContinuingWriter(str(logs), resume_step=2)
    assert (logs / "metrics.csv").read_text().splitlines() == ["step,train/loss", "0,3.0", "1,2.0"]
    assert (logs / SUPERSEDED).read_text().splitlines() == ["step,train/loss", "2,1.5"]


# 3. a corrupt checkpoint: one line naming it, nothing rewritten -----------------------------------------------------
def test_a_truncated_last_ckpt_is_named_in_one_line_and_the_run_is_left_as_it_was(tmp_path, teacher, two_steps):
    output = tmp_path / "run"
    shutil.copytree(two_steps, output)
    last = output / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = contents(output)
    result = entry("train.py", [*ARGS, "trainer.max_steps=3", f"data.teacher={teacher}", f"output={output}",
                                "ckpt_path=last"])
    assert_one_line(result, str(last), "cannot be read", "ckpt_path=")
    assert contents(output) == before  # metrics.csv and config.yaml untouched


# 5. a sweep never records an objective it did not measure ----------------------------------------------------------
def test_a_sweep_whose_validation_never_runs_is_refused_up_front(tmp_path, teacher):
    result = entry("train.py", ["-m", *TINY_TRAIN, "trainer.max_steps=1", "trainer.val_check_interval=5",
                                "optim.lr=1e-4,2e-4", f"data.teacher={teacher}", f"hydra.sweep.dir={tmp_path / 'h'}"])
    assert result.returncode != 0, describe(result)
    assert "trainer.val_check_interval=5 with trainer.max_steps=1: validation never runs" in result.stderr
    assert not (tmp_path / "h" / "trials.csv").exists()


def test_the_progress_bar_of_a_run_bounded_by_steps_names_no_negative_epoch():
    from tomdistill.callbacks import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=20)
    assert bar._get_train_description(1).strip() == "Epoch 1 (max_steps 20)"


# 6. rerunning a command over its own output --------------------------------------------------------------------------
def test_a_fresh_run_into_a_directory_holding_a_run_is_refused_and_the_run_kept(tmp_path, teacher, two_steps):
    output = tmp_path / "run"
    shutil.copytree(two_steps, output)
    before = contents(output)
    result = entry("train.py", [*ARGS, "trainer.max_steps=3", f"data.teacher={teacher}", f"output={output}"])
    assert_one_line(result, f"output={output} holds a training run", "ckpt_path=last")
    assert contents(output) == before


# 7. one line, and no half-made output directory -------------------------------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    ("trainer.max_steps=-5", "trainer.max_steps=-5: expected a whole number ≥ 1"),
    ("trainer.devices=0", "trainer.devices=0: expected a count ≥ 1"),
])
def test_a_bad_step_or_device_count_is_one_line_and_leaves_no_output(tmp_path, teacher, override, fragment):
    output = tmp_path / "run"
    result = entry("train.py", [*ARGS, override, f"data.teacher={teacher}", f"output={output}"])
    assert_one_line(result, fragment)
    assert not output.exists()


def test_a_run_refused_after_the_config_checks_leaves_no_output(tmp_path):
    output = tmp_path / "run"
    result = entry("train.py", [*ARGS, f"data.teacher={tmp_path / 'missing'}", f"output={output}"])
    assert_one_line(result, str(tmp_path / "missing"))
    assert not output.exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_its_rows_moved_aside(tmp_path, teacher, two_steps):
    output = tmp_path / "run"
    (output / "logs").mkdir(parents=True)
    shutil.copy(two_steps / "logs" / "metrics.csv", output / "logs" / "metrics.csv")  # metrics, no checkpoint
    earlier = (output / "logs" / "metrics.csv").read_text()
    ok(entry("train.py", [*ARGS, "trainer.max_steps=1", f"data.teacher={teacher}", f"output={output}"]))
    assert [step for step, _ in train_losses(output)] == [0]
    assert (output / "logs" / "metrics_superseded.csv").read_text().splitlines()[1:] == earlier.splitlines()[1:]
