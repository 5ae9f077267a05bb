"""Several ranks (CPU, gloo, the tiny Llama): one rank's failure stops every rank within seconds, each naming
the rank that failed; SIGTERM stops every rank at the same step boundary, and a rank stuck in a collective
still exits after SIGTERM. Faults are injected on one rank from outside tomdistill (tests/faults/inject/)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from .common import TINY_TRAIN, entry, finish, start, tail, wait_for, with_fault
from .test_kill_training import checkpoint_step

RANKS3 = [*TINY_TRAIN, "trainer=ddp", "trainer.devices=3", "trainer.max_steps=4", "trainer.val_check_interval=4",
          "data.scenario_batch_size=4"]  # 16 training scenarios: 4 steps per epoch, a third of a batch per rank


def run_with_fault(tmp_path, teacher, fault: str, timeout: int = 180):
    started = time.monotonic()
    result = entry("train.py", [*RANKS3, f"data.teacher={teacher}", f"output={tmp_path / 'run'}"], timeout=timeout,
                   env=with_fault(fault))
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
    handler runs. SIGTERM still ends the run after `callbacks.step_agreement.sigterm_grace_s`, launched ranks included."""
    log = tmp_path / "stuck.log"
    process = start("train.py", [*RANKS3, f"data.teacher={teacher}", f"output={tmp_path / 'run'}",
                                 "callbacks.step_agreement.sigterm_grace_s=3"], log,
                    env=with_fault("hang@1:1"), new_session=True)
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


@pytest.mark.slow
@pytest.mark.extended  # the same flag-then-agree path as the pre-emption test below, which runs by default
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


