"""Kinds of training target (src/tomdistill/data/targets/): the datamodule and the LightningModule ask the loss's
kind instead of branching on the loss, so a loss that needs a new kind of target is three files outside the package:
one loss module, one targets module and one YAML."""
from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch

from helpers import TINY, check, run_train, summary

# A new kind: the sampled answers, but only the answer token is learned (the next token at the answer position).
TARGETS_MODULE = '''
from tomdistill.data.targets.distribution import check_answer_positions, mark_answer_positions
from tomdistill.data.targets.base import next_token_labels
from tomdistill.data.targets.tokens import TokenTargets
from tomdistill.losses.base import LossInputs
import torch


class AnswerTokenTargets(TokenTargets):
    def check_tokenized(self, tokenized, max_length):
        check_answer_positions(self.loss.name, tokenized)

    def positions(self, batch):
        return mark_answer_positions(batch, torch.zeros_like(batch["labels"], dtype=torch.bool))

    def loss_inputs(self, batch, logits, keep):
        return LossInputs(logits, token_targets=next_token_labels(batch["labels"])[keep])
'''
LOSS_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from tomdistill.losses.base import DistillationLoss


@dataclass
class AnswerTokenLoss(DistillationLoss):
    name: str = "answer_token"
    targets: ClassVar[str] = "answer_token_targets.AnswerTokenTargets"

    def __call__(self, inputs):
        loss = F.cross_entropy(inputs.logits.float(), inputs.token_targets)
        return {"loss": loss, "answer_token": loss}
'''
LOSS_YAML = '''
_target_: answer_token_loss.AnswerTokenLoss
name: answer_token
'''


@pytest.fixture
def new_kind(tmp_path):
    plugin = tmp_path / "plugin"
    (plugin / "conf" / "loss").mkdir(parents=True)
    (plugin / "answer_token_targets.py").write_text(textwrap.dedent(TARGETS_MODULE))
    (plugin / "answer_token_loss.py").write_text(textwrap.dedent(LOSS_MODULE))
    (plugin / "conf" / "loss" / "answer_token.yaml").write_text(textwrap.dedent(LOSS_YAML))
    return plugin


def test_a_loss_with_a_new_kind_of_target_trains_from_one_loss_module_one_targets_module_and_one_yaml(
        tmp_path, teacher, new_kind, monkeypatch):
    monkeypatch.syspath_prepend(str(new_kind))
    from answer_token_loss import AnswerTokenLoss

    kind = AnswerTokenLoss().target_kind(batch_size=4)
    batch = {"labels": torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]]),
             "answer_pos": torch.tensor([1, 0])}
    keep = kind.positions(batch)
    assert keep.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]
    inputs = kind.loss_inputs(batch, torch.zeros(2, 11), keep)
    assert inputs.token_targets.tolist() == [5, 8]  # the token after "Answer:" in each row

    result = run_train([*TINY, "loss=answer_token", f"hydra.searchpath=[file://{new_kind / 'conf'}]",
                        "trainer.max_steps=2", "trainer.val_check_interval=2", f"data.teacher={teacher}",
                        f"output={tmp_path}/run"], timeout=300,
                       env={"PYTHONPATH": os.pathsep.join(filter(None, [str(new_kind), os.environ.get("PYTHONPATH")]))})
    check(result)
    done = summary(tmp_path / "run")
    assert done["global_step"] == 2 and math.isfinite(done["final_metrics"]["train/answer_token_loss"])
    record = json.loads((tmp_path / "run" / "adapter" / "tomdistill_adapter.json").read_text())
    assert record["training"]["loss"] == "answer_token"
    assert record["training"]["teacher_labels"]["answers"] == done["data"]["train_examples"] > 0


def test_a_loss_whose_targets_cannot_be_imported_is_refused_naming_the_loss_and_the_path():
    from dataclasses import dataclass
    from typing import ClassVar

    from tomdistill.losses.base import DistillationLoss, LossError

    @dataclass
    class Orphan(DistillationLoss):
        name: str = "orphan"
        targets: ClassVar[str] = "nowhere.Targets"

    with pytest.raises(LossError, match=r"^loss=orphan: its targets 'nowhere.Targets' cannot be imported"):
        Orphan().target_kind()


def test_no_module_outside_the_losses_and_the_target_kinds_branches_on_what_a_loss_trains_on():
    """What a loss trains on is asked of its kind; the flags the losses once declared are gone."""
    from pathlib import Path

    import tomdistill

    package = Path(tomdistill.__file__).parent
    flags = ("per_scenario", "uses_tokens", "uses_distribution")
    readers = [f"{path.relative_to(package)}: {flag}" for path in package.rglob("*.py")
               for flag in flags if f".{flag}" in path.read_text()]
    assert readers == []
