"""Training losses as components: `conf/loss/<name>.yaml` names a class here (`_target_`), Hydra builds it.

A loss owns its maths and names the kind of target it trains on (`DistillationLoss.targets`, a class in
`tomdistill/data/targets/`): token targets (sft), the teacher's choice distribution at the answer position
(soft, jensen_shannon), or both (sft_soft). The kind builds the examples and the loss's `LossInputs`, so the
datamodule and the LightningModule ask it instead of branching on the loss.
Adding a loss is one module here and one YAML in `conf/loss/` (see `jensen_shannon.py`); a loss that needs a
new kind of target adds one module under `data/targets/` (tests/test_target_kinds.py).
"""
from .base import DistillationLoss, LossError, LossInputs
from .jensen_shannon import JensenShannonLoss
from .sft import SFTLoss
from .sft_soft import SFTPlusSoftLoss
from .soft import SoftLabelLoss, soft_cross_entropy

__all__ = ["DistillationLoss", "JensenShannonLoss", "LossError", "LossInputs", "SFTLoss", "SFTPlusSoftLoss",
           "SoftLabelLoss", "soft_cross_entropy"]
