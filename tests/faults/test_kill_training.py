"""Kill and resume, training: SIGKILL after a checkpoint, or SIGTERM (SLURM pre-emption), then
`ckpt_path=last` gives the same run as one that was never interrupted."""
from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch


from .common import TINY_TRAIN, entry, finish, ok, start, tail, wait_for

# 8 batches per epoch (32 examples, batch 4): checkpoints at steps 2, 4, 6 fall mid-epoch
STEPS = 6
ARGS = [*TINY_TRAIN, "loss=sft_soft", "data.batch_size=4", f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher):
    output = tmp_path_factory.mktemp("reference") / "run"
    ok(entry("train.py", [*ARGS, f"data.teacher={teacher}", f"output={output}"]))
    return output


def checkpoint(path: Path) -> dict:
    # weights_only=True: our checkpoints hold tensors and plain containers only (no pickled objects)
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(checkpoint(path)["global_step"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return None


def losses_by_step(output: Path) -> dict[int, float]:
    with open(output / "logs/metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def adapter(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / "adapter/adapter_model.safetensors"))


def assert_same_run(resumed: Path, reference: Path, resumed_from: int) -> None:
    import json

    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS
    # data order and optimizer: the resumed steps see the same batches and give the same losses
    # the training curve is whole: the interrupted run's steps before the checkpoint, then the resumed ones
    mine, theirs = losses_by_step(resumed), losses_by_step(reference)
    assert sorted(mine) == list(range(STEPS)), sorted(mine)
    for step in mine:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), f"step {step}: {mine[step]} != {theirs[step]}"
    # optimizer (AdamW moments, step counts) and scheduler state at the end
    a, b = checkpoint(resumed / "checkpoints/last.ckpt"), checkpoint(reference / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["lr_schedulers"] == b["lr_schedulers"]
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[key][name], state_b[key][name], rtol=1e-4, atol=1e-6)
    # the final adapter
    mine, theirs = adapter(resumed), adapter(reference)
    assert mine.keys() == theirs.keys() and mine
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, teacher, uninterrupted):
    output = tmp_path / "run"
    last = output / "checkpoints/last.ckpt"
    process = start("train.py", [*ARGS, f"data.teacher={teacher}", f"output={output}"], tmp_path / "killed.log")
    try:
        wait_for(lambda: checkpoint_step(last) == 2, process, what="the step-2 checkpoint")
    finally:
        code = finish(process, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (output / "adapter").exists()  # a killed run exports no adapter
    assert checkpoint_step(last) in (2, 4), tail(process)  # the kill may land just after the step-4 one

    resumed_from = checkpoint_step(last)
    ok(entry("train.py", [*ARGS, f"data.teacher={teacher}", f"output={output}", "ckpt_path=last"]))
    assert_same_run(output, uninterrupted, resumed_from)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path, teacher, uninterrupted):
    output = tmp_path / "run"
    last = output / "checkpoints/last.ckpt"
    process = start("train.py", [*ARGS, f"data.teacher={teacher}", f"output={output}"], tmp_path / "term.log")
    try:
        wait_for(lambda: checkpoint_step(last) == 2, process, what="the step-2 checkpoint")
    finally:
        code = finish(process, signal.SIGTERM)
    log = tail(process, 20000)
    assert code != 0, log  # pre-empted is not finished: a job script must not go on to the next stage
    assert "SIGTERM: checkpoint saved" in log, log
    saved = checkpoint_step(last)
    assert saved is not None and 2 < saved < STEPS, (saved, log)  # saved by the SIGTERM, after the last regular one
    assert not (output / "adapter").exists()

    ok(entry("train.py", [*ARGS, f"data.teacher={teacher}", f"output={output}", "ckpt_path=last"]))
    assert_same_run(output, uninterrupted, saved)


def test_the_training_loader_reshuffles_per_epoch_and_resumes_mid_epoch():
    """The mechanics behind the data-order guarantee, through Lightning's own epoch hook."""
    from lightning_fabric.utilities.data import _set_sampler_epoch

    from tomdistill.data.batching import LengthGroupedBatchSampler
    from tomdistill.data.datamodule import ResumableDataLoader

    lengths = [(i * 7) % 13 + 1 for i in range(40)]
    loader = ResumableDataLoader(list(range(40)), batch_sampler=LengthGroupedBatchSampler(lengths, 4, seed=1),
                                 collate_fn=list, batches_done=lambda: 3)
    orders = []
    for epoch in (0, 1):
        _set_sampler_epoch(loader, epoch)  # what Lightning calls at each epoch start
        orders.append(list(loader))
    assert orders[0] != orders[1]  # reshuffled
    assert sorted(sum(orders[0], [])) == sorted(sum(orders[1], [])) == list(range(40))  # each example once
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 3}

    resumed = ResumableDataLoader(list(range(40)), batch_sampler=LengthGroupedBatchSampler(lengths, 4, seed=1),
                                  collate_fn=list)
    resumed.load_state_dict(state)
    _set_sampler_epoch(resumed, 1)
    assert list(resumed) == orders[1][3:]  # the rest of the interrupted epoch, nothing repeated
    assert list(resumed) == orders[1]  # the next pass over the same epoch is whole again
