"""The schema of the `trainer` group: the pytorch_lightning.Trainer arguments the recipe passes on
(training.py: `build_trainer`, which resolves `accelerator`, `precision` and `strategy` first).

The defaults live in conf/trainer/default.yaml (every other trainer/ option starts from it); this class says what
each key is and which values it takes, and refuses the others with one line naming the key, before any data or
model loads (`config_schema.check_config`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .settings_fields import check_choices, expect, is_number, is_whole, setting

NATIVE_BF16 = "bf16-if-native"  # training.py resolves it: bf16-mixed where the hardware computes bf16, else 32-true
# Lightning's own precision names (lightning_fabric.connector._PRECISION_INPUT; tests/test_config_schema.py keeps
# this list equal to it) and the two the recipe resolves (training.resolve_precision)
LIGHTNING_PRECISIONS = (64, 32, 16, "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
                        "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")
PRECISIONS = ("auto", NATIVE_BF16, *LIGHTNING_PRECISIONS)


def devices_expected(devices) -> bool:
    """`trainer.devices`: a count ≥ 1, -1 or `auto` (every visible GPU), or a non-empty list of device indices
    (`[0, 1]` or `"0,1"`)."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, (list, tuple)):
        return len(devices) > 0 and all(is_whole(d, 0) for d in devices)
    text = str(devices).strip()
    return text in ("auto", "-1") or (text.isdigit() and int(text) >= 1) or (
        "," in text and all(part.strip().isdigit() for part in text.split(",") if part.strip()))


def batches_expected(value, whole_minimum: int) -> bool:
    """Lightning's count-or-fraction arguments: a whole number ≥ `whole_minimum` (batches), or a fraction in [0, 1]
    of an epoch's batches."""
    if isinstance(value, float):
        return 0 <= value <= 1
    return is_whole(value, whole_minimum)


@dataclass(frozen=True)
class TrainerSettings:
    """pytorch_lightning.Trainer arguments (the recipe adds callbacks, loggers, plugins and the output directory)."""

    KEY: ClassVar[str] = "trainer"

    accelerator: str = setting("cpu | gpu | auto (the GPU when torch sees one) | any accelerator Lightning knows")
    devices: int | str | list[int] = setting("processes per node: a count, -1 or auto (every visible GPU), or the "
                                             "device indices, e.g. [0, 1]")
    num_nodes: int = setting("nodes (on SLURM: --nodes)")
    strategy: str | dict[str, Any] = setting("a Lightning strategy name (auto), or a config with a _target_ "
                                             "(trainer=ddp, deepspeed_*: src/tomdistill/model/strategy.py)")
    precision: str | int = setting("auto = bf16-mixed on a GPU that has it, else 32-true; bf16-if-native = also on "
                                   "a CPU with AVX512-BF16/AMX; or a Lightning precision", choices=PRECISIONS)
    max_steps: int = setting("optimiser steps; -1 = by max_epochs")
    max_epochs: int | None = setting("epochs; null = as many as max_steps needs, -1 = no limit")
    limit_train_batches: int | float | None = setting("training batches per epoch: a count, or a fraction "
                                                      "(null = all)")
    limit_val_batches: int | float | None = setting("validation batches per round: a count, or a fraction "
                                                    "(null = all)")
    accumulate_grad_batches: int = setting("batches whose gradients add up to one optimiser step")
    gradient_clip_val: float | None = setting("clip the gradient norm to this (null = no clipping)")
    check_val_every_n_epoch: int | None = setting("validate every n epochs; null = every val_check_interval "
                                                  "training batches, across epochs")
    val_check_interval: int | float | None = setting("validate every this many training batches (a whole number), "
                                                     "or this fraction of an epoch (a number in (0, 1])")
    num_sanity_val_steps: int = setting("validation batches run before training (-1 = all, 0 = none)")
    log_every_n_steps: int = setting("log the training metrics every n steps")
    enable_progress_bar: bool = setting("the step progress bar on the console")
    enable_model_summary: bool = setting("print the model summary before training")
    deterministic: bool | str = setting("torch's deterministic algorithms (true, false or warn)")

    def __post_init__(self) -> None:
        key = self.KEY
        expect(isinstance(self.accelerator, str) and bool(self.accelerator), f"{key}.accelerator", self.accelerator,
               "an accelerator name such as cpu, gpu or auto")
        expect(devices_expected(self.devices), f"{key}.devices", self.devices,
               "a count ≥ 1, -1 or auto (every visible GPU), or a list of device indices such as [0,1]")
        expect(is_whole(self.num_nodes, 1), f"{key}.num_nodes", self.num_nodes, "a whole number ≥ 1")
        strategy = self.strategy
        if not isinstance(strategy, str):
            expect(isinstance(strategy, Mapping) and bool(strategy.get("_target_")), f"{key}.strategy", strategy,
                   "a strategy name (auto) or a config with a _target_ (see conf/trainer/)")
        check_choices(self, key)
        expect(is_whole(self.max_steps, -1) and self.max_steps != 0, f"{key}.max_steps", self.max_steps,
               "a whole number ≥ 1 (or -1: by trainer.max_epochs)")
        expect(self.max_epochs is None or (is_whole(self.max_epochs, -1) and self.max_epochs != 0),
               f"{key}.max_epochs", self.max_epochs, "null, -1 (no limit) or a whole number ≥ 1")
        for name in ("limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            expect(value is None or batches_expected(value, 0), f"{key}.{name}", value,
                   "null (all), a whole number ≥ 0 or a fraction in [0, 1]")
        expect(is_whole(self.accumulate_grad_batches, 1), f"{key}.accumulate_grad_batches",
               self.accumulate_grad_batches, "a whole number ≥ 1")
        expect(self.gradient_clip_val is None or (is_number(self.gradient_clip_val) and self.gradient_clip_val >= 0),
               f"{key}.gradient_clip_val", self.gradient_clip_val, "null or a number ≥ 0")
        expect(self.check_val_every_n_epoch is None or is_whole(self.check_val_every_n_epoch, 1),
               f"{key}.check_val_every_n_epoch", self.check_val_every_n_epoch, "null or a whole number ≥ 1")
        interval = self.val_check_interval
        expect(interval is None or batches_expected(interval, 1) and interval != 0, f"{key}.val_check_interval",
               interval, "null, a whole number ≥ 1 (batches) or a fraction in (0, 1] of an epoch")
        expect(is_whole(self.num_sanity_val_steps, -1), f"{key}.num_sanity_val_steps", self.num_sanity_val_steps,
               "a whole number ≥ -1 (-1 = all)")
        expect(is_whole(self.log_every_n_steps, 1), f"{key}.log_every_n_steps", self.log_every_n_steps,
               "a whole number ≥ 1")
        for name in ("enable_progress_bar", "enable_model_summary"):
            value = getattr(self, name)
            expect(isinstance(value, bool), f"{key}.{name}", value, "true or false")
        expect(self.deterministic in (True, False, "warn"), f"{key}.deterministic", self.deterministic,
               "true, false or warn")
