"""The submitit path of a pre-emption on 2 ranks, end to end through submitit's own code.

`python train.py -m hydra/launcher=slurm ...` submits the job with hydra-submitit-launcher and submitit's SLURM
executor. The stand-ins in tests/fake_slurm_run/ run it on this machine as SLURM would on one node: `sbatch`
runs the batch script submitit wrote, `srun` starts its two tasks (`python -m submitit.core._submit`, with
SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, so Lightning's SLURMEnvironment wires the ranks over gloo),
`scancel --signal=USR2` delivers submitit's pre-emption signal to every task as `#SBATCH --signal=USR2@120`
does, `scontrol requeue` reruns the batch script with SLURM_RESTART_COUNT=1, and `sacct` reports the job's state
to submitit's watcher. Nothing of submitit is replaced: its USR2 handler, `BaseSubmititLauncher.checkpoint`, the
pickled resubmission and `SlurmJobEnvironment._requeue` are the real ones.

What stays unproven: a real SLURM cluster (slurmctld, several nodes, the time-limit timer itself).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from .common import ROOT, TINY_TRAIN, finish, start, tail, wait_for
from .test_kill_training import adapter, checkpoint_step, losses_by_step

FAKE_SLURM = ROOT / "tests" / "fake_slurm_run"
STEPS = 40  # ~0.2 s a step here: the pre-emption lands early, with most of the run still to go after it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm(cluster: Path) -> dict:
    """The environment that puts the stand-ins first on PATH, keeping their state in `cluster`."""
    return {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(cluster)}


def submit(args: list[str], sweep: Path, cluster: Path, log: Path):
    """`train.py -m hydra/launcher=slurm ARGS`: the driver waits for the job's results, as on a login node.
    The job inherits its environment (sbatch's default) with a free rendezvous port for the ranks."""
    return start("train.py", ["-m", "hydra/launcher=slurm", *args, f"hydra.sweep.dir={sweep}"], log,
                 env={**fake_slurm(cluster), "MASTER_PORT": str(free_port())}, new_session=True)


def kill_group(process) -> None:
    """The driver's process group: the fake SLURM's job runner, srun and the ranks are in it too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def runs_of(log: str) -> list[str]:
    """A task's log cut at each start of the job: SLURM appends every run of a requeued job to the same file."""
    return re.split(r"^(?=submitit INFO .* - Starting with JobEnvironment)", log, flags=re.MULTILINE)[1:]


def job_ended(cluster: Path, job: str) -> bool:
    """The fake SLURM has seen the job's last run end (the driver returns on the results, a little earlier)."""
    state = cluster / f"{job}.state"
    return state.exists() and state.read_text().strip() in ("COMPLETED", "FAILED")


def job_logs(sweep: Path, chars: int = 3000) -> str:
    """The end of each task log of the sweep's jobs, for failure messages."""
    return "".join(f"\n--- {path.name}\n{path.read_text()[-chars:]}"
                   for path in sorted(sweep.glob(".submitit/*/*_log.*")))


@pytest.mark.timeout(420)
def test_a_submitit_job_preempted_on_two_ranks_is_requeued_by_submitit_and_ends_with_the_uninterrupted_adapter(
        tmp_path, teacher):
    """SIGUSR2 to both tasks mid-training: every rank stops at one step boundary with last.ckpt saved there;
    then, on global rank 0 only, submitit's deferred handler calls the launcher's `checkpoint()`, pickles the
    resubmission and runs `scontrol requeue`. The job's rerun (submitit loading that pickle again, with
    SLURM_RESTART_COUNT=1) resumes from last.ckpt, trains the same losses as an uninterrupted job of the same
    config from that step on, and ends with its adapter within 1e-4 (measured: ~2e-7; not bit-identical because
    the restored full-batch epoch may sum the batch in another order). One step more or less moves the LoRA
    weights by about the learning rate (2e-3), far beyond that tolerance."""
    cluster = tmp_path / "cluster"
    common = [*TINY_TRAIN, "trainer=ddp", "trainer.devices=2", "trainer.val_check_interval=2",
              f"trainer.max_steps={STEPS}", "optim.scheduler=constant", "optim.warmup_ratio=0",
              f"data.teacher={teacher}"]

    # 1. pre-empted: submitted, SIGUSR2 to every task once the first checkpoint is there
    sweep = tmp_path / "preempted"
    output = sweep / "0"  # output=null: the job's directory in the sweep, the same on the rerun
    driver = submit(common, sweep, cluster, tmp_path / "preempted.log")
    try:
        wait_for(lambda: checkpoint_step(output / "checkpoints/last.ckpt") is not None, driver, timeout=240,
                 what="the first checkpoint")
        scripts = sorted(cluster.glob("*.sbatch"))
        assert len(scripts) == 1, scripts
        job = scripts[0].stem
        submitted = sweep / ".submitit" / job / f"{job}_submitted.pkl"
        first_pickle = submitted.stat().st_ino
        subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **fake_slurm(cluster)}, check=True)
        code = finish(driver, timeout=300)  # the driver returns once the requeued job has its results
        if code == 0:
            wait_for(lambda: job_ended(cluster, job), timeout=60, what=f"job {job} to end")
    finally:
        kill_group(driver)
    assert code == 0, tail(driver, 3000) + job_logs(sweep)

    # the scheduler's view: two runs of the job, one requeue, asked by one rank
    slurmd = (cluster / f"{job}.slurmd.log").read_text()
    assert f"run 0 of job {job} exited" in slurmd and f"run 0 of job {job} exited 0" not in slurmd, slurmd
    assert f"run 1 of job {job} exited 0" in slurmd and "run 2" not in slurmd, slurmd
    assert (cluster / "scontrol.log").read_text() == f"requeue {job}\n"
    assert submitted.stat().st_ino != first_pickle, "submitit did not pickle a resubmission"  # (its checkpoint())

    logs = [runs_of((sweep / ".submitit" / job / f"{job}_{rank}_log.out").read_text()) for rank in (0, 1)]
    assert [len(runs) for runs in logs] == [2, 2], job_logs(sweep)
    (rank0_first, rank0_rerun), (rank1_first, rank1_rerun) = logs
    # first run: every rank stops after the same step, last.ckpt saved there
    stops = [line.rsplit("global step", 1)[1].split()[0] for leg in (rank0_first, rank1_first)
             for line in leg.splitlines() if "stopping at the end of global step" in line and "(pre-emption)" in line]
    assert len(stops) == 2 and len(set(stops)) == 1, job_logs(sweep)
    saved = int(stops[0]) + 1
    assert 0 < saved < STEPS - 4, saved  # mid-training, with steps left for the rerun
    for rank, leg in ((0, rank0_first), (1, rank1_first)):
        assert f"rank {rank}: SIGUSR2 received (pre-emption)" in leg, leg
        assert f"pre-empted at global step {saved}, last.ckpt saved" in leg, leg
    # rank 0: submitit's handler ran after our checkpoint, not in the signal: checkpoint() and the requeue
    checkpointed = rank0_first.index(f"SIGTERM: checkpoint saved to {output / 'checkpoints/last.ckpt'} "
                                     f"at global step {saved}")
    assert checkpointed < rank0_first.index("Calling checkpoint method.") < \
        rank0_first.index(f"Requeued job {job}"), rank0_first
    assert "Calling checkpoint method." not in rank1_first and "Requeued job" not in rank1_first, rank1_first
    # the rerun: both ranks resume from that checkpoint and finish
    for leg in (rank0_rerun, rank1_rerun):
        assert (f"SLURM_RESTART_COUNT=1: the scheduler restarted this run; resuming from "
                f"{output / 'checkpoints/last.ckpt'}") in leg, leg
        assert "Job completed successfully" in leg, leg
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == STEPS

    # 2. the same job, never interrupted
    reference_sweep = tmp_path / "uninterrupted"
    reference_job = str(int(job) + 1)
    driver = submit(common, reference_sweep, cluster, tmp_path / "uninterrupted.log")
    try:
        code = finish(driver, timeout=240)
        if code == 0:
            wait_for(lambda: job_ended(cluster, reference_job), timeout=60, what=f"job {reference_job} to end")
    finally:
        kill_group(driver)
    assert code == 0, tail(driver, 3000) + job_logs(reference_sweep)
    assert (cluster / f"{reference_job}.slurmd.log").read_text() == f"run 0 of job {reference_job} exited 0\n"
    assert (cluster / "scontrol.log").read_text() == f"requeue {job}\n"  # no requeue this time
    reference = reference_sweep / "0"

    # the rerun trained from the checkpoint on, with the uninterrupted run's losses (data order, optimizer state);
    # metrics.csv holds the whole curve, the interrupted leg's steps before the checkpoint included
    resumed_losses = [loss for _, loss in sorted(losses_by_step(output).items())]
    reference_losses = [loss for _, loss in sorted(losses_by_step(reference).items())]
    assert len(reference_losses) == STEPS and sorted(losses_by_step(output)) == list(range(STEPS))
    assert resumed_losses == pytest.approx(reference_losses, rel=1e-4, abs=1e-6)
    resumed, uninterrupted = adapter(output), adapter(reference)
    assert resumed.keys() == uninterrupted.keys() and resumed
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-4, rtol=0)
    assert any(float(v.abs().sum()) > 0 for k, v in resumed.items() if "lora_B" in k)  # it did train
