"""DeepSpeed on CPU: a small `DeepSpeedStrategy` subclass, used only when the accelerator is CPU.

Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA, yet DeepSpeed itself runs
ZeRO-2 and ZeRO-3 on CPU (`DS_ACCELERATOR=cpu`, gloo). This subclass changes exactly three
things, so CI exercises the real ZeRO code path (partitioned parameters, gathered saves):
1. `setup_environment` skips the CUDA check (it calls the DDP parent's, which sets up the
   device and then calls `setup_distributed`);
2. `setup_distributed` skips the device-index validation (CPU devices have no index);
3. `root_device` is `cpu:<local_rank>`, as DeepSpeed expects one device per rank.
On GPUs the recipe uses Lightning's own `DeepSpeedStrategy` unchanged.
"""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from lightning_fabric.utilities.seed import reset_seed


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # not DeepSpeedStrategy's: that one insists on CUDA

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def deepspeed_strategy(config: str, accelerator: str = "gpu", **options) -> DeepSpeedStrategy:
    """conf/trainer/deepspeed_*.yaml: Lightning's `DeepSpeedStrategy` on GPUs, `CPUDeepSpeedStrategy` on CPU
    (`accelerator` is the resolved one, given by the recipe)."""
    from pathlib import Path

    if not Path(config).exists():
        raise ValueError(f"DeepSpeed config {config} not found (trainer.strategy.config)")
    strategy = CPUDeepSpeedStrategy if accelerator == "cpu" else DeepSpeedStrategy
    return strategy(config=str(config), **options)
