"""No silent CPU fallback: allocated GPUs that torch cannot see stop train.py and sample.py with a message."""
from __future__ import annotations

import pytest

from helpers import TINY, run_train
from tomdistill.devices import NoVisibleGPUError, allocated_gpus, check_gpus_usable


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS=0,1,2,3"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
])
def test_allocated_gpus_reads_cuda_visible_devices_and_slurm(env, expected):
    assert allocated_gpus(env) == expected


def test_allocated_but_invisible_gpus_are_an_error_naming_build_and_driver(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoVisibleGPUError, match=r"trainer.accelerator=auto: GPUs are allocated .*SLURM_JOB_GPUS=0.*torch "):
        check_gpus_usable("trainer.accelerator=auto", {"SLURM_JOB_GPUS": "0"})
    check_gpus_usable("trainer.accelerator=auto", {})  # nothing allocated: the CPU is the honest choice


def test_train_py_refuses_to_run_on_the_cpu_when_a_gpu_was_allocated(tmp_path, teacher):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}  # this machine's torch sees no GPU
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "trainer.accelerator=auto",
                             f"data.teacher={teacher}", f"output={tmp_path}/run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "CUDA_VISIBLE_DEVICES=0" in result.stderr and "torch " in result.stderr
    assert "does not fall back to the CPU silently" in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_bf16_if_native_trains_in_bf16_only_where_the_hardware_computes_it(monkeypatch):
    """The demo's precision: emulated bf16 autocast on a CPU without AVX512-BF16/AMX was 24x slower than fp32
    (bench/README.md, soft_step), so it falls back to fp32 there; `auto` keeps fp32 on every CPU."""
    from tomdistill import training

    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(training, "cpu_has_native_bf16", lambda native=native: native)
        assert training.resolve_precision("bf16-if-native", "cpu") == expected
        assert training.resolve_precision("auto", "cpu") == "32-true"
    from tomdistill import devices

    monkeypatch.setattr(devices, "gpu_computes_bf16", lambda: True)  # tests/test_gpu_path.py mocks the device itself
    assert training.resolve_precision("bf16-if-native", "gpu") == "bf16-mixed"
    assert training.resolve_precision("32-true", "cpu") == "32-true"
