"""Training callbacks: adapter export (final and best-by-metric) and checkpoint-on-SIGTERM."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .model.loading import tag_adapter

log = logging.getLogger(__name__)


class AdapterExport(pl.Callback):
    """Saves the adapter (peft format) at the end of training, and the best one by `monitor`.

    Both saves are collective (ZeRO-3 gathers the partitioned LoRA weights on every rank), so
    they run in hooks that every rank reaches, before the strategy tears down.
    """

    def __init__(self, final_dir: str | Path, best_dir: str | Path | None, base_identity: str,
                 monitor: str = "val/alignment", mode: str = "max", training: dict | None = None):
        self.final_dir, self.best_dir = Path(final_dir), Path(best_dir) if best_dir else None
        self.base_identity, self.monitor, self.mode = base_identity, monitor, mode
        self.training = dict(training or {})  # what the adapter was trained on; written beside it
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.exported = False  # the final adapter of this fit has been written

    def _save(self, trainer: pl.Trainer, module, directory: Path, extra: dict) -> None:
        module.save_adapter(directory)
        if trainer.is_global_zero:
            training = {**self.training, "steps": trainer.global_step}
            tag_adapter(directory, self.base_identity, {**extra, "training": training})

    def on_validation_end(self, trainer: pl.Trainer, module) -> None:
        if self.best_dir is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best_score is None or (value > self.best_score if self.mode == "max" else value < self.best_score)
        if better:
            self.best_score, self.best_step = value, trainer.global_step
            self._save(trainer, module, self.best_dir, {self.monitor: value, "global_step": trainer.global_step})

    def on_train_end(self, trainer: pl.Trainer, module) -> None:
        self.export_final(trainer, module)

    def export_final(self, trainer: pl.Trainer, module) -> None:
        self._save(trainer, module, self.final_dir, {"global_step": trainer.global_step})
        self.exported = True

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")


class CheckpointOnSigterm(pl.Callback):
    """On SIGTERM (SLURM pre-emption, `scancel`), save `last.ckpt` before the process exits.

    Lightning turns SIGTERM into a `SIGTERMException` raised on every rank after the current
    batch; this saves a resumable checkpoint there (`ckpt_path=last` picks it up).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.saved = False

    def on_exception(self, trainer: pl.Trainer, module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not self.saved:
            trainer.save_checkpoint(str(self.path))
            self.saved = True
            log.warning("SIGTERM: checkpoint saved to %s at global step %d", self.path, trainer.global_step)


class TrainingDivergedError(FloatingPointError):
    """The training loss exploded (a learning rate that is too high); the message names the step."""


class StopOnDivergence(pl.Callback):
    """Stops training when the loss explodes relative to where it started.

    The baseline is the mean training loss of the first `baseline_steps` batches (default 1: the
    loss before the adapter has moved; a blow-up inside a longer window would hide in it); when the loss
    exceeds `factor` × that baseline on `patience` consecutive batches, training stops with a
    `TrainingDivergedError` naming the step, the batch and the learning rate (no adapter is exported:
    `AdapterExport` runs at the end of a finished fit only). Non-finite losses are stopped at once by
    the module itself (`LoRADistillModule._check_finite`). The decision is taken on every rank
    together, so DDP/DeepSpeed ranks never wait on one that stopped.
    """

    def __init__(self, factor: float = 10.0, baseline_steps: int = 1, patience: int = 2):
        if factor <= 1 or baseline_steps < 1 or patience < 1:
            raise ValueError("callbacks.divergence: factor must be > 1, baseline_steps and patience ≥ 1")
        self.factor, self.baseline_steps, self.patience = float(factor), int(baseline_steps), int(patience)
        self.start: list[float] = []
        self.strikes = 0

    def on_train_batch_end(self, trainer: pl.Trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            return  # the module raises on non-finite losses itself
        if len(self.start) < self.baseline_steps:
            self.start.append(value)
            return
        baseline = sum(self.start) / len(self.start)
        self.strikes = self.strikes + 1 if value > self.factor * abs(baseline) else 0
        if trainer.strategy.reduce_boolean_decision(self.strikes >= self.patience, all=False):
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            raise TrainingDivergedError(
                f"training diverged: loss {value:.4g} at global step {trainer.global_step}, batch {batch_idx} is "
                f"{value / abs(baseline):.1f}× its starting level {baseline:.4g} ({self.patience} batch(es) in a row "
                f"above callbacks.divergence.factor={self.factor:g}); lower optim.lr (now {lr:.3g}) and restart, "
                "or resume an earlier checkpoint with ckpt_path=..."
            )

    def state_dict(self) -> dict:
        return {"start": list(self.start), "strikes": self.strikes}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.strikes = list(state.get("start", [])), int(state.get("strikes", 0))
