"""What a loss trains on, by kind: each kind builds its training examples, plans its batches and tells the
student's forward pass which positions to keep and what to hand the loss.

A loss names its kind (`DistillationLoss.targets`, a dotted path to a `TargetKind` class); the datamodule and the
LightningModule only ask it. The kinds shipped:
- `tokens.TokenTargets` (loss=sft): one example per sampled teacher answer, next-token targets on the answer turn;
- `distribution.DistributionTargets` (loss=soft, jensen_shannon): one example per scenario, the teacher's choice
  distribution at the answer position, the global scenario batch split across ranks;
- `tokens_with_distribution.TokensWithDistributionTargets` (loss=sft_soft): both, from one forward pass over the
  sampled answers.
A new kind is a subclass of `TargetKind` in its own module, named by its loss (tests/test_target_kinds.py shows one).
"""
from .base import TARGET_KEYS, TEXT_TARGETS, TargetKind, build_target_kind

__all__ = ["TARGET_KEYS", "TEXT_TARGETS", "TargetKind", "build_target_kind"]
