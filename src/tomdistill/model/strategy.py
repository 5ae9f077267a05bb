"""DeepSpeed for the recipe: Lightning's `DeepSpeedStrategy` with four things made right (docs/design.md,
"DeepSpeed on GPUs and CPUs").

1. DeepSpeed's device follows the resolved Lightning accelerator (`use_deepspeed_accelerator`, called where
   the strategy is built). DeepSpeed picks its backend once, when first asked, from `DS_ACCELERATOR` or by
   probing CUDA; nothing here sets it at import, so importing tomdistill never points a GPU run at the CPU.
2. Resuming reads DeepSpeed's checkpoint files only if `torch.load(weights_only=True)` accepts them
   (`check_deepspeed_checkpoint`): DeepSpeed itself loads them with `weights_only=False`.
3. The batch's loss targets stay fp32 (`DeepSpeedTargetsPrecision`): Lightning's DeepSpeed precision casts
   every float tensor of a batch to bf16.
4. On CPU (`CPUDeepSpeedStrategy`, so CI runs the real ZeRO-2 and ZeRO-3 code with gloo): Lightning's
   strategy refuses any accelerator but CUDA, so the subclass skips the CUDA check (it calls the DDP parent's
   `setup_environment`), skips the device-index validation (CPU devices have no index), and reports
   `cpu:<local_rank>` as the root device, as DeepSpeed expects one device per rank.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.plugins.precision import DeepSpeedPrecision
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy

from ..errors import UserError

log = logging.getLogger(__name__)


class DeepSpeedAcceleratorError(RuntimeError, UserError):
    """DeepSpeed already chose another device backend in this process than the run's accelerator."""


def use_deepspeed_accelerator(accelerator: str) -> str:
    """Point DeepSpeed at the run's device: `cpu` for Lightning's cpu accelerator, `cuda` otherwise. Sets
    `DS_ACCELERATOR` (the ranks Lightning starts inherit it) before DeepSpeed is asked; if DeepSpeed was asked
    already in this process and chose the other backend, refuses (its modules keep what they were given)."""
    wanted = "cpu" if accelerator == "cpu" else "cuda"
    inherited = os.environ.get("DS_ACCELERATOR")
    if inherited not in (None, wanted):
        log.warning("DS_ACCELERATOR=%s in the environment, but the run's accelerator is %s: DeepSpeed uses %s",
                    inherited, accelerator, wanted)
    os.environ["DS_ACCELERATOR"] = wanted
    chosen = getattr(sys.modules.get("deepspeed.accelerator.real_accelerator"), "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != wanted:
        raise DeepSpeedAcceleratorError(
            f"trainer.accelerator={accelerator}: DeepSpeed already runs on {chosen.device_name()} in this process "
            f"(it was used before the strategy was built); start a new process with DS_ACCELERATOR={wanted} or unset")
    return wanted


class DeepSpeedTargetsPrecision(DeepSpeedPrecision):
    """Lightning's `DeepSpeedPrecision.convert_input` casts every float tensor of a batch to the model's dtype.
    A batch's float tensors here are only the loss's targets and example weights (`soft_probs`, `weight`: no
    layer reads them; ids and masks are integers): in bf16 they round (0.761 -> 0.7617, a distribution summing
    to 1.00098, a weight 0.6667 -> 0.6680), so ZeRO would train on other targets than DDP. They stay as given."""

    def convert_input(self, data: Any) -> Any:
        return data


# What DeepSpeed pickles into a ZeRO checkpoint besides tensors and plain containers (its optimizer states; found
# with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints of DeepSpeed 0.19):
# plain data holders, constructed from their recorded fields. Anything else makes the checkpoint refused.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_checkpoint_globals() -> list:
    import importlib

    found = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attribute = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not allowed
            continue
    return found


def check_deepspeed_checkpoint(directory: str | Path) -> None:
    """Every file DeepSpeed would read from the checkpoint `directory` loads with `torch.load(weights_only=True)`
    (memory-mapped: no tensor data is read), with only DeepSpeed's own data classes allowed besides tensors and
    containers; otherwise `pickle.UnpicklingError` naming the file. Every rank checks every file, so all ranks
    come to the same answer without a collective."""
    files = sorted(p for p in Path(directory).rglob("*.pt") if p.is_file())
    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # an old, non-zip file cannot be mapped: read it whole
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                # torch's message: a paragraph on weights_only, then the global it refused
                lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
                reason = lines[0].split("error:", 1)[-1].split(" was not an allowed")[0].split(" whose module")[0]
                reason = reason.strip() if lines else "a pickled object"
                raise pickle.UnpicklingError(f"{path}: {reason} (a DeepSpeed checkpoint may hold tensors, containers "
                                             "and DeepSpeed's own data classes only)") from err


class SafeDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy`, resuming only from checkpoints that pass `check_deepspeed_checkpoint`
    unless `weights_only=False` is asked for explicitly (train.py always asks for True)."""

    strategy_name = "deepspeed_safe"

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is not False and Path(checkpoint_path).is_dir():
            check_deepspeed_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)


class CPUDeepSpeedStrategy(SafeDeepSpeedStrategy):
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


def deepspeed_strategy(config: str, accelerator: str = "gpu", precision: str | None = None,
                       **options) -> DeepSpeedStrategy:
    """conf/trainer/deepspeed_*.yaml: `SafeDeepSpeedStrategy` on GPUs, `CPUDeepSpeedStrategy` on CPU, with DeepSpeed
    pointed at that device; `accelerator` and `precision` are the resolved ones, given by the recipe (the batch's
    targets stay fp32 under any precision)."""
    if not Path(config).exists():
        raise ValueError(f"DeepSpeed config {config} not found (trainer.strategy.config)")
    use_deepspeed_accelerator(accelerator)
    strategy = CPUDeepSpeedStrategy if accelerator == "cpu" else SafeDeepSpeedStrategy
    plugin = DeepSpeedTargetsPrecision(precision) if precision is not None else None
    return strategy(config=str(config), precision_plugin=plugin, **options)
