"""What every loss declares and what it is given (see `__init__.py`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..settings_fields import setting
from ..errors import UserError

IGNORE_INDEX = -100  # a position without a next-token target (prompt, padding)


class LossError(ValueError, UserError):
    """A loss configured with values it cannot train with; the message names the key."""


@dataclass
class LossInputs:
    """The logits a loss reads, from one forward pass over a batch.

    `logits`: (kept positions, vocab), the positions the loss asked for, row-major over the batch.
    `token_targets`: (kept positions,) the next token at each of them (IGNORE_INDEX where none); with token targets.
    `answer_logits`: (rows with an answer position, vocab); with distribution targets.
    `soft_ids`, `soft_probs`: (those rows, K) each action's first token and the teacher's probability of it,
    padded with probability 0. `weights`: (those rows,) a rank's shard weights of a global batch, or None.
    `answer_mask`: (kept positions,) True at the answer positions; with distribution targets.
    """

    logits: torch.Tensor
    token_targets: torch.Tensor | None = None
    answer_logits: torch.Tensor | None = None
    soft_ids: torch.Tensor | None = None
    soft_probs: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None


NAME_HELP = "the loss's name, as messages and the adapter's training record give it"


@dataclass
class DistillationLoss:
    """Base of the losses: `__call__(inputs) -> {"loss": total, <part>: value, ...}` (parts are logged as
    `train/<part>_loss`)."""

    name: str = setting(NAME_HELP, default="")
    # what the loss trains on: a tomdistill.data.targets.Targets class, by its dotted path (data/ sits above
    # losses/: the recipe imports it, the loss only names it). It builds the examples and fills `LossInputs`.
    targets: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for key in ("temperature", "mass_temperature"):
            value = getattr(self, key, None)
            if value is not None and not value > 0:
                raise LossError(f"loss.{key}={value!r}: expected a number > 0")
        weight = getattr(self, "soft_weight", None)
        if weight is not None and not weight >= 0:
            raise LossError(f"loss.soft_weight={weight!r}: expected a number ≥ 0")

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def target_kind(self, **settings):
        """The kind of target this loss trains on (`targets`), configured with `settings` (data/targets/base.py)."""
        from hydra.utils import get_class

        try:
            kind = get_class(self.targets)
        except Exception as err:  # noqa: BLE001 - hydra raises ImportError or ValueError by what is missing
            raise LossError(f"loss={self.name}: its targets {self.targets!r} cannot be imported ({err})") from err
        return kind(self, **settings)

    def hparams(self) -> dict:
        """The configuration, as plain values (checkpoints and loggers store it)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **dataclasses.asdict(self)}
