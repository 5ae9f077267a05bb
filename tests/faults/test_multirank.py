"""Several ranks (CPU, gloo, the tiny Llama): one rank's failure stops every rank within seconds, each naming
the rank that failed; SIGTERM stops every rank at the same step boundary, and a rank stuck in a collective
still exits after SIGTERM. Faults are injected on one rank through `TOMDISTILL_TEST_FAULT` (test-only, see
src/tomdistill/testing_faults.py)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from .common import TINY_TRAIN, entry, finish, start, tail, wait_for
from .test_kill_training import checkpoint_step

RANKS3 = [*TINY_TRAIN, "trainer=ddp", "trainer.devices=3", "trainer.max_steps=4", "trainer.val_check_interval=4",
          "data.scenario_batch_size=4"]  # 16 training scenarios: 4 steps per epoch, a third of a batch per rank


def run_with_fault(tmp_path, teacher, fault: str, timeout: int = 180):
    started = time.monotonic()
    result = entry("train.py", [*RANKS3, f"data.teacher={teacher}", f"output={tmp_path / 'run'}"], timeout=timeout,
                   env={"TOMDISTILL_TEST_FAULT": fault})
    return result, time.monotonic() - started


@pytest.mark.timeout(240)
def test_a_nan_loss_on_one_rank_stops_every_rank_naming_it(tmp_path, teacher):
    result, seconds = run_with_fault(tmp_path, teacher, "nan@1:1")
    assert result.returncode != 0, result.stderr[-3000:]
    err = result.stderr
    assert "non-finite training loss (nan) on rank 1 of 3 at global step 1" in err, err[-3000:]
    for rank in (0, 2):  # the others stop with it, at the same step, and say why
        assert f"stopping rank {rank} with the others: rank 1: non-finite training loss" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "run/adapter").exists()
    assert seconds < 120  # not the 30-minute collective timeout


@pytest.mark.timeout(240)
def test_a_data_error_on_one_rank_stops_every_rank_naming_it(tmp_path, teacher):
    result, seconds = run_with_fault(tmp_path, teacher, "data@2:1")
    assert result.returncode != 0, result.stderr[-3000:]
    err = result.stderr
    assert "error: test fault: batch 1 of rank 2 cannot be read" in err, err[-3000:]
    for rank in (0, 1):
        assert (f"stopping rank {rank} of 3 at global step 1: another rank could not load its training batch "
                "(rank 2: DataError: test fault") in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert seconds < 120


@pytest.mark.timeout(240)
def test_sigterm_to_a_run_stuck_in_a_collective_still_ends_it(tmp_path, teacher):
    """Rank 1 never delivers its batch: ranks 0 and 2 block in the step's collective, where no Python signal
    handler runs. SIGTERM still ends the run after `callbacks.sigterm_grace_s`, launched ranks included."""
    log = tmp_path / "stuck.log"
    process = start("train.py", [*RANKS3, f"data.teacher={teacher}", f"output={tmp_path / 'run'}",
                                 "callbacks.sigterm_grace_s=3"], log,
                    env={"TOMDISTILL_TEST_FAULT": "hang@1:1"}, new_session=True)
    try:
        wait_for(lambda: "test fault: rank 1 hangs" in log.read_text(), process, timeout=150, what="the stuck rank")
        time.sleep(3)  # the others are in the step's collective by now
        assert process.poll() is None, tail(process)
        sent = time.monotonic()
        code = finish(process, signal.SIGTERM, timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out = tail(process, 20000)
    assert code == 128 + signal.SIGTERM, out
    assert "still running 3 s after SIGTERM" in out, out
    assert seconds < 30, seconds
    wait_for(lambda: not group_alive(process.pid), timeout=15, what="the launched ranks to be gone")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
def test_sigterm_stops_every_rank_at_one_step_boundary_with_a_checkpoint(tmp_path, teacher):
    """SIGTERM to rank 0 (Lightning forwards it to the ranks it launched): every rank stops after the same step,
    `last.ckpt` is saved there, the exit code is 143, and `ckpt_path=last` finishes the run."""
    output = tmp_path / "run"
    args = [*RANKS3, "trainer.max_steps=400", "trainer.val_check_interval=2", f"data.teacher={teacher}",
            f"output={output}"]
    log = tmp_path / "term.log"
    process = start("train.py", args, log, new_session=True)
    try:
        wait_for(lambda: checkpoint_step(output / "checkpoints/last.ckpt") is not None, process, timeout=150,
                 what="the first checkpoint")
        code = finish(process, signal.SIGTERM, timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out = tail(process, 30000)
    assert code == 128 + signal.SIGTERM, out
    assert "SIGTERM: checkpoint saved" in out, out
    assert out.count("stopping at the end of global step") == 3, out  # every rank, the same step
    steps = {line.rsplit("global step", 1)[1].split()[0] for line in out.splitlines()
             if "stopping at the end of global step" in line}
    assert len(steps) == 1, out
    assert not (output / "adapter").exists()
    saved = checkpoint_step(output / "checkpoints/last.ckpt")
    assert saved is not None and 0 < saved < 400 and f"global step {saved - 1} (SIGTERM)" in out, (saved, out)
    resumed = entry("train.py", [*args, "ckpt_path=last", "trainer.max_steps=" + str(saved + 2)], timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
