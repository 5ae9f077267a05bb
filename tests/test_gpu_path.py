"""The first GPU run, proven without a GPU: what the libraries' sources say would fail there (docs/design.md,
"DeepSpeed on GPUs and CPUs"). CUDA is mocked where a rule reads the device; DeepSpeed runs on CPU with gloo."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT, TINY, check, run_train

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, tomdistill
for module in pkgutil.walk_packages(tomdistill.__path__, "tomdistill."):
    importlib.import_module(module.name)
"""


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def environment_without_ds_accelerator() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}


# 1. DeepSpeed's device follows the run's accelerator, never an import ------------------------------------------------
def test_importing_every_tomdistill_module_leaves_deepspeeds_device_unset():
    result = run_python(IMPORT_EVERY_MODULE + "import os; print('DS_ACCELERATOR', os.environ.get('DS_ACCELERATOR'))",
                        environment_without_ds_accelerator())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "None"


@pytest.mark.parametrize("inherited", [None, "cpu"])
def test_a_deepspeed_trainer_on_the_gpu_points_deepspeed_at_cuda_whatever_was_imported_first(inherited):
    """What train.py does with trainer=deepspeed_zero3 trainer.accelerator=gpu: every module imported first, then
    the strategy built for the resolved accelerator. DeepSpeed then reports cuda, and so would the ranks it starts."""
    env = environment_without_ds_accelerator()
    if inherited:
        env["DS_ACCELERATOR"] = inherited
    code = IMPORT_EVERY_MODULE + f"""
import os
from hydra import compose, initialize_config_dir
from tomdistill.paths import register_resolvers
from tomdistill.training import build_strategy
register_resolvers()
with initialize_config_dir({str(ROOT / 'conf')!r}, version_base="1.3"):
    cfg = compose("train", overrides=["trainer=deepspeed_zero3", "trainer.accelerator=gpu"])
strategy = build_strategy(cfg.trainer.strategy, "gpu")
from deepspeed.accelerator import get_accelerator
print("RESULT", os.environ.get("DS_ACCELERATOR"), get_accelerator().device_name(), type(strategy).__name__)
"""
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    _, variable, device, strategy = line.split()
    assert (variable, device) == ("cuda", "cuda")
    assert strategy != "CPUDeepSpeedStrategy"


def test_deepspeed_already_on_the_cpu_in_this_process_refuses_a_gpu_run(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from tomdistill.model.strategy import DeepSpeedAcceleratorError, use_deepspeed_accelerator

    assert get_accelerator().device_name() == "cpu"  # tests/conftest.py: DS_ACCELERATOR=cpu
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(DeepSpeedAcceleratorError, match=r"^trainer.accelerator=gpu: DeepSpeed already runs on cpu"):
        use_deepspeed_accelerator("gpu")


# 2. bf16 under DeepSpeed: targets, weights, gradient reduction and accumulation stay fp32 --------------------------
def compose_train(overrides):
    from hydra import compose, initialize_config_dir

    from tomdistill.paths import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3"])
def test_under_deepspeed_bf16_the_batch_keeps_the_teachers_probabilities_and_weights_in_fp32(trainer, tmp_path):
    from tomdistill.training import build_trainer

    cfg = compose_train([f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                         f"output={tmp_path}"])
    lightning = build_trainer(cfg, tmp_path, [], [], has_validation=False)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "soft_probs": torch.tensor([[0.761, 0.239]]),
             "weight": torch.tensor([2 / 3])}
    seen = lightning.precision_plugin.convert_input({k: v.clone() for k, v in batch.items()})
    for key, value in batch.items():
        assert seen[key].dtype == value.dtype, key
        assert torch.equal(seen[key], value), key  # not 0.7617, not 0.6680


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "conf" / "deepspeed").glob("*.json")))
def test_deepspeed_configs_reduce_and_accumulate_gradients_in_fp32_under_bf16(config):
    """DeepSpeed's defaults under bf16 communicate and accumulate gradients in bf16 (deepspeed/runtime/engine.py
    `communication_data_type`, `get_data_types`): over 4 accumulation steps × 16 ranks that rounds."""
    from deepspeed.runtime.config import DeepSpeedConfig

    settings = json.loads((ROOT / "conf" / "deepspeed" / config).read_text())
    settings.update({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4})
    parsed = DeepSpeedConfig(settings)
    assert parsed.communication_data_type == torch.float32
    assert parsed.grad_accum_dtype == "fp32"


