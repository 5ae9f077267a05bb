"""Training callbacks: adapter export (final and best-by-metric), the final student's transfer on evaluation splits
(`SplitAlignment`, the recipe search's objective), checkpoint-on-SIGTERM, divergence, and keeping several ranks in
step (`StepAgreement`)."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .errors import UserError
from . import distributed
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
        # the save is collective: every rank decides on global rank 0's value (ranks' own values can differ in
        # the last bits; one rank saving alone would wait in the gather for ever), as Lightning's ModelCheckpoint
        # agrees its decision across ranks
        value = trainer.strategy.broadcast(None if value is None else float(value), src=0)
        if value is None or not math.isfinite(value):
            return
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


class SplitAlignment(pl.Callback):
    """After training, the final student's `alignment` (metrics/transfer.py) toward the teacher on each of `splits`,
    as evaluate.py measures it after `sample.py sampler.mode=score adapter=...`: the same scenarios
    (`datamodule.evaluation_targets`), exact action probabilities by the same rule, against the base student (the
    adapter disabled). Sets `transfer/alignment/<split>` and `transfer/action_mass/<split>` in the trainer's metrics;
    `transfer/alignment`, the mean over `objective`; `transfer/mass_shortfall`, how far the splits' mass on the
    actions falls below `min_action_mass` (metrics/transfer.py `mass_shortfall`; 0 without one); and
    `transfer/objective`, the alignment less that shortfall (a recipe search's `optimized_metric`). Writes them to
    `path` (JSON). Every rank scores every scenario (ZeRO-3 gathers weights collectively), as in validation."""

    def __init__(self, splits, objective=None, path: str | Path | None = None, min_action_mass: float | None = None):
        from .metrics.transfer import mass_shortfall
        from .scenarios.schema import REPORT_SPLITS

        self.splits = list(splits or [])
        self.objective = list(objective) if objective else list(self.splits)
        self.min_action_mass = None if min_action_mass is None else float(min_action_mass)
        try:  # the floor's rule lives with the shortfall (metrics/transfer.py); refused when built, by key
            mass_shortfall({}, self.min_action_mass)
        except ValueError as err:
            raise TransferSplitsError(f"callbacks.split_alignment.{err}") from None
        unknown = [s for s in self.splits if s not in REPORT_SPLITS]
        if unknown:
            raise TransferSplitsError(f"callbacks.split_alignment.splits: unknown {unknown}; expected some of "
                                      f"{list(REPORT_SPLITS)}")
        unknown = [s for s in self.objective if s not in self.splits]
        if unknown:
            raise TransferSplitsError(f"callbacks.split_alignment.objective {unknown} must be among its splits {self.splits}")
        self.path = Path(path) if path else None
        self.targets: dict[str, list] = {}
        self.results: dict[str, dict] = {}

    def setup(self, trainer: pl.Trainer, module, stage: str) -> None:
        # before training: a split without teacher records fails now, not after the last step
        self.targets = {split: trainer.datamodule.evaluation_targets(split) for split in self.splits}

    def on_train_end(self, trainer: pl.Trainer, module) -> None:
        import numpy as np
        import torch

        from .metrics.propensity import choice_propensity
        from .metrics.transfer import alignment, mass_shortfall

        datamodule = trainer.datamodule
        was_training = module.training
        module.eval()
        try:
            for split in self.splits:
                targets = self.targets[split]
                items = [t.item for t in targets]
                teacher = [choice_propensity(t.teacher_probs) for t in targets]
                with module.base_weights():
                    base, _ = module.score_items(items, datamodule.tokenizer, datamodule.eval_batch_size)
                tuned, masses = module.score_items(items, datamodule.tokenizer, datamodule.eval_batch_size)
                self.results[split] = {"alignment": float(alignment(base, tuned, teacher)),
                                       "action_mass": float(np.mean(masses)), "scenarios": len(targets)}
        finally:
            module.train(was_training)
        metrics = {f"transfer/{name}/{split}": value[name] for split, value in self.results.items()
                   for name in ("alignment", "action_mass")}
        metrics["transfer/alignment"] = float(np.mean([self.results[s]["alignment"] for s in self.objective]))
        metrics["transfer/mass_shortfall"] = mass_shortfall(
            {split: value["action_mass"] for split, value in self.results.items()}, self.min_action_mass)
        metrics["transfer/objective"] = metrics["transfer/alignment"] - metrics["transfer/mass_shortfall"]
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        log.info("transfer after training: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps({"objective": self.objective, "min_action_mass": self.min_action_mass,
                                           "splits": self.results,
                                           "metrics": metrics, "global_step": trainer.global_step}, indent=2))
            partial.replace(self.path)


class TransferSplitsError(ValueError, UserError):
    """`callbacks.split_alignment` names an unknown split, an objective split it does not score, or a
    `min_action_mass` that is not a probability."""


class LossTemperatureSchedule(pl.Callback):
    """The loss's temperature moves linearly from `start` to the configured `loss.temperature` over the first
    `steps` optimizer steps, then stays there. Why (docs/findings.md, the variants search): the same recipe and seed
    left the teacher's average at temperature 2 and not at 1, but temperature 2 to the end broke the public-goods
    answer format; starting hot and ending at 1 tries to keep the first and drop the second (measured once, 2 -> 1
    over 40 of 75 steps: it kept the escape and not the format). Off while `start` is null. A resumed run picks the
    schedule up at its global step."""

    def __init__(self, start: float | None = None, steps: int = 0):
        if start is not None and not (float(start) > 0 and int(steps) >= 1):
            raise TemperatureScheduleError(f"callbacks.loss_temperature: start={start!r}, steps={steps!r}: expected "
                                           "a temperature > 0 and steps ≥ 1 (or start null: off)")
        self.start = None if start is None else float(start)
        self.steps = int(steps)
        self.end: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, module) -> None:
        if self.start is None:
            return
        end = getattr(module.loss, "temperature", None)
        if end is None:
            raise TemperatureScheduleError(f"callbacks.loss_temperature.start={self.start}: loss "
                                           f"{module.loss.name!r} has no temperature")
        self.end = float(end)

    def temperature(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step / self.steps, 1.0)

    def on_train_batch_start(self, trainer: pl.Trainer, module, batch, batch_idx: int) -> None:
        if self.start is not None:
            module.loss.temperature = self.temperature(trainer.global_step)


class TemperatureScheduleError(ValueError, UserError):
    """`callbacks.loss_temperature` with a start that is not a temperature, no steps, or a loss without one."""


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


class TrainingDivergedError(FloatingPointError, UserError):
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
        self.batches = 0  # batches seen: the same count on every rank, unlike the finite losses
        self.strikes = 0

    def on_train_batch_end(self, trainer: pl.Trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if loss is not None else math.nan
        # what decides whether the collective below runs is the same on every rank (the batch count); a rank's
        # own loss only feeds its vote (non-finite losses are stopped by the module itself)
        self.batches += 1
        if self.batches <= self.baseline_steps:
            if math.isfinite(value):
                self.start.append(value)
            return
        baseline = sum(self.start) / len(self.start) if self.start else math.nan
        exploded = math.isfinite(value) and math.isfinite(baseline) and value > self.factor * abs(baseline)
        self.strikes = self.strikes + 1 if exploded else 0
        if trainer.strategy.reduce_boolean_decision(self.strikes >= self.patience, all=False):
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            raise TrainingDivergedError(
                f"training diverged: loss {value:.4g} at global step {trainer.global_step}, batch {batch_idx} is "
                f"{value / abs(baseline):.1f}× its starting level {baseline:.4g} ({self.patience} batch(es) in a row "
                f"above callbacks.divergence.factor={self.factor:g}); lower optim.lr (now {lr:.3g}) and restart, "
                "or resume an earlier checkpoint with ckpt_path=..."
            )

    def state_dict(self) -> dict:
        return {"start": list(self.start), "batches": self.batches, "strikes": self.strikes}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.strikes = list(state.get("start", [])), int(state.get("strikes", 0))
        self.batches = int(state.get("batches", len(self.start)))


class StepAgreement(pl.Callback):
    """Before each training step's forward pass: every rank agrees whether any rank failed to load its batch,
    received SIGTERM or a pre-emption warning, and all act on it together.

    A data error re-raises on the rank that had it and raises `RankFailedError` (naming that rank and
    its error) on the others. A SIGTERM (several ranks) or a pre-emption warning (SIGUSR1 from
    `sbatch --signal`, SIGUSR2 from submitit; any number of ranks) on any rank marks every rank's
    trainer as signalled at this same step, so Lightning stops all of them at the end of it and
    `CheckpointOnSigterm` saves `last.ckpt` there. The signal handlers only set a flag: no collective
    and no checkpoint inside a handler (Lightning's SLURM requeue handler saves inside its handler;
    the recipe turns it off). After a pre-emption the job is requeued by `requeue()` (train.py), and
    the requeued run resumes from `last.ckpt` by itself (`training.resume_path`).
    `sigterm_grace_s`: a rank still running that long after its SIGTERM exits by itself.
    `max_requeues`: a job already restarted this often (SLURM_RESTART_COUNT) is not requeued again, so a
    job pre-empted over and over stops instead of cycling for ever (null: no cap). The config gives it the
    shared `max_requeues` (conf/base.yaml), the cap of every route to a cluster (docs/cluster.md).
    """

    def __init__(self, sigterm_grace_s: float = 60.0, max_requeues: int | None = 3):
        self.sigterm_grace_s = float(sigterm_grace_s)
        self.max_requeues = None if max_requeues is None else int(max_requeues)
        self.sigterm_pending = False
        self.preempt_signal: int | None = None  # the pre-emption warning this rank received
        self.preempted = False  # every rank agreed to stop for a pre-emption
        self._deferred: dict[int, object] = {}  # handlers that were there before (submitit's requeue)
        self._forwarded: set[int] = set()

    def _forward(self, trainer: pl.Trainer, signum: int) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and signum not in self._forwarded:  # the ranks this process started
            self._forwarded.add(signum)
            launcher.kill(signum)

    def on_train_start(self, trainer: pl.Trainer, module) -> None:
        # after Lightning registered its handlers (Trainer._run does that after on_fit_start)
        if threading.current_thread() is not threading.main_thread():
            return

        def on_preempt(signum, frame):
            log.warning("rank %d: %s received (pre-emption): every rank saves and stops at the next step boundary",
                        trainer.global_rank, signal.Signals(signum).name)
            self.preempt_signal = signum
            self._forward(trainer, signum)

        for signum in distributed.PREEMPT_SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous) and type(getattr(previous, "__self__", None)).__module__.startswith("submitit"):
                self._deferred[signum] = previous  # submitit's checkpoint-and-requeue: run after our checkpoint
            signal.signal(signum, on_preempt)
        if trainer.world_size == 1:
            return  # one process: Lightning's own SIGTERM handling is safe
        previous = trainer._signal_connector._original_handlers.get(signal.SIGTERM)

        def on_sigterm(signum, frame):
            log.warning("rank %d: SIGTERM received; every rank stops at the next step boundary", trainer.global_rank)
            self.sigterm_pending = True
            self._forward(trainer, signum)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        if self.sigterm_grace_s > 0:
            distributed.exit_after_sigterm(self.sigterm_grace_s, on_exit=lambda: _kill_launched(trainer))

    def on_train_batch_start(self, trainer: pl.Trainer, module, batch, batch_idx: int) -> None:
        error = batch.get("data_error") if isinstance(batch, dict) else None
        flags = (distributed.SIGTERM_FLAG if self.sigterm_pending else 0) | \
            (distributed.PREEMPT_FLAG if self.preempt_signal is not None else 0)
        if trainer.world_size == 1 and not flags:
            return  # nothing to agree on (a loader error on one rank is raised by the loader itself)
        message = f"{type(error).__name__}: {error}" if error is not None else None
        failures, raised, _ = distributed.agree(message, module.device, flags)
        if failures:
            if error is not None:
                raise error
            raise distributed.RankFailedError(
                f"stopping rank {trainer.global_rank} of {trainer.world_size} at global step {trainer.global_step}: "
                f"another rank could not load its training batch ({distributed.describe(failures)})")
        if (raised[0] or raised[1]) and not trainer.received_sigterm:
            self.preempted = raised[1]
            log.warning("rank %d: stopping at the end of global step %d (%s)", trainer.global_rank,
                        trainer.global_step, "pre-emption" if raised[1] else "SIGTERM")
            trainer._signal_connector.received_sigterm = True

    def requeue(self, trainer: pl.Trainer) -> str:
        """After a pre-emption stop (checkpoint saved): put the job back in the queue, from global rank 0.

        Under submitit (hydra/launcher=slurm) its own checkpoint-and-requeue runs now, deferred from its
        signal (it requeues and exits); under sbatch `scontrol requeue $SLURM_JOB_ID`. Returns what was done.
        """
        if not trainer.is_global_zero:
            return "left to global rank 0"
        restarts = distributed.slurm_restarts()
        if self.max_requeues is not None and restarts >= self.max_requeues:
            return (f"not requeued: the job was restarted {restarts} times already "
                    f"(max_requeues={self.max_requeues}); resume with ckpt_path=last")
        signum = self.preempt_signal or signal.SIGUSR2
        deferred = self._deferred.get(signum) or next(iter(self._deferred.values()), None)
        if deferred is not None:
            deferred(signum, None)  # submitit: pickles the resubmission, requeues, exits
            return "requeued by submitit"
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}".rstrip("_")
        job = job or os.environ.get("SLURM_JOB_ID")
        if not job:
            return "not a SLURM job: not requeued"
        return f"requeued SLURM job {job}" if distributed.requeue_slurm_job(job) else f"requeue of {job} failed"


def _kill_launched(trainer: pl.Trainer) -> None:
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None:
        launcher.kill(signal.SIGKILL)


class StepProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's rich progress bar without its "Epoch 1/-2" when training is bounded by steps (max_epochs -1:
    rich_progress.py prints max_epochs - 1): the epoch and the step budget instead."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (max_steps {self.trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"
