"""Test-only fault injection: make one rank fail at one step, to test that every rank stops with it.

Set `TOMDISTILL_TEST_FAULT=KIND@RANK:STEP` (e.g. `nan@1:1`) in a test's environment; unset (always, in
real runs) nothing happens. KIND is one of
- `nan`: that rank's training loss becomes NaN at that global step (`LoRADistillModule.training_step`);
- `data`: that rank's training loader raises a `DataError` instead of its batch of that index (`ResumableDataLoader`);
- `hang`: that rank's training loader blocks for good instead (a stuck rank: the others wait in a collective).
Used by tests/faults/test_multirank.py only.
"""
from __future__ import annotations

import os

VARIABLE = "TOMDISTILL_TEST_FAULT"
KINDS = ("nan", "data", "hang")


def injected(kind: str, rank: int, step: int) -> bool:
    """Whether the test environment asks for fault `kind` on `rank` at `step`."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return False
    wanted, _, where = spec.partition("@")
    if wanted not in KINDS:
        raise ValueError(f"{VARIABLE}={spec!r}: the kind must be one of {KINDS}")
    fault_rank, _, fault_step = where.partition(":")
    return wanted == kind and int(fault_rank) == rank and int(fault_step) == step