# 4. emulated bf16 is not bf16 ---------------------------------------------------------------------------------------
def mock_gpu(monkeypatch, capability: int) -> None:
    """A CUDA device of this compute capability (7: V100/T4, where torch can create bf16 tensors by emulation)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=capability))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize("capability, precision, dtype", [(7, "32-true", torch.float16), (8, "bf16-mixed", torch.bfloat16),
                                                          (9, "bf16-mixed", torch.bfloat16)])
def test_only_gpus_that_compute_bf16_natively_train_and_sample_in_bf16(monkeypatch, capability, precision, dtype):
    from tomdistill.model.loading import resolve_dtype
    from tomdistill.training import resolve_precision

    mock_gpu(monkeypatch, capability)
    assert torch.cuda.is_bf16_supported()  # torch's default counts emulation: the rule must not
    assert resolve_precision("auto", "gpu") == precision
    assert resolve_precision("bf16-if-native", "gpu") == precision
    assert resolve_dtype("auto", "cuda") == dtype  # a 70b teacher on V100s samples in fp16, not emulated bf16


# 5. a collective is reached by every rank or by none ----------------------------------------------------------------
class TwoRanks:
    """Two ranks' strategy as the callbacks see it: rank 0's value is broadcast, boolean votes are counted."""

    def __init__(self):
        self.sent = None
        self.votes: dict[int, int] = {0: 0, 1: 0}

    def strategy(self, rank: int):
        ranks = self

        class Strategy:
            def broadcast(self, obj, src=0):
                if rank == 0:
                    ranks.sent = obj
                return ranks.sent

            def reduce_boolean_decision(self, decision, all=True):
                ranks.votes[rank] += 1
                return decision

        return Strategy()


def test_the_best_adapter_is_saved_by_every_rank_or_by_none(tmp_path):
    from tomdistill.callbacks import AdapterExport

    ranks = TwoRanks()
    saved = {0: 0, 1: 0}
    exports = {r: AdapterExport(tmp_path / "final", tmp_path / "best", "base") for r in (0, 1)}
    for export in exports.values():
        export.best_score = 0.60
    # rank 1's own val/alignment improved in the last bits, rank 0's did not
    for rank, local in ((0, 0.59999), (1, 0.60001)):
        trainer = SimpleNamespace(sanity_checking=False, global_step=3, is_global_zero=rank == 0,
                                  callback_metrics={"val/alignment": torch.tensor(local)},
                                  strategy=ranks.strategy(rank))
        module = SimpleNamespace(save_adapter=lambda directory, rank=rank: saved.__setitem__(rank, saved[rank] + 1))
        exports[rank].on_validation_end(trainer, module)
    assert saved[0] == saved[1] == 0
    assert exports[0].best_score == exports[1].best_score == 0.60


def test_the_divergence_vote_is_reached_by_every_rank_whatever_its_own_loss():
    from tomdistill.callbacks import StopOnDivergence

    ranks = TwoRanks()
    losses = {0: [1.0, 1.1, 1.2, 1.3], 1: [float("nan"), 1.1, 1.2, 1.3]}  # rank 1's first loss was not finite
    for rank, values in losses.items():
        callback = StopOnDivergence(factor=10, baseline_steps=1, patience=2)
        trainer = SimpleNamespace(strategy=ranks.strategy(rank), global_step=0, optimizers=[])
        for index, value in enumerate(values):
            callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, index)
    assert ranks.votes[0] == ranks.votes[1] == 3


def _write_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from tomdistill.distributed import WriteFailedError, rank_zero_writes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def write() -> None:
        raise OSError(28, "No space left on device")

    try:
        rank_zero_writes(write, torch.device("cpu"), "writing the adapter to /full/adapter")
        results.put((rank, "returned"))
    except WriteFailedError as err:
        results.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_failed_adapter_write_on_rank_0_stops_every_rank_instead_of_leaving_them_at_a_barrier():
    import multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_write_on_rank, args=(rank, port, results), daemon=True) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        outcome = dict(results.get(timeout=90) for _ in processes)  # a rank left at a barrier never answers
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert set(outcome) == {0, 1}
    for rank in (0, 1):
        assert "rank 0: writing the adapter to /full/adapter: OSError" in outcome[rank], outcome
        assert "No space left on device" in outcome[rank]


# 7. resuming from a DeepSpeed checkpoint is as safe as from any other ----------------------------------------------
class WritesAFile:
    """A pickled object that runs code when loaded with weights_only=False: it creates `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.timeout(400)
def test_bf16_zero3_with_accumulation_trains_and_a_tampered_checkpoint_is_refused_before_it_runs(tmp_path, teacher):
    output = tmp_path / "run"
    check(run_train([*TINY, "loss=sft_soft", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
                     "trainer=deepspeed_zero3", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
                     f"data.teacher={teacher}", f"output={output}"]))
    states = sorted((output / "checkpoints" / "last.ckpt").rglob("*model_states.pt"))
    assert states
    marker = tmp_path / "code-ran"
    state = torch.load(states[0], map_location="cpu", weights_only=False)
    state["note"] = WritesAFile(str(marker))
    torch.save(state, states[0])
    resumed = run_train([*TINY, "loss=sft_soft", "data.batch_size=4", "trainer.max_steps=3",
                         "trainer.val_check_interval=2", "trainer=deepspeed_zero3", "trainer.precision=bf16-mixed",
                         "trainer.accumulate_grad_batches=2", f"data.teacher={teacher}", f"output={output}",
                         "ckpt_path=last"])
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert "refusing to load it" in last and str(states[0].name) in last and "Traceback" not in resumed.stderr


def test_every_file_of_a_deepspeed_checkpoint_is_checked_with_only_deepspeeds_data_classes_allowed(tmp_path):
    from tomdistill.model.strategy import check_deepspeed_checkpoint
    from deepspeed.runtime.zero.config import ZeroStageEnum

    directory = tmp_path / "last.ckpt" / "checkpoint"
    directory.mkdir(parents=True)
    torch.save({"zero_stage": ZeroStageEnum(3), "weights": torch.ones(2)}, directory / "zero_pp_rank_0_optim_states.pt")
    check_deepspeed_checkpoint(tmp_path / "last.ckpt")
    torch.save({"note": WritesAFile(str(tmp_path / "code-ran"))}, directory / "zero_pp_rank_1_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"zero_pp_rank_1_optim_states.pt: Unsupported global: GLOBAL io.open \(a DeepSpeed"):
        check_deepspeed_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "code-ran").exists()
