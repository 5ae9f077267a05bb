"""Shared by the fault tests: real entry-point subprocesses, polling for files, killing on cue."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
       "CUDA_VISIBLE_DEVICES": "", "PROJECT_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
# test-only fault injection (tests/faults/inject/sitecustomize.py), installed in every process of a run by its
# environment: `entry(..., env=with_fault("nan@1:1"))`
INJECT = Path(__file__).resolve().parent / "inject"


def with_fault(fault: str) -> dict:
    """The environment that makes the run's processes inject `fault` (KIND@RANK:STEP)."""
    return {"TOMDISTILL_TEST_FAULT": fault, "PYTHONPATH": f"{INJECT}{os.pathsep}{ROOT / 'src'}"}


# a tiny oracle teacher, the tiny Llama student, CSV logs, no progress bars
TINY_TRAIN = ["model=tiny_llama", "logger=csv", "trainer.enable_progress_bar=false"]
TWO_BY_TWO = ["scenarios.games=[prisoners_dilemma,stag_hunt]", "scenarios.contexts=[team,business]",
              "scenarios.splits=[in_sample]"]


def entry(script: str, args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as a user runs it (SCRIPT: sample.py, train.py, evaluate.py or `-m module`)."""
    command = [sys.executable, *script.split(), *args]
    return subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def start(script: str, args: list[str], log: Path, env: dict | None = None,
          new_session: bool = False) -> subprocess.Popen:
    """Start an entry point in the background, stdout+stderr into `log` (`new_session`: its own process
    group, so a kill can take its children with it, as a node failure would)."""
    handle = open(log, "w")
    process = subprocess.Popen([sys.executable, *script.split(), *args], cwd=ROOT, env={**ENV, **(env or {})},
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=new_session)
    process.log_handle = handle  # closed by finish()
    return process


def wait_for(condition: Callable[[], bool], process: subprocess.Popen | None = None, timeout: float = 240,
             interval: float = 0.02, what: str = "condition") -> None:
    """Poll `condition` until true; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) before {what}:\n{tail(process)}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finish(process: subprocess.Popen, sig: int | None = None, timeout: float = 120) -> int:
    """Send `sig` (if given), wait for the exit, return the exit code."""
    if sig is not None and process.poll() is None:
        process.send_signal(sig)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        raise
    finally:
        process.log_handle.close()
    return code


def tail(process: subprocess.Popen, chars: int = 4000) -> str:
    if not process.log_handle.closed:
        process.log_handle.flush()
    return Path(process.log_handle.name).read_text()[-chars:]


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, describe(result)
    return result


def files_under(directory: Path) -> set[str]:
    """Every file below `directory`, relative (hidden ones included)."""
    return {str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file()}