@pytest.mark.extended  # the 2-rank test below checks each of these on the same path, and the adapter too
@pytest.mark.timeout(420)
def test_a_preemption_warning_saves_at_a_step_boundary_requeues_and_the_requeued_run_resumes(tmp_path, teacher):
    """SLURM's pre-emption warning (SIGUSR1, `sbatch --signal`) on 3 ranks: the handler only sets a flag; every
    rank stops after the same step with `last.ckpt` saved there; rank 0 requeues the job (`scontrol requeue`,
    once); the requeued job, rerunning its command without `ckpt_path`, resumes from that checkpoint."""
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in: records the call (no cluster here)
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{requeued}"\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    output = tmp_path / "run"
    args = [*RANKS3, "trainer.max_steps=400", "trainer.val_check_interval=2", f"data.teacher={teacher}",
            f"output={output}"]
    log = tmp_path / "preempted.log"
    process = start("train.py", args, log, env=env, new_session=True)
    try:
        wait_for(lambda: checkpoint_step(output / "checkpoints/last.ckpt") is not None, process, timeout=150,
                 what="the first checkpoint")
        code = finish(process, signal.SIGUSR1, timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out = tail(process, 30000)
    assert code == 128 + signal.SIGTERM, out
    stops = [line.rsplit("global step", 1)[1].split()[0] for line in out.splitlines()
             if "stopping at the end of global step" in line and "(pre-emption)" in line]
    assert len(stops) == 3 and len(set(stops)) == 1, out  # every rank, at the same step boundary
    saved = checkpoint_step(output / "checkpoints/last.ckpt")
    assert saved == int(stops[0]) + 1, (saved, out)
    assert "SIGTERM: checkpoint saved" in out and "requeued SLURM job 4242" in out, out
    assert requeued.read_text() == "requeue 4242\n"  # by rank 0 only
    assert not (output / "adapter").exists()

    rerun = entry("train.py", [*args, f"trainer.max_steps={saved + 2}"], timeout=240,
                  env={**env, "SLURM_RESTART_COUNT": "1"})  # what SLURM sets in a requeued job
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"SLURM_RESTART_COUNT=1: the scheduler restarted this run; resuming from {output}" in \
        rerun.stdout + rerun.stderr
    import json

    assert json.loads((output / "train_summary.json").read_text())["global_step"] == saved + 2
    from .test_kill_training import losses_by_step

    # went on from the checkpoint, not from step 0 (the logged step can run one ahead: a checkpoint taken at a
    # validation step that ends an epoch resumes through an empty epoch first, a Lightning restore quirk)
    assert len(losses_by_step(output)) == 2 and min(losses_by_step(output)) >= saved


@pytest.mark.timeout(420)
def test_a_requeued_two_rank_run_ends_with_the_uninterrupted_runs_adapter(tmp_path, teacher):
    """The sbatch path end to end on 2 ranks: SLURM's pre-emption warning (SIGUSR1, `sbatch --signal`) only sets a
    flag; every rank stops after the same step with `last.ckpt` saved there; rank 0 requeues the job (`scontrol
    requeue`, once); the same command again (as SLURM reruns it, without `ckpt_path`) resumes from that checkpoint,
    and the adapter equals an uninterrupted run's. A constant learning rate keeps the schedule independent of
    `max_steps`, so the interrupted run may be started long and given its end on the rerun."""
    from .test_kill_training import adapter

    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{requeued}"\n')  # a stand-in: records the call
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    common = [*TINY_TRAIN, "trainer=ddp", "trainer.devices=2", "trainer.val_check_interval=2",
              "optim.scheduler=constant", "optim.warmup_ratio=0", f"data.teacher={teacher}"]
    interrupted = tmp_path / "interrupted"
    process = start("train.py", [*common, "trainer.max_steps=400", f"output={interrupted}"], tmp_path / "a.log",
                    env=env, new_session=True)
    try:
        wait_for(lambda: checkpoint_step(interrupted / "checkpoints/last.ckpt") is not None, process, timeout=150,
                 what="the first checkpoint")
        code = finish(process, signal.SIGUSR1, timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out = tail(process, 30000)
    assert code == 128 + signal.SIGTERM, out
    stops = [line.rsplit("global step", 1)[1].split()[0] for line in out.splitlines()
             if "stopping at the end of global step" in line and "(pre-emption)" in line]
    assert len(stops) == 2 and len(set(stops)) == 1, out  # every rank, at the same step boundary
    saved = checkpoint_step(interrupted / "checkpoints/last.ckpt")
    assert saved == int(stops[0]) + 1, (saved, out)
    assert "SIGTERM: checkpoint saved" in out and "requeued SLURM job 77" in out, out
    assert requeued.read_text() == "requeue 77\n"  # by rank 0 only
    assert not (interrupted / "adapter").exists()
    end = saved + 2
    rerun = entry("train.py", [*common, f"trainer.max_steps={end}", f"output={interrupted}"], timeout=180,
                  env={**env, "SLURM_RESTART_COUNT": "1"})  # what SLURM sets in a requeued job
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"SLURM_RESTART_COUNT=1: the scheduler restarted this run; resuming from {interrupted}" in \
        rerun.stdout + rerun.stderr
    import csv

    with open(interrupted / "logs" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert sorted(steps) == list(range(end)), steps  # the whole curve, each step once: resumed, not from step 0
    straight = tmp_path / "straight"
    result = entry("train.py", [*common, f"trainer.max_steps={end}", f"output={straight}"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference = adapter(interrupted), adapter(straight)
    assert resumed.keys() == reference.keys()
    # full-batch soft loss: the resumed epoch may order the batch differently (a float summation order), no more
    worst = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-4, worst
    assert any(float(v.abs().sum()) > 0 for k, v in resumed.items() if "lora_B" in k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], log_dir, timeout: int = 400) -> list[int]:
    """`torchrun --nnodes 2 --nproc_per_node 2` twice on this machine (node ranks 0 and 1, rendezvous on
    localhost), as two nodes of a cluster would run it; returns both exit codes."""
    import sys

    port = _free_port()
    processes = []
    for node in (0, 1):
        command = (f"-m torch.distributed.run --nnodes 2 --nproc_per_node 2 --node_rank {node} "
                   f"--master_addr 127.0.0.1 --master_port {port} train.py")
        processes.append(start(command, [*args, "trainer.devices=2", "trainer.num_nodes=2"],
                               log_dir / f"node{node}.log", new_session=True))
    codes = []
    try:
        for process in processes:
            codes.append(finish(process, timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return codes


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_on_two_nodes_trains_and_resumes_like_one_process(tmp_path, teacher):
    """2 nodes × 2 ranks under torchrun (static rendezvous on localhost): 2 steps, then `ckpt_path=last` to step 4;
    the soft loss's global batch split over 4 ranks gives one process's adapter after the same two legs (1e-4)."""
    from safetensors.torch import load_file
    import torch

    base = [*TINY_TRAIN, "trainer=ddp", "trainer.val_check_interval=2", f"data.teacher={teacher}"]
    alone = tmp_path / "alone"  # one process, the same two legs (the LR schedule of a leg spans its max_steps)
    for leg in (["trainer.max_steps=2"], ["trainer.max_steps=4", "ckpt_path=last"]):
        result = entry("train.py", [*base, "trainer.devices=1", f"output={alone}", *leg], timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "nodes"
    codes = torchrun_two_nodes([*base, "trainer.max_steps=2", f"output={output}"], tmp_path)
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert checkpoint_step(output / "checkpoints/last.ckpt") == 2
    codes = torchrun_two_nodes([*base, "trainer.max_steps=4", f"output={output}", "ckpt_path=last"], tmp_path)
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    import json

    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 4
    nodes = load_file(str(output / "adapter/adapter_model.safetensors"))
    one = load_file(str(alone / "adapter/adapter_model.safetensors"))
    assert nodes.keys() == one.keys() and nodes
    for key in one:
        torch.testing.assert_close(nodes[key], one[key], atol=1e-4, rtol=0)


def test_no_module_of_tomdistill_knows_the_fault_injection():
    """The faults are installed from outside (tests/faults/inject/): production code carries no test hook."""
    from .common import ROOT

    sources = sorted((ROOT / "src" / "tomdistill").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text()
        assert "TEST_FAULT" not in text and "testing_faults" not in text and "faults.inject" not in text, path
