"""On one GPU, bf16: the device stack, fits of the tiny Llama with ddp / ZeRO-2 / ZeRO-3, a ZeRO-3 resume.

Each fit is the real `python train.py` (as a user runs it) for gpu_runs.STEPS optimizer steps on the oracle
teacher; tokens/s and peak GPU memory come from its metrics.csv (`train/tokens_per_s`, `train/gpu_mem_gb`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import gpu_runs

pytestmark = pytest.mark.gpu

PROBE = r"""
import json, torch
import deepspeed
from deepspeed.accelerator import get_accelerator
a = torch.randn(512, 512, device="cuda")
b = torch.randn(512, 512, device="cuda")
exact = a @ b
with torch.autocast("cuda", dtype=torch.bfloat16):
    low = a @ b
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
    "capability": list(torch.cuda.get_device_capability(0)), "bf16": torch.cuda.is_bf16_supported(),
    "nccl": torch.distributed.is_nccl_available(), "deepspeed": deepspeed.__version__,
    "ds_accelerator": get_accelerator().device_name(),
    "bf16_rel_err": float((low.float() - exact).norm() / exact.norm()), "low_dtype": str(low.dtype),
}))
"""


@pytest.mark.timeout(120)
def test_cuda_bf16_nccl_and_deepspeed_on_cuda(record_property):
    result = subprocess.run([sys.executable, "-c", PROBE], env=gpu_runs.environment(), capture_output=True,
                            text=True, timeout=110, cwd=gpu_runs.ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(info, indent=2))
    record_property("note", f"{info['device']}, torch {info['torch']} CUDA {info['cuda']}, "
                            f"deepspeed {info['deepspeed']} on {info['ds_accelerator']}")
    assert info["bf16"] and info["nccl"]
    assert info["ds_accelerator"] == "cuda"
    assert info["low_dtype"] == "torch.bfloat16" and info["bf16_rel_err"] < 2e-2


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT + 60)
@pytest.mark.parametrize("strategy", gpu_runs.STRATEGIES)
def test_bf16_fit(runs, strategy, record_property):
    output = runs.train(strategy)
    speed = gpu_runs.throughput(output)
    record_property("tokens_per_s", speed["tokens_per_s"])
    record_property("gpu_mem_gb", speed["gpu_mem_gb"])
    result = gpu_runs.summary(output)
    assert result["global_step"] == gpu_runs.STEPS
    assert gpu_runs.finite(result["value"]), result["final_metrics"]  # val/alignment, computed on the GPU
    config = yaml.safe_load((output / "config.yaml").read_text())
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["precision"] == "bf16-mixed"
    assert speed["gpu_mem_gb"] and speed["gpu_mem_gb"] > 0, "no train/gpu_mem_gb: the fit did not run on CUDA"
    assert speed["tokens_per_s"] and speed["tokens_per_s"] > 0
    gpu_runs.check_adapter(output / "adapter")
    last = output / "checkpoints" / "last.ckpt"
    if strategy.startswith("deepspeed"):
        assert last.is_dir(), "DeepSpeed writes a sharded checkpoint directory"
    else:
        assert last.is_file()
    if (output / "adapter_best").exists():
        gpu_runs.check_adapter(output / "adapter_best")


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT + 60)
def test_zero3_resume_from_last_ckpt(runs, record_property):
    first = runs.train("deepspeed_zero3")
    output = runs.fresh("deepspeed_zero3_resumed")
    shutil.copytree(first, output)
    gpu_runs.run_script("train.py", gpu_runs.train_overrides("deepspeed_zero3", output, runs.teacher,
                                                             max_steps=gpu_runs.RESUME_STEPS,
                                                             extra=("ckpt_path=last",)),
                        log=runs.workdir / "logs" / "train_deepspeed_zero3_resumed.log")
    speed = gpu_runs.throughput(output)
    record_property("tokens_per_s", speed["tokens_per_s"])
    record_property("gpu_mem_gb", speed["gpu_mem_gb"])
    assert gpu_runs.summary(output)["global_step"] == gpu_runs.RESUME_STEPS
    # the resumed run logs only the new steps: it continued from last.ckpt, it did not start again at 0
    assert gpu_runs.logged_train_steps(output) == list(range(gpu_runs.STEPS, gpu_runs.RESUME_STEPS))
    before = gpu_runs.adapter_state(first / "adapter")
    after = gpu_runs.check_adapter(output / "adapter")
    assert before.keys() == after.keys()
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    record_property("note", f"adapter moved by up to {moved:.2e} in the resumed steps")


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT * 2 + 60)
def test_zero3_adapter_matches_zero2(runs, record_property):
    """Same seed, data and steps: ZeRO-3's gathered adapter is ZeRO-2's (bf16, so a loose tolerance)."""
    import torch

    zero2 = gpu_runs.adapter_state(runs.train("deepspeed_zero2") / "adapter")
    zero3 = gpu_runs.adapter_state(runs.train("deepspeed_zero3") / "adapter")
    assert zero2.keys() == zero3.keys() and zero3
    worst = max(float((zero3[k].float() - zero2[k].float()).abs().max()) for k in zero2)
    record_property("note", f"max |zero3 - zero2| = {worst:.2e}")
    for key in zero2:
        assert zero3[key].shape == zero2[key].shape, key
        torch.testing.assert_close(zero3[key].float(), zero2[key].float(), atol=1e-3, rtol=1e-2)
