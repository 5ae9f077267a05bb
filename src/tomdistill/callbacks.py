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
                 monitor: str = "val/alignment", mode: str = "max"):
        self.final_dir, self.best_dir = Path(final_dir), Path(best_dir) if best_dir else None
        self.base_identity, self.monitor, self.mode = base_identity, monitor, mode
        self.best_score: float | None = None
        self.best_step: int | None = None

    def _save(self, trainer: pl.Trainer, module, directory: Path, extra: dict) -> None:
        module.save_adapter(directory)
        if trainer.is_global_zero:
            tag_adapter(directory, self.base_identity, extra)

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
        self._save(trainer, module, self.final_dir, {"global_step": trainer.global_step})

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
