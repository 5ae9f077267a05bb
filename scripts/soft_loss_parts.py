"""The soft loss's two parts at the first step: how much of its gradient is the choice, how much the mass.

The whole-vocabulary soft loss is the choice among the actions plus the mass on them (`losses/soft.py`). At the
first step (LoRA's B = 0, so only B has a gradient) this script computes, on the demo's training batch (the 16
in-sample scenarios, `business` held out, the oracle teacher's exact probabilities; `bench.soft_step.demo_batch`),
each part's value and the norm of its gradient at each temperature, and the cosine between the two gradients:
what a higher temperature changes in the first update (docs/findings.md: temperature 2 left the average).

    python scripts/soft_loss_parts.py [--targets all-linear|attention] [--temperatures 1 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bench package sits at the repository root, beside scripts/

from bench.common import machine, model_config, set_threads  # noqa: E402
from bench.soft_step import ATTENTION, demo_batch  # noqa: E402
from tomdistill.losses import SoftLabelLoss  # noqa: E402
from tomdistill.losses.soft import action_mass_loss, choice_cross_entropy  # noqa: E402
from tomdistill.model.lora_module import LoRADistillModule  # noqa: E402


@dataclass
class OnePart(SoftLabelLoss):
    """The soft loss's choice part or mass part alone, scaled by T² as in the loss."""
    part: str = "choice"

    def __call__(self, inputs):
        t = self.temperature
        if self.part == "choice":
            value = choice_cross_entropy(inputs.answer_logits, inputs.soft_ids, inputs.soft_probs, t, inputs.weights)
        else:
            value = action_mass_loss(inputs.answer_logits, inputs.soft_ids, t, inputs.weights)
        return {"loss": value * t**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--targets", default="all-linear", choices=["all-linear", "attention"])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    args = parser.parse_args()
    set_threads(0)
    print(machine())
    batch = demo_batch(args.model)
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": None, "cache_frozen_layers": False,
            "target_modules": ATTENTION if args.targets == "attention" else "all-linear"}
    torch.manual_seed(0)
    module = LoRADistillModule(model_config(args.model), lora, {"lr": 2e-3}, SoftLabelLoss(),
                               cache_dir=str(ROOT / ".cache"), shared_prefix=True)
    params = [p for p in module.parameters() if p.requires_grad]
    for t in args.temperatures:
        grads = {}
        for part in ("choice", "mass"):
            module.loss = OnePart(temperature=t, part=part)
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = module.compute_losses(batch)["loss"]
            loss.backward()
            grads[part] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
            print(f"T {t:g}: {part} part {loss.item():.3f}, gradient norm {grads[part].norm().item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        cosine = grads["choice"] @ grads["mass"] / grads["choice"].norm() / grads["mass"].norm()
        print(f"T {t:g}: cosine between the two gradients {cosine.item():.3f}")


if __name__ == "__main__":
    main()
