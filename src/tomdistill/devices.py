"""Where the work runs: never fall back to the CPU silently when GPUs were allocated.

A GPU node whose torch build does not match its driver (or a CPU-only torch wheel) makes
`torch.cuda.is_available()` false; with `accelerator: auto` a 7b training would then crawl on the
CPU, and a DeepSpeed config would take the CPU strategy. When SLURM or `CUDA_VISIBLE_DEVICES`
says GPUs are ours but torch sees none, stop and say which torch build and which driver met.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Mapping

from .errors import UserError

# what SLURM sets for a job or step with GPUs (--gpus, --gpus-per-node, --gres=gpu:N)
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")
SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")


class NoVisibleGPUError(RuntimeError, UserError):
    """GPUs are allocated to this process but torch cannot use them; the message names build and driver."""


def allocated_gpus(env: Mapping[str, str] | None = None) -> str | None:
    """How the environment says this process has GPUs (None: it does not say so)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in SLURM_GPU_VARIABLES:
        value = env.get(name)
        counts = name in SLURM_GPU_COUNTS  # a count of 0 is no GPU; in a list of indices "0" is the first GPU
        if value not in (None, "", "(null)") and not (counts and value == "0"):
            return f"{name}={value}"
    return None


def torch_build() -> str:
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({'built for CUDA ' + cuda if cuda else 'a CPU-only build'})"


def driver_version() -> str:
    """The NVIDIA driver, as nvidia-smi reports it (or why it cannot)."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver found (nvidia-smi is not on PATH)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed ({err})"
    versions = sorted(set(out.stdout.split()))
    return f"NVIDIA driver {', '.join(versions)}" if out.returncode == 0 and versions else \
        f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"


def check_gpus_usable(what: str, env: Mapping[str, str] | None = None) -> None:
    """Raise when GPUs are allocated but torch sees none; `what` names the setting that chose the device."""
    import torch

    allocated = allocated_gpus(env)
    if allocated is None or torch.cuda.is_available():
        return
    raise NoVisibleGPUError(
        f"{what}: GPUs are allocated to this job ({allocated}) but torch cannot use them: {torch_build()}, "
        f"{driver_version()}. Install the torch build for this driver (requirements-gpu.txt; a CUDA 13 build needs "
        f"driver ≥ 580, CUDA 12.x builds ≥ 525), or choose the CPU explicitly (trainer.accelerator=cpu / "
        f"sampler.device=cpu) — tomdistill does not fall back to the CPU silently"
    )


def gpu_computes_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (compute capability 8.0 and later, or ROCm).
    `torch.cuda.is_bf16_supported()` also counts emulation by default (a V100 or T4: slow), so it is asked
    without it."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
