"""The schema of `model.lora` (the LoRA adapter) and `optim` (its optimiser), read by model/lora_module.py
(`build_lora_model`, `configure_optimizers`).

The defaults live in conf/train.yaml, the config's one place for them; these classes say what each key is and
which values it takes, and refuse the others with one line naming the key. `config_schema.check_config` builds
them from the composed config before any data or model loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..settings_fields import check_choices, expect, is_number, is_whole, setting

# model.lora.init -> peft's init_lora_weights (model/lora_module.py LORA_INITS maps each name)
LORA_INIT_NAMES = ("lora", "pissa", "lora_ga")
SCHEDULERS = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter trained on the frozen student (peft's LoraConfig)."""

    KEY: ClassVar[str] = "model.lora"

    r: int = setting("rank of the adapter's update matrices")
    alpha: float = setting("scale of the update: alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = setting("dropout on the adapter's input, in [0, 1)")
    use_rslora: bool = setting("rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (peft's use_rslora)")
    init: str = setting("lora: B = 0, the adapter starts as no change; pissa: it starts on the top-r singular "
                        "directions of the weights it adapts; lora_ga: on the top singular directions of the loss's "
                        "gradient for them on the first training batch (LoRA-GA)", choices=LORA_INIT_NAMES)
    target_modules: str | list[str] = setting(
        "the linear modules adapted: all-linear, a regex peft full-matches against module names, or a list of "
        "names, e.g. [q_proj, v_proj]")
    top_layers: int | None = setting("adapt only the top k decoder layers (no backward below them); null = all")
    cache_frozen_layers: bool = setting("with top_layers: compute the frozen layers once per example and reuse "
                                        "their output every step")
    cache_max_mb: float = setting("memory cap of that cache in MiB (examples beyond it are recomputed each step)")

    def __post_init__(self) -> None:
        key = self.KEY
        expect(is_whole(self.r, 1), f"{key}.r", self.r, "a whole number ≥ 1")
        expect(is_number(self.alpha) and self.alpha > 0, f"{key}.alpha", self.alpha, "a number > 0")
        expect(is_number(self.dropout) and 0 <= self.dropout < 1, f"{key}.dropout", self.dropout,
               "a number in [0, 1)")
        expect(isinstance(self.use_rslora, bool), f"{key}.use_rslora", self.use_rslora, "true or false")
        check_choices(self, key)
        targets = self.target_modules
        if not isinstance(targets, str):
            names = list(targets) if isinstance(targets, (list, tuple)) else None
            expect(bool(names) and all(isinstance(n, str) and n for n in names), f"{key}.target_modules", targets,
                   "all-linear or a non-empty list of module names, e.g. [q_proj, v_proj]")
        expect(bool(targets), f"{key}.target_modules", targets, "all-linear, a regex or a list of module names")
        expect(self.top_layers is None or is_whole(self.top_layers, 1), f"{key}.top_layers", self.top_layers,
               "null (every layer) or a whole number ≥ 1")
        expect(isinstance(self.cache_frozen_layers, bool), f"{key}.cache_frozen_layers", self.cache_frozen_layers,
               "true or false")
        expect(is_number(self.cache_max_mb) and self.cache_max_mb >= 0, f"{key}.cache_max_mb", self.cache_max_mb,
               "a number ≥ 0 (MiB)")


@dataclass(frozen=True)
class OptimSettings:
    """AdamW over the adapter's weights and its learning-rate schedule (per optimiser step)."""

    KEY: ClassVar[str] = "optim"

    lr: float = setting("peak learning rate")
    weight_decay: float = setting("AdamW's decoupled weight decay")
    betas: list[float] = setting("AdamW's (beta1, beta2), each in [0, 1)")
    warmup_ratio: float = setting("share of the optimiser steps spent warming up linearly, in [0, 1)")
    scheduler: str = setting("the schedule after the warm-up; wsd: warm-up, constant, then a cosine decay over the "
                             "last decay_ratio of the steps", choices=SCHEDULERS)
    decay_ratio: float = setting("scheduler=wsd: share of the optimiser steps spent decaying, in (0, 1]")
    lora_plus_ratio: float = setting("LoRA+: the B matrices learn at ratio x lr (1 = one lr for the whole adapter)")

    def __post_init__(self) -> None:
        key = self.KEY
        expect(is_number(self.lr) and self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        expect(is_number(self.weight_decay) and self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay,
               "a number ≥ 0")
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        expect(betas is not None and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
               f"{key}.betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        expect(is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio",
               self.warmup_ratio, "a number in [0, 1)")
        check_choices(self, key)
        expect(is_number(self.decay_ratio) and 0 < self.decay_ratio <= 1, f"{key}.decay_ratio", self.decay_ratio,
               "a number in (0, 1]")
        expect(is_number(self.lora_plus_ratio) and self.lora_plus_ratio > 0, f"{key}.lora_plus_ratio",
               self.lora_plus_ratio, "a number > 0 (1 = off)")
