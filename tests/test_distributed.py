"""Multi-process set-up, without starting a process group: the 4-bit device map under srun, the process count
of every `trainer.devices` form, refused layouts, and caches built once by ranks started together."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from helpers import TINY, run_train


def test_the_4bit_device_map_follows_local_rank_then_slurm_localid():
    from tomdistill.model.lora_module import local_rank

    assert local_rank({}) == 0
    assert local_rank({"SLURM_LOCALID": "3"}) == 3  # srun: Lightning has not set LOCAL_RANK yet
    assert local_rank({"LOCAL_RANK": "1", "SLURM_LOCALID": "3"}) == 1  # torchrun / Lightning's launcher
    assert local_rank({"LOCAL_RANK": "", "SLURM_LOCALID": "2"}) == 2


def test_processes_per_node_reads_every_form_of_trainer_devices(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from tomdistill.training import TrainingConfigError, processes_per_node

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert processes_per_node(3, "cpu") == processes_per_node("3", "gpu") == 3
    assert processes_per_node(-1, "gpu") == processes_per_node("auto", "gpu") == 4  # every visible GPU
    assert processes_per_node("auto", "cpu") == 1
    assert processes_per_node([0, 2], "gpu") == processes_per_node("0,2", "gpu") == 2
    assert processes_per_node(OmegaConf.create({"d": [0, 1, 2]}).d, "gpu") == 3
    with pytest.raises(TrainingConfigError, match="trainer.devices='many'"):
        processes_per_node("many", "gpu")


# every form is parsed by processes_per_node above; one refusal end to end by default, the others opt-in
@pytest.mark.parametrize("devices", [pytest.param("[0,1]", marks=pytest.mark.extended),
                                     pytest.param("'0,1'", marks=pytest.mark.extended), "2"])
def test_a_local_multirun_of_multi_process_runs_is_refused_for_every_devices_form(tmp_path, devices):
    result = run_train(["-m", *TINY, "trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={devices}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    assert result.returncode != 0
    assert "inside a local multirun (-m)" in result.stderr and "(2 processes)" in result.stderr, result.stderr[-2000:]


def test_4bit_with_zero3_is_refused_naming_the_keys(tmp_path):
    result = run_train([*TINY, "model.quantization=4bit", "trainer=deepspeed_zero3", f"output={tmp_path / 'run'}"],
                       timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: model.quantization=4bit with trainer.strategy.config=" in result.stderr
    assert "zero3.json (ZeRO stage 3)" in result.stderr and "Traceback" not in result.stderr
    zero2 = run_train([*TINY, "model.quantization=4bit", "trainer=deepspeed_zero2", f"output={tmp_path / 'run2'}"],
                      timeout=300)
    assert "ZeRO stage 3" not in zero2.stderr  # ZeRO-2 keeps whole weights: not this refusal (here: no GPU)


# ------------------------------------------------------------------ caches, cold, ranks started together
def _start_together(barrier, target, args, results):
    barrier.wait()
    try:
        results.put(target(*args))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        results.put(f"failed: {type(err).__name__}: {err}")


def _run_together(target, args, processes: int = 3, timeout: float = 240) -> list:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_start_together, args=(barrier, target, args, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        out = [results.get(timeout=timeout) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    return out


def _tiny_snapshot_build(cache_dir: str, model_cfg: dict) -> str:
    """Resolve (building on a cold cache) and load the tiny Llama; count the snapshot builds in a file."""
    import transformers

    from tomdistill.model.loading import load_causal_lm

    save = transformers.LlamaForCausalLM.save_pretrained

    def counting(self, *args, **kwargs):
        with open(Path(cache_dir) / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        return save(self, *args, **kwargs)

    transformers.LlamaForCausalLM.save_pretrained = counting
    model = load_causal_lm(model_cfg, cache_dir=cache_dir)
    return f"loaded {sum(p.numel() for p in model.parameters())}"


@pytest.mark.timeout(300)
def test_ranks_started_together_on_a_cold_cache_build_the_model_snapshot_once(tmp_path, tiny_model_cfg):
    from tomdistill.model.loading import default_cache_dir, resolve_model_path

    warm = Path(resolve_model_path({"name": "smollm2_135m", "gguf": tiny_model_cfg["tokenizer_gguf"],
                                    "cache_name": "smollm2-135m-instruct"}, default_cache_dir()))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / warm.name).symlink_to(warm)  # the tokenizer's snapshot (20 s to build) is not the subject
    results = _run_together(_tiny_snapshot_build, (str(tmp_path), tiny_model_cfg))
    assert all(r.startswith("loaded") for r in results), results
    assert len(set(results)) == 1
    assert len((tmp_path / "builds.txt").read_text().split()) == 1  # one rank built it, the others loaded it


def _tokenize_once(teacher: str, cache_dir: str, model_cfg: dict) -> str:
    from tomdistill import CATALOGUE_DIR
    from tomdistill.data.datamodule import TeacherQADataModule
    from tomdistill.losses import SFTLoss
    from tomdistill.model.loading import load_tokenizer
    from tomdistill.scenarios import load_catalogue

    tokenizer = load_tokenizer(model_cfg, padding_side="right")
    dm = TeacherQADataModule(teacher, tokenizer, load_catalogue(CATALOGUE_DIR), cache_dir=cache_dir,
                             target_kind=SFTLoss().target_kind())
    dm.setup("fit")
    return f"cached={dm.stats['tokenization_cached']} examples={len(dm.train_set)}"


@pytest.mark.timeout(300)
def test_ranks_started_together_on_a_cold_cache_tokenize_once(tmp_path, teacher, tiny_model_cfg):
    results = _run_together(_tokenize_once, (str(teacher), str(tmp_path / "cache"), tiny_model_cfg))
    assert not any(r.startswith("failed") for r in results), results
    assert sorted(r.split()[0] for r in results) == ["cached=False", "cached=True", "cached=True"], results
    assert len({r.split()[1] for r in results}) == 1
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1


@pytest.mark.parametrize("restarts, requeued", [("", True), ("2", True), ("3", False)])
def test_a_preempted_run_requeues_only_below_max_requeues(monkeypatch, restarts, requeued):
    """train.py requeues its own job after a pre-emption; a job restarted max_requeues times stops instead."""
    import signal
    from types import SimpleNamespace

    from tomdistill.callbacks import StepAgreement

    calls = []
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    agreement = StepAgreement(max_requeues=3)
    agreement._deferred[signal.SIGUSR2] = lambda signum, frame: calls.append(signum)  # submitit's handler
    outcome = agreement.requeue(SimpleNamespace(is_global_zero=True))
    assert (calls == [signal.SIGUSR2]) == requeued
    if not requeued:
        assert "restarted 3 times" in outcome and "(max_requeues=3)" in outcome


def test_building_the_tiny_snapshot_on_a_cold_cache_leaves_the_callers_random_state_alone(tmp_path, tiny_model_cfg):
    """A cold cache must not shift the LoRA initialisation drawn after the model loads (first run = later runs)."""
    import torch

    from tomdistill.model.loading import resolve_model_path

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    resolve_model_path(tiny_model_cfg, cache_dir=tmp_path)  # builds the snapshot
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(123)
    resolve_model_path(tiny_model_cfg, cache_dir=tmp_path)  # warm: nothing built
    assert torch.equal(torch.rand(4), expected)
