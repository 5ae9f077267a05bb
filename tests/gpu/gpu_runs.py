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
TRAIN_PROBE = Path(__file__).resolve().parent / "train_probe.py"

STEPS = 6                       # optimizer steps of each fit; validation (val/alignment) at 3 and 6
RESUME_STEPS = STEPS + 2        # the ZeRO-3 resume continues to this step
ACCUMULATE = 2                  # accumulate_grad_batches of the ZeRO fits (gradient checkpointing on too)
NATIVE_TRANSFORMERS = "5.21"    # from here on transformers projects a boolean logits_to_keep (lora_module.py)
SAMPLE_N = 8                    # generate mode: answers per scenario
SAMPLE_SCENARIOS = ("scenarios.games=[prisoners_dilemma,public_goods]", "scenarios.contexts=[team,party]")
SAMPLE_SCENARIO_COUNT = 2       # what SAMPLE_SCENARIOS selects (as in tests/test_sampling.py)
STEP_TIMEOUT = int(os.environ.get("GPU_CHECK_STEP_TIMEOUT", "240"))  # seconds per train.py / sample.py run

# The fits, as a user types them on one GPU: accelerator and precision are the trainer configs' own (auto: gpu,
# bf16-mixed on a GPU that has it); ddp needs devices=1 (conf/trainer/ddp.yaml asks for 2). The ZeRO fits also
# checkpoint activations and accumulate gradients (the options conf/experiment/paper.yaml trains with); ZeRO-3
# runs with stage3_param_persistence_threshold 0 (zero3_config), so every parameter, the LoRA ones too, is
# partitioned and gathered on use. `ddp_transformers_overlay` is the ddp fit again on the carried transformers
# >= 5.21 (the `overlay` in scripts/gpu_wheels.txt, GPU_CHECK_OVERLAY): the boolean logits_to_keep path.
MEMORY_OPTIONS = ("model.gradient_checkpointing=true", f"trainer.accumulate_grad_batches={ACCUMULATE}",
                  f"trainer.val_check_interval={3 * ACCUMULATE}")
DDP = ("trainer=ddp", "trainer.devices=1", "trainer.val_check_interval=3")
FITS = {
    "ddp": DDP,
    "deepspeed_zero2": ("trainer=deepspeed_zero2", *MEMORY_OPTIONS),
    "deepspeed_zero3": ("trainer=deepspeed_zero3", *MEMORY_OPTIONS),  # + the config of zero3_config
    "ddp_transformers_overlay": DDP,
}
OVERLAY_FITS = ("ddp_transformers_overlay",)


def zero3_config(directory: Path | str) -> Path:
    """conf/deepspeed/zero3.json with stage3_param_persistence_threshold 0, written into DIRECTORY: with the
    shipped 100000 the tiny Llama's LoRA tensors (and all but its embedding) stay whole on every rank."""
    config = json.loads((ROOT / "conf" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = Path(directory) / "zero3_partition_all.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def train_overrides(fit: str, output: Path | str, teacher: Path | str, max_steps: int = STEPS,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The fit FIT (see FITS) of the tiny Llama on the oracle teacher, CSV logs. ZeRO-3's DeepSpeed config is
    written beside OUTPUT."""
    options = list(FITS[fit])
    if fit == "deepspeed_zero3":
        options.append(f"trainer.strategy.config={zero3_config(Path(output).parent)}")
    return [
        "model=tiny_llama", "logger=csv", *options, "trainer.enable_progress_bar=false",
        f"trainer.max_steps={max_steps}", "loss=sft_soft", "data.batch_size=8", f"data.teacher={teacher}",
        f"output={output}", *extra,
    ]


def sample_overrides(mode: str, output: Path | str, adapter: Path | str | None = None) -> list[str]:
    """The hf sampler on CUDA: `generate` (SAMPLE_N answers per scenario) or `score` (exact P(action))."""
    return [
        "model=tiny_llama", "sampler=hf", "sampler.device=cuda", f"sampler.mode={mode}", f"sampler.n={SAMPLE_N}",
        "sampler.batch_size=32", "sampler.progress=false", *SAMPLE_SCENARIOS, f"output={output}",
        *([f"adapter={adapter}"] if adapter else []),
    ]


# names of the variables tests/conftest.py set for the CPU suite (DeepSpeed on the CPU, GPUs hidden...), not the
# caller: a user's command has none of them
HARNESS_DEFAULTS = "TOMDISTILL_TEST_DEFAULTS"


def environment(overlay: Path | str | None = None) -> dict:
    """Subprocess environment: the caller's (less what tests/conftest.py set for the CPU suite), offline, tomdistill
    from src/; OVERLAY (a --target folder) first on PYTHONPATH. Accelerator and precision are left to the run."""
    harness = {n for n in os.environ.get(HARNESS_DEFAULTS, "").split(",") if n}
    base = {k: v for k, v in os.environ.items() if k not in harness and k != HARNESS_DEFAULTS}
    path = os.pathsep.join(p for p in (str(overlay or ""), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PROJECT_ROOT": str(ROOT), "PYTHONPATH": path}


class RunTimeout(AssertionError):
    """A train.py / sample.py run that outlived STEP_TIMEOUT (a hang: NCCL, a JIT build, a deadlock)."""


def run_script(script: str, args: list[str], timeout: int = STEP_TIMEOUT, log: Path | None = None,
               peak: bool = False, probe: bool = False, overlay: Path | str | None = None
               ) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository root (through peak_mem.py when `peak`, train_probe.py when `probe`);
    raises with the log's tail when it fails. The whole output is written to `log`."""
    wrapper = [str(PEAK_MEM)] if peak else [str(TRAIN_PROBE)] if probe else []
    command = [sys.executable, *wrapper, str(ROOT / script), *args]
    try:
        result = subprocess.run(command, cwd=ROOT, env=environment(overlay), capture_output=True, text=True,
                                timeout=timeout)
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


def probe_report(result: subprocess.CompletedProcess) -> dict:
    """train_probe.py's report (its last `GPU_PROBE=` stderr line); {} if there is none."""
    for line in reversed(result.stderr.splitlines()):
        if line.startswith("GPU_PROBE="):
            return json.loads(line.split("=", 1)[1])
    return {}


# Lightning's own line for the accelerator it resolved (pytorch_lightning/trainer/setup.py, _log_device_info)
GPU_USED = "GPU available: True (cuda), used: True"


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


def first_loss(output: Path) -> float:
    """train/loss of the first step (every fit starts from the same weights and batch)."""
    return column(metric_rows(output), "train/loss")[0][1]


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
