"""Training losses as components: `conf/loss/<name>.yaml` names a class here (`_target_`), Hydra builds it.

A loss owns its maths and declares what it needs, so the datamodule and the LightningModule ask it
instead of comparing names (`base.DistillationLoss`):
- `per_scenario`: one example per scenario (the prompt up to `Answer:`), batches of scenarios split
  across ranks; otherwise one example per sampled teacher answer.
- `uses_tokens`: next-token targets on the teacher's sampled completions (needs generate-mode samples).
- `uses_distribution`: the teacher's choice distribution at the answer position.
Adding a loss is one module here and one YAML in `conf/loss/` (see `jensen_shannon.py`).
"""
from .base import DistillationLoss, LossError, LossInputs
from .jensen_shannon import JensenShannonLoss
from .sft import SFTLoss
from .sft_soft import SFTPlusSoftLoss
from .soft import SoftLabelLoss, soft_cross_entropy

__all__ = ["DistillationLoss", "JensenShannonLoss", "LossError", "LossInputs", "SFTLoss", "SFTPlusSoftLoss",
           "SoftLabelLoss", "soft_cross_entropy"]
