"""Transfer metrics: how far fine-tuning moved the student toward the teacher (pure functions).

- `improvement` (the paper's): per scenario the signed gap closure
  `(p_base - p_tuned) / (p_base - p_teacher)`; > 1 = overshoot. Undefined (NaN) where the
  base–teacher gap is below `epsilon`; aggregated as the plain mean of the defined scenarios.
- `alignment` (ours, the headline): `1 - Σ|p_tuned - p_teacher| / Σ|p_base - p_teacher|`:
  1 = indistinguishable from the teacher, 0 = no change, negative = moved away; no credit for
  overshoot, and small gaps cannot dominate.
"""
from __future__ import annotations

import numpy as np

DEFAULT_EPSILON = 0.01


def improvement_per_scenario(p_base, p_tuned, p_teacher, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    p_base, p_tuned, p_teacher = (np.asarray(x, dtype=float) for x in (p_base, p_tuned, p_teacher))
    gap = p_base - p_teacher
    defined = np.abs(gap) >= epsilon
    out = np.full(gap.shape, np.nan)
    np.divide(p_base - p_tuned, gap, out=out, where=defined)
    return out


def improvement(p_base, p_tuned, p_teacher, epsilon: float = DEFAULT_EPSILON) -> float:
    """Plain mean of the defined per-scenario gap closures (NaN when none is defined)."""
    values = improvement_per_scenario(p_base, p_tuned, p_teacher, epsilon)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def alignment_per_scenario(p_base, p_tuned, p_teacher) -> np.ndarray:
    p_base, p_tuned, p_teacher = (np.asarray(x, dtype=float) for x in (p_base, p_tuned, p_teacher))
    before = np.abs(p_base - p_teacher)
    after = np.abs(p_tuned - p_teacher)
    out = np.full(before.shape, np.nan)
    np.divide(after, before, out=out, where=before > 0)
    return 1.0 - out


def alignment(p_base, p_tuned, p_teacher) -> float:
    """1 - Σ|p_tuned - p_teacher| / Σ|p_base - p_teacher| over the scenarios (NaN if Σ gap is 0)."""
    p_base, p_tuned, p_teacher = (np.asarray(x, dtype=float) for x in (p_base, p_tuned, p_teacher))
    before = np.abs(p_base - p_teacher).sum(axis=-1)
    after = np.abs(p_tuned - p_teacher).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, 1.0 - after / np.where(before > 0, before, 1.0), np.nan).item() if np.ndim(before) == 0 else np.where(before > 0, 1.0 - after / np.where(before > 0, before, 1.0), np.nan)
