"""On one GPU: the device stack, then the fits of gpu_runs.FITS (ddp, ZeRO-2, ZeRO-3, ddp on the carried newer
transformers) and a ZeRO-3 resume, each asserting what the run itself reports.

Each fit is the real `python train.py` with the overrides a user types (accelerator and precision left to the
trainer configs' `auto`), run through train_probe.py, which reports the resolved accelerator and precision, ZeRO-3's
parameter state, gradient checkpointing and accumulation at work and the logits path taken; tokens/s and peak GPU
memory come from its metrics.csv (`train/tokens_per_s`, `train/gpu_mem_gb`).
Seconds on one H100 (estimates; the whole check is bounded by scripts/gpu_check.sh's budget): the device probe
~10; each fit ~30 (imports ~12, DeepSpeed set-up ~5, 6 steps or 12 batches, 2 validations); the resume ~30.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("+")[0].split(".")[:2])


@pytest.mark.timeout(120)
def test_cuda_bf16_nccl_and_deepspeed_on_cuda(record_property):
    """DeepSpeed finds CUDA by itself (nothing in the environment names its accelerator)."""
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
@pytest.mark.parametrize("fit", list(gpu_runs.FITS))
def test_bf16_fit(runs, fit, record_property):
    run = runs.fit(fit)
    output, probe = run.output, run.probe
    speed = gpu_runs.throughput(output)
    record_property("tokens_per_s", speed["tokens_per_s"])
    record_property("gpu_mem_gb", speed["gpu_mem_gb"])
    result = gpu_runs.summary(output)
    assert result["global_step"] == gpu_runs.STEPS
    assert gpu_runs.finite(result["value"]), result["final_metrics"]  # val/alignment, computed on the GPU
    # the user's defaults went in, and resolved to the GPU in bf16: the run's config, Lightning's log, the trainer
    config = yaml.safe_load((output / "config.yaml").read_text())
    assert (config["trainer"]["accelerator"], config["trainer"]["precision"]) == ("auto", "auto")
    assert gpu_runs.GPU_USED in run.log, "Lightning did not report the GPU as used"
    assert probe.get("accelerator") == "CUDAAccelerator" and probe["root_device"].startswith("cuda"), probe
    assert probe["precision"] == "bf16-mixed", probe
    assert speed["gpu_mem_gb"] and speed["gpu_mem_gb"] > 0, "no train/gpu_mem_gb: the fit did not run on CUDA"
    assert speed["tokens_per_s"] and speed["tokens_per_s"] > 0
    gpu_runs.check_adapter(output / "adapter")
    last = output / "checkpoints" / "last.ckpt"
    if fit.startswith("deepspeed"):
        assert last.is_dir(), "DeepSpeed writes a sharded checkpoint directory"
        assert probe["zero_stage"] == int(fit[-1]), probe
    else:
        assert last.is_file()
    if (output / "adapter_best").exists():
        gpu_runs.check_adapter(output / "adapter_best")
    # the logits path (src/tomdistill/model/lora_module.py, kept_logits) that this fit's transformers takes
    assert probe["kept_logits_calls"] > 0, probe
    if fit in gpu_runs.OVERLAY_FITS:
        assert Path(probe["transformers_file"]).is_relative_to(Path(run.overlay)), probe["transformers_file"]
        assert version_tuple(probe["transformers"]) >= version_tuple(gpu_runs.NATIVE_TRANSFORMERS), probe
        assert probe["native_mask_slicing"] and probe["bool_mask_forwards"] > 0, probe
    else:  # the image's transformers (5.17: scripts/gpu_image_packages.txt)
        assert version_tuple(probe["transformers"]) < version_tuple(gpu_runs.NATIVE_TRANSFORMERS), probe
        assert not probe["native_mask_slicing"] and probe["bool_mask_forwards"] == 0, probe
    path = "boolean logits_to_keep" if probe["native_mask_slicing"] else "fallback"
    record_property("note", f"{probe['accelerator']} {probe['precision']}; logits: {path} "
                            f"(transformers {probe['transformers']})")


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT + 60)
def test_zero3_partitions_and_gathers_every_parameter(runs, record_property):
    """stage3_param_persistence_threshold 0: every parameter, the LoRA ones too, is partitioned away (local numel
    0) once DeepSpeed has set up, gathered whole in the forward pass, and released again after the step."""
    probe = runs.fit("deepspeed_zero3").probe
    assert probe["zero_stage"] == 3 and probe["persistence_threshold"] == 0, probe
    trainable = probe["trainable_params"]
    for when in ("zero3_at_fit_start", "zero3_after_first_batch"):
        state = probe[when]
        assert state["all"]["zero3_params"] > trainable > 0, (when, state)
        assert state["all"]["partitioned"] == state["all"]["zero3_params"], (when, state)
        assert state["trainable"]["partitioned"] == trainable and state["all"]["persistent"] == 0, (when, state)
    assert probe["trainable_gathered_in_forward"] == trainable, probe
    record_property("note", f"{probe['zero3_after_first_batch']['all']['zero3_params']} parameters partitioned, "
                            f"{trainable} LoRA ones gathered in the forward pass")


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT * 2 + 60)
def test_zero_fits_checkpoint_activations_and_accumulate(runs, record_property):
    notes = []
    for fit in ("deepspeed_zero2", "deepspeed_zero3"):
        probe = runs.fit(fit).probe
        assert probe["accumulate_grad_batches"] == gpu_runs.ACCUMULATE, probe
        assert probe["optimizer_steps"] == gpu_runs.STEPS, probe
        assert probe["train_batches"] == gpu_runs.ACCUMULATE * gpu_runs.STEPS, probe
        # transformers' checkpointed decoder layers: one checkpointed call per layer and forward pass
        assert probe["checkpointed_modules"] > 0 and probe["checkpoint_calls"] >= probe["train_batches"], probe
        notes.append(f"{fit}: {probe['train_batches']} batches, {probe['optimizer_steps']} steps, "
                     f"{probe['checkpoint_calls']} checkpointed calls")
    record_property("note", "; ".join(notes))


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
    # metrics.csv continues (src/tomdistill/loggers.py): every step once, so the resumed run went on from last.ckpt
    # and did not start again at 0
    logged = [step for step, _ in gpu_runs.column(gpu_runs.metric_rows(output), "train/loss")]
    assert sorted(logged) == list(range(gpu_runs.RESUME_STEPS)), logged
    before = gpu_runs.adapter_state(first / "adapter")
    after = gpu_runs.check_adapter(output / "adapter")
    assert before.keys() == after.keys()
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    record_property("note", f"adapter moved by up to {moved:.2e} in the resumed steps")


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT * 2 + 60)
def test_zero3_adapter_matches_zero2(runs, record_property):
    """Same seed, data, steps and options: ZeRO-3's gathered adapter is ZeRO-2's (bf16, so a loose tolerance)."""
    import torch

    zero2 = gpu_runs.adapter_state(runs.train("deepspeed_zero2") / "adapter")
    zero3 = gpu_runs.adapter_state(runs.train("deepspeed_zero3") / "adapter")
    assert zero2.keys() == zero3.keys() and zero3
    worst = max(float((zero3[k].float() - zero2[k].float()).abs().max()) for k in zero2)
    record_property("note", f"max |zero3 - zero2| = {worst:.2e}")
    for key in zero2:
        assert zero3[key].shape == zero2[key].shape, key
        torch.testing.assert_close(zero3[key].float(), zero2[key].float(), atol=1e-3, rtol=1e-2)


@pytest.mark.timeout(gpu_runs.STEP_TIMEOUT * 2 + 60)
def test_both_logits_paths_give_the_same_first_loss(runs, record_property):
    """The first step (same weights, same batch) through the fallback and through the boolean logits_to_keep."""
    fallback = gpu_runs.first_loss(runs.train("ddp"))
    native = gpu_runs.first_loss(runs.train("ddp_transformers_overlay"))
    record_property("note", f"first train/loss: fallback {fallback:.5f}, boolean logits_to_keep {native:.5f}")
    assert abs(native - fallback) <= 1e-2 * abs(fallback), (fallback, native)
