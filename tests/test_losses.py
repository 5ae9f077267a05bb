"""Losses as components (src/tomdistill/losses, conf/loss): the Jensen–Shannon loss added as one module + one
YAML, checked against the divergence computed over the whole vocabulary, and trained through train.py."""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import TINY, check, run_train, summary
from tomdistill import CONF_DIR
from tomdistill.losses import DistillationLoss, JensenShannonLoss, LossError, SFTLoss, SFTPlusSoftLoss, SoftLabelLoss
from tomdistill.losses.jensen_shannon import jensen_shannon


def full_vocabulary_js(logits, ids, probs):
    p = torch.softmax(logits.double(), -1)
    q = torch.zeros_like(p)
    q.scatter_add_(-1, ids, probs.double())
    m = (p + q) / 2
    kl = lambda a, b: torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean()


def test_jensen_shannon_equals_the_whole_vocabulary_divergence_and_is_bounded():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ids = torch.tensor([[3, 7, 3], [10, 11, 10], [0, 49, 0], [5, 6, 5]])  # a padded third column (probability 0)
    probs = torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    value = jensen_shannon(logits, ids, probs)
    assert float(value) == pytest.approx(float(full_vocabulary_js(logits, ids, probs)), abs=1e-6)
    assert 0 < float(value) < math.log(2)
    # zero when the student's next-token distribution is the teacher's
    at_teacher = torch.full((1, 50), -1e4)
    at_teacher[0, 3], at_teacher[0, 7] = math.log(0.3), math.log(0.7)
    assert float(jensen_shannon(at_teacher, ids[:1], probs[:1])) == pytest.approx(0.0, abs=1e-6)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = torch.stack([jensen_shannon(logits[i:i + 1], ids[i:i + 1], probs[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(jensen_shannon(logits, ids, probs, weights), (rows * weights).sum())


@pytest.mark.parametrize("name, cls", [("sft", SFTLoss), ("soft", SoftLabelLoss), ("sft_soft", SFTPlusSoftLoss),
                                       ("jensen_shannon", JensenShannonLoss)])
def test_every_loss_yaml_builds_its_class_and_names_its_kind_of_target(name, cls):
    from tomdistill.data.targets import TargetKind

    loss = instantiate(OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml"))
    assert type(loss) is cls and isinstance(loss, DistillationLoss) and loss.name == name
    kind = loss.target_kind()  # what it trains on (data/targets/): the datamodule and the module ask it
    assert isinstance(kind, TargetKind) and kind.loss is loss
    assert type(kind).__name__ == {"sft": "TokenTargets", "soft": "DistributionTargets",
                                   "sft_soft": "TokensWithDistributionTargets",
                                   "jensen_shannon": "DistributionTargets"}[name]
    assert ("generate" in kind.teacher_modes) != kind.one_prompt_per_scenario  # a scenario's prompt has no answer
    assert loss.hparams()["_target_"].endswith(cls.__name__)


def test_loss_values_are_checked_by_key():
    with pytest.raises(LossError, match=r"loss.temperature=0: expected a number > 0"):
        SoftLabelLoss(temperature=0)
    with pytest.raises(LossError, match=r"loss.soft_weight=-1: expected a number ≥ 0"):
        SFTPlusSoftLoss(soft_weight=-1)


def test_sft_soft_can_leave_the_sampled_action_to_the_soft_part():
    """`loss.sft_answer_token=false`: the action token at the answer position leaves the SFT part (its gradient
    there is the soft part's alone); every other token trains as before."""
    from tomdistill.losses.base import IGNORE_INDEX, LossInputs
    from tomdistill.losses.soft import soft_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(5, 20, requires_grad=True)  # kept positions: answer, motivation ×2, answer, motivation
    targets = torch.tensor([3, 8, 9, 4, 11])
    answer_mask = torch.tensor([True, False, False, True, False])
    ids, probs = torch.tensor([[3, 4], [3, 4]]), torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    inputs = LossInputs(logits, targets, logits[answer_mask], ids, probs, None, answer_mask)
    both, motivation_only = SFTPlusSoftLoss()(inputs), SFTPlusSoftLoss(sft_answer_token=False)(inputs)
    torch.testing.assert_close(both["sft"], torch.nn.functional.cross_entropy(logits, targets))
    torch.testing.assert_close(motivation_only["sft"], torch.nn.functional.cross_entropy(logits[~answer_mask], targets[~answer_mask]))
    torch.testing.assert_close(motivation_only["soft"], soft_cross_entropy(logits[answer_mask], ids, probs, 1.0, None))
    assert not torch.equal(both["sft"], motivation_only["sft"])
    assert IGNORE_INDEX not in targets.tolist()  # the loss masked a copy, not the caller's targets
    grad_answer, = torch.autograd.grad(motivation_only["loss"], logits, retain_graph=True)
    soft_grad, = torch.autograd.grad(motivation_only["soft"], logits)
    torch.testing.assert_close(grad_answer[answer_mask], soft_grad[answer_mask])


@pytest.mark.slow
def test_train_py_trains_the_added_loss_with_per_scenario_examples(tmp_path, teacher):
    result = run_train([*TINY, "loss=jensen_shannon", "trainer.max_steps=2", "trainer.val_check_interval=2",
                        f"data.teacher={teacher}", f"output={tmp_path}/run"], timeout=300)
    check(result)
    done = summary(tmp_path / "run")
    assert done["global_step"] == 2 and math.isfinite(done["final_metrics"]["train/js_loss"])
    assert done["data"]["train_examples"] == done["data"]["train_scenarios"]  # one example per scenario


@pytest.mark.parametrize("search", ["soft_recipe_optuna", "lora_optuna"])
def test_sweeps_suggest_a_losss_own_knobs_only_when_it_is_chosen(search):
    import optuna
    from optuna.distributions import CategoricalDistribution

    from tomdistill.sweeps import loss_knobs

    space = OmegaConf.load(CONF_DIR / "hparams_search" / f"{search}.yaml")
    assert space.hydra.sweeper.custom_search_space == "tomdistill.sweeps.loss_knobs"
    config = OmegaConf.create({"loss": {"name": "soft"}, "loss_search_space": space.loss_search_space})
    study = optuna.create_study()
    suggested = {}
    for loss in ("sft", "soft", "sft_soft"):
        study.enqueue_trial({"loss": loss})
        trial = study.ask()
        trial._suggest("loss", CategoricalDistribution(["sft", "soft", "sft_soft"]))
        loss_knobs(config, trial)
        suggested[loss] = set(trial.params) - {"loss"}
    assert suggested["sft"] == set()  # SFTLoss has neither soft_weight nor temperature
    assert "loss.soft_weight" in suggested["sft_soft"] and "loss.soft_weight" not in suggested["soft"]
    for loss, keys in suggested.items():  # every suggested key is one the chosen loss's YAML has
        fields = OmegaConf.load(CONF_DIR / "loss" / f"{loss}.yaml")
        assert all(key.removeprefix("loss.") in fields for key in keys), (loss, keys)


def test_the_loss_temperature_schedule_moves_from_its_start_to_the_loss_own_and_stays():
    from types import SimpleNamespace

    from tomdistill.callbacks import LossTemperatureSchedule, TemperatureScheduleError
    from tomdistill.losses.soft import SoftLabelLoss

    module = SimpleNamespace(loss=SoftLabelLoss(temperature=1.0))
    schedule = LossTemperatureSchedule(start=2.0, steps=4)
    schedule.on_fit_start(None, module)
    seen = []
    for step in range(7):
        schedule.on_train_batch_start(SimpleNamespace(global_step=step), module, None, step)
        seen.append(module.loss.temperature)
    assert seen == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0, 1.0, 1.0])
    resumed = LossTemperatureSchedule(start=2.0, steps=4)  # a run resumed at step 2 rebuilds the loss at its own T
    module = SimpleNamespace(loss=SoftLabelLoss(temperature=1.0))
    resumed.on_fit_start(None, module)
    resumed.on_train_batch_start(SimpleNamespace(global_step=2), module, None, 0)
    assert module.loss.temperature == pytest.approx(1.5)

    off = SimpleNamespace(loss=SoftLabelLoss(temperature=2.0))
    LossTemperatureSchedule().on_fit_start(None, off)
    LossTemperatureSchedule().on_train_batch_start(SimpleNamespace(global_step=3), off, None, 0)
    assert off.loss.temperature == 2.0  # start null: the loss's own
    with pytest.raises(TemperatureScheduleError, match=r"callbacks\.loss_temperature: start=2\.0, steps=0"):
        LossTemperatureSchedule(start=2.0, steps=0)
    with pytest.raises(TemperatureScheduleError, match="loss 'sft' has no temperature"):
        from tomdistill.losses.sft import SFTLoss
        LossTemperatureSchedule(start=2.0, steps=3).on_fit_start(None, SimpleNamespace(loss=SFTLoss()))


def test_the_soft_loss_is_its_choice_part_plus_its_mass_part_and_each_has_its_temperature():
    from tomdistill.losses.soft import choice_cross_entropy, soft_cross_entropy
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    # row 1: the teacher gives its second action probability 0 (a real action, still part of the mass);
    # the third column is padding (a repeated id, probability 0)
    ids = torch.tensor([[3, 7, 3], [10, 11, 10], [0, 39, 0]])
    probs = torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])

    def by_hand(t, tm):
        p_t, p_m = torch.softmax(logits.double() / t, -1), torch.softmax(logits.double() / tm, -1)
        q = probs.double() ** (1 / t) * (probs > 0)
        q = q / q.sum(-1, keepdim=True)
        first = ids[:, :2]  # the two real actions
        mass_t, mass_m = p_t.gather(-1, first).sum(-1), p_m.gather(-1, first).sum(-1)
        choice = -(q[:, :2] * (p_t.gather(-1, first) / mass_t.unsqueeze(-1)).log()).sum(-1)
        return (t**2 * choice - tm**2 * mass_m.log()).mean()

    for t in (1.0, 2.0):
        # the same temperature for both parts is the plain whole-vocabulary loss
        assert float(soft_cross_entropy(logits, ids, probs, t)) == pytest.approx(float(by_hand(t, t)), abs=1e-5)
        assert float(soft_cross_entropy(logits, ids, probs, t, mass_temperature=t)) == pytest.approx(
            float(by_hand(t, t)), abs=1e-5)
    assert float(soft_cross_entropy(logits, ids, probs, 2.0, mass_temperature=1.0)) == pytest.approx(
        float(by_hand(2.0, 1.0)), abs=1e-5)
    # a student that puts all its mass on the actions pays only the choice part, whatever the mass temperature
    on_actions = torch.full((1, 40), -1e4)
    on_actions[0, 3], on_actions[0, 7] = math.log(0.3), math.log(0.7)
    assert float(soft_cross_entropy(on_actions, ids[:1], probs[:1], 2.0, mass_temperature=1.0)) == pytest.approx(
        4 * float(choice_cross_entropy(on_actions, ids[:1], probs[:1], 2.0)), abs=1e-5)
    weights = torch.tensor([0.2, 0.3, 0.5])
    rows = torch.stack([soft_cross_entropy(logits[i:i + 1], ids[i:i + 1], probs[i:i + 1], 2.0, None, 1.0)
                        for i in range(3)])
    torch.testing.assert_close(soft_cross_entropy(logits, ids, probs, 2.0, weights, 1.0), (rows * weights).sum())
    loss = SoftLabelLoss(temperature=2.0, mass_temperature=1.0)
    assert loss.hparams()["mass_temperature"] == 1.0
    with pytest.raises(LossError, match=r"loss.mass_temperature=0: expected a number > 0"):
        SoftLabelLoss(mass_temperature=0)


def test_the_parts_script_reports_both_parts_and_their_gradients_at_each_temperature():
    """scripts/soft_loss_parts.py on the tiny Llama (docs/findings.md: the first step at temperature 2); that the parts
    add up to the plain loss is test_the_soft_loss_is_its_choice_part_plus_its_mass_part_...'s."""
    import re
    import subprocess
    import sys

    from helpers import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "soft_loss_parts.py"), "--model", "tiny_llama",
                           "--temperatures", "1", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    values = {(t, part): (float(v), float(g)) for t, part, v, g in
              re.findall(r"T (\d): (choice|mass) part ([\d.]+), gradient norm ([\d.]+)", done.stdout)}
    assert set(values) == {("1", "choice"), ("1", "mass"), ("2", "choice"), ("2", "mass")}
    assert all(g > 0 for _, g in values.values())
    assert len(re.findall(r"cosine between the two gradients -?[\d.]+", done.stdout)) == 2
