"""Keeping several ranks in step: a failure or a SIGTERM on one rank stops every rank, together.

Data-parallel ranks meet in collectives (gradient all-reduce, ZeRO-3 weight gathers); a rank that
raises alone leaves the others waiting in the next collective until the NCCL/gloo timeout (30 min),
and a process blocked in a collective never runs a Python signal handler, so SIGTERM cannot stop it.
- `agree` is the one collective that decides: each rank brings its failure message (or none) and
  its flags; every rank learns every failure, so all raise at the same point with the same story.
- `callbacks.StepAgreement` runs it before each training step's forward pass: a data error on
  one rank (the training loader hands it over as a batch, `ResumableDataLoader`), and a SIGTERM or
  a pre-emption warning (SIGUSR1/SIGUSR2) received by any rank are decided there. Lightning's own
  SIGTERM handler broadcasts inside the handler, and its SLURM requeue handler saves a checkpoint
  inside its handler (collectives at a random point of the step; Lightning #21406); they are
  replaced by handlers that only set a flag, and the checkpoint-and-stop starts at a step boundary
  on every rank together.
- `restarted`: whether the scheduler restarted this run (it then resumes from its last.ckpt).
- `exit_after_sigterm`: a process still alive `grace_s` after SIGTERM (stuck in a collective) exits
  by itself, taking the ranks it launched with it.
The non-finite loss check (the module's `training_step`) uses `agree` too, before backward.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)


class RankFailedError(RuntimeError, UserError):
    """Another rank failed; this rank stops with it (the message carries the other rank's error)."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree(message: str | None, device: torch.device, flags: int = 0,
          value: torch.Tensor | None = None) -> tuple[dict[int, str], list[bool], torch.Tensor | None]:
    """One all-reduce, on every rank at the same point: who failed (and why), which flags any rank raised,
    and the mean of `value` over the ranks.

    `message`: this rank's failure, or None. `flags`: a bit set (e.g. "SIGTERM received"); the result
    lists each of the lowest 8 bits as set on any rank. The messages are gathered (a second collective,
    on every rank alike) only when some rank failed.
    """
    bits = 8
    if world_size() == 1:  # nothing to agree with: this process's own view
        mean = value.detach().to(torch.float64).cpu() if value is not None and message is None else None
        return ({0: message} if message is not None else {}), [bool((flags >> b) & 1) for b in range(bits)], mean
    world, rank = dist.get_world_size(), dist.get_rank()
    stats = torch.zeros(world + bits + 1, dtype=torch.float64, device=device)
    stats[rank] = 1.0 if message is not None else 0.0
    for bit in range(bits):
        stats[world + bit] = float((flags >> bit) & 1)
    if value is not None and message is None:
        stats[-1] = value.detach().to(torch.float64)
    dist.all_reduce(stats)
    stats = stats.cpu()
    failed = [r for r in range(world) if stats[r] > 0]
    failures: dict[int, str] = {}
    if failed:
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, message)
        failures = {r: messages[r] or "failed" for r in failed}
    raised = [bool(stats[world + bit] > 0) for bit in range(bits)]
    mean = stats[-1] / world if value is not None else None
    return failures, raised, mean


def rank_zero_writes(write, device: torch.device, what: str) -> None:
    """`write()` on global rank 0, then every rank meets in `agree`: if the write failed (a full disk, a
    read-only directory), every rank raises together instead of the others waiting at a barrier for it. One
    process: `write()` alone."""
    rank = dist.get_rank() if world_size() > 1 else 0
    error = None
    if rank == 0:
        try:
            write()
        except OSError as err:
            error = err
    failures, _, _ = agree(None if error is None else f"{what}: {type(error).__name__}: {error}", device)
    if failures:
        raise WriteFailedError(f"rank {rank}: stopping, {describe(failures)}") from error


class WriteFailedError(OSError, UserError):
    """Global rank 0 could not write a file every rank waits for; every rank stops with its message."""


def describe(failures: dict[int, str]) -> str:
    return "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))


SIGTERM_FLAG = 1  # `agree` flag bits: this rank received SIGTERM,
PREEMPT_FLAG = 2  # or a pre-emption warning (SIGUSR1 from `sbatch --signal`, SIGUSR2 from submitit)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def restarted() -> str | None:
    """`NAME=count` when the scheduler restarted this run (a requeued SLURM job, a torchrun restart), else None."""
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return f"{name}={value}"
    return None


def slurm_restarts() -> int:
    """How often SLURM has restarted this job (SLURM_RESTART_COUNT; 0 when unset): the requeue caps read it."""
    value = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue JOB`: the job goes back to the queue and reruns its own command (which then resumes)."""
    import subprocess

    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        log.error("could not requeue SLURM job %s: %s", job_id, err)
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True


def exit_after_sigterm(grace_s: float, on_exit=None) -> threading.Thread:
    """Exit (code 143) `grace_s` seconds after a SIGTERM if the process is still running by then.

    A process blocked in a collective never returns to the interpreter, so no Python signal handler
    runs; the signal module's wakeup fd is written by the C-level handler regardless, and a daemon
    thread waiting on it does the exit. Needs a Python handler installed for SIGTERM (the trainer has
    one) and the main thread (set_wakeup_fd).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_fd, 64):
            pass
        time.sleep(grace_s)
        print(f"error: still running {grace_s:g} s after SIGTERM (stuck, e.g. in a collective with a rank that is "
              "gone); exiting", file=sys.stderr, flush=True)
        try:
            if on_exit is not None:
                on_exit()
        finally:
            os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="exit-after-sigterm", daemon=True)
    thread.start()
    return thread
