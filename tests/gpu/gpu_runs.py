"""What the GPU tests run: train.py / sample.py command lines and reading their outputs.

Kept apart from the tests so that CPU tests (tests/test_gpu_check.py) can compose these exact overrides
with Hydra and catch a typo without a GPU.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEAK_MEM = Path(__file__).resolve().parent / "peak_mem.py"

STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
STEPS = 6                       # optimizer steps of each fit; validation (val/alignment) at 3 and 6
RESUME_STEPS = STEPS + 2        # the ZeRO-3 resume continues to this step
SAMPLE_N = 8                    # generate mode: answers per scenario
SAMPLE_SCENARIOS = ("scenarios.games=[prisoners_dilemma,public_goods]", "scenarios.contexts=[team,party]")
SAMPLE_SCENARIO_COUNT = 2       # what SAMPLE_SCENARIOS selects (as in tests/test_sampling.py)
STEP_TIMEOUT = int(os.environ.get("GPU_CHECK_STEP_TIMEOUT", "240"))  # seconds per train.py / sample.py run


def train_overrides(strategy: str, output: Path | str, teacher: Path | str, max_steps: int = STEPS,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """bf16 fit of the tiny Llama on one GPU with trainer=STRATEGY on the oracle teacher, CSV logs."""
    return [
        "model=tiny_llama", "logger=csv", f"trainer={strategy}", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.precision=bf16-mixed", "trainer.enable_progress_bar=false", f"trainer.max_steps={max_steps}",
        "trainer.val_check_interval=3", "loss=sft_soft", "data.batch_size=8", f"data.teacher={teacher}",
        f"output={output}", *extra,
    ]


def sample_overrides(mode: str, output: Path | str, adapter: Path | str | None = None) -> list[str]:
    """The hf sampler on CUDA: `generate` (SAMPLE_N answers per scenario) or `score` (exact P(action))."""
    return [
        "model=tiny_llama", "sampler=hf", "sampler.device=cuda", f"sampler.mode={mode}", f"sampler.n={SAMPLE_N}",
        "sampler.batch_size=32", "sampler.progress=false", *SAMPLE_SCENARIOS, f"output={output}",
        *([f"adapter={adapter}"] if adapter else []),
    ]


def environment() -> dict:
    """Subprocess environment: offline, DeepSpeed on CUDA with no prebuilt ops, tomdistill from src/."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cuda",
            "DS_BUILD_OPS": "0", "PYTHONUNBUFFERED": "1", "PROJECT_ROOT": str(ROOT), "PYTHONPATH": path}


class RunTimeout(AssertionError):
    """A train.py / sample.py run that outlived STEP_TIMEOUT (a hang: NCCL, a JIT build, a deadlock)."""


def run_script(script: str, args: list[str], timeout: int = STEP_TIMEOUT, log: Path | None = None,
               peak: bool = False) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository root (through peak_mem.py when `peak`); raises with the log's tail
    when it fails. The whole output is written to `log`."""
    command = [sys.executable, *([str(PEAK_MEM)] if peak else []), str(ROOT / script), *args]
    try:
        result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"$ {' '.join(command)}\n(killed after {timeout} s)\n--- stdout\n{_text(err.stdout)}"
                           f"\n--- stderr\n{_text(err.stderr)}")
        raise RunTimeout(f"{script} ran past {timeout} s: {' '.join(args)}\n{_text(err.stderr)[-4000:]}") from err
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(command)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    if result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}: {' '.join(args)}\n--- stdout\n"
                             f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def peak_memory(result: subprocess.CompletedProcess) -> float | None:
    """GiB from peak_mem.py's last line, None if the script never used CUDA."""
    for line in reversed(result.stderr.splitlines()):
        if line.startswith("GPU_PEAK_MEM_GB="):
            value = line.split("=", 1)[1]
            return None if value == "none" else float(value)
    return None


def metric_rows(output: Path) -> list[dict]:
    with open(output / "logs" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def throughput(output: Path) -> dict:
    """tokens/s (median over the logged steps, the first one left out as warm-up when there are more) and peak
    GPU memory (GiB, max over steps) from OUTPUT/logs/metrics.csv; None where not logged."""
    rows = metric_rows(output)
    tokens = [v for _, v in column(rows, "train/tokens_per_s")]
    memory = [v for _, v in column(rows, "train/gpu_mem_gb")]
    return {
        "tokens_per_s": statistics.median(tokens[1:] or tokens) if tokens else None,
        "gpu_mem_gb": max(memory) if memory else None,
    }


def logged_train_steps(output: Path) -> list[int]:
    return sorted({step for step, _ in column(metric_rows(output), "train/loss")})


def adapter_state(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def check_adapter(directory: Path) -> dict:
    """The adapter is there, finite, and trained: some lora_B is non-zero (peft initialises them to zero)."""
    state = adapter_state(directory)
    assert state, f"{directory}: empty adapter"
    assert all(bool(v.float().isfinite().all()) for v in state.values()), f"{directory}: non-finite weights"
    b = {k: float(v.float().abs().sum()) for k, v in state.items() if "lora_B" in k}
    assert b, f"{directory}: no lora_B tensors in {sorted(state)[:4]}..."
    assert any(x > 0 for x in b.values()), f"{directory}: every lora_B is zero (the adapter was not trained)"
    return state


def summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


def finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
