"""Transfer metrics: how far fine-tuning moved the student toward the teacher (pure functions).

- `improvement` (the paper's): per scenario the signed gap closure
  `(p_base - p_tuned) / (p_base - p_teacher)`; > 1 = overshoot. Undefined (NaN) where the
  base–teacher gap is below `epsilon`; aggregated as the plain mean of the defined scenarios.
- `alignment` (ours, the headline): `1 - Σ|p_tuned - p_teacher| / Σ|p_base - p_teacher|`:
  1 = indistinguishable from the teacher, 0 = no change, negative = moved away; no credit for
  overshoot, and small gaps cannot dominate.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from tomdistill.scenarios.catalogue import REPORT_SPLITS

DEFAULT_EPSILON = 0.01
# the transfer metrics every table, summary, log and study reports, in report order (the paper's first);
# a new metric is a per-scenario function below, a `scenario_transfer` entry and a name here
TRANSFER_METRICS = ("improvement", "alignment")
HEADLINE_METRIC = "alignment"  # the README's and the study table's first


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


# A public-goods number is reported only where the students put at least this much of their answer, on average over
# the split's public-goods scenarios, on the allowed amounts (score mode: `action_mass`; sampled answers: the share
# that parsed): below it the student mostly answers outside the format and its propensity is read from a distribution
# it hardly answers with (issue 49; docs/metrics.md, "Public goods off format"). `records.MIN_MASS`, the per-scenario
# warning, uses the same level.
MIN_FORMAT_MASS = 0.5


def format_verdict(masses: Mapping[str, float | None], floor: float = MIN_FORMAT_MASS) -> dict:
    """Whether a public-goods number may be shown: {off_format, action_mass: {role: mass}, reason (if off)}.

    `masses`: each student's mean mass on the answers (None: not known, e.g. score records without
    `action_mass`; it neither passes nor fails). Off format when any known mass is below `floor` (0.5 passes)."""
    known = {role: float(mass) for role, mass in masses.items() if mass is not None and not math.isnan(float(mass))}
    short = {role: mass for role, mass in known.items() if mass < floor}
    verdict = {"off_format": bool(short), "action_mass": known}
    if short:
        verdict["reason"] = (f"mean mass on the public-goods answers below {floor:g}: "
                             + ", ".join(f"{role} {mass:.2f}" for role, mass in short.items()))
    return verdict


def mass_shortfall(action_mass: dict[str, float], floor: float | None) -> float:
    """How far each split's mean mass on the actions falls below `floor`, summed over the splits (0 without a
    floor). A recipe search subtracts it from its objective: a student that stopped answering a split in the
    actions' format (mass near 0) is scored on a distribution it hardly ever answers with (docs/findings.md:
    temperature 2 and public goods), so its alignment there must not rank it."""
    if floor is None:
        return 0.0
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"min_action_mass={floor}: expected a probability in (0, 1]")
    return float(sum(max(0.0, floor - float(mass)) for mass in action_mass.values()))


# --- per scenario and per group --------------------------------------------------------------
# Scenario propensities are on the [0, 1] scale (public goods: mean donation / endowment). Both
# per-scenario metrics are ratios of differences, so for public goods they equal the paper's
# values on mean donations, and sums over a group stay in one unit.

GROUP_KINDS = ("overall", "split", "game", "context", "scenario")
SPLIT_ORDER = REPORT_SPLITS


def scenario_transfer(p_teacher, p_base, p_tuned, epsilon: float = DEFAULT_EPSILON) -> dict[str, np.ndarray]:
    """Per-scenario gap, whether `improvement` is defined (|gap| ≥ epsilon), improvement and alignment."""
    p_teacher, p_base, p_tuned = (np.asarray(x, dtype=float) for x in (p_teacher, p_base, p_tuned))
    gap = p_base - p_teacher
    return {
        "gap": gap,
        "defined": np.abs(gap) >= epsilon,
        "improvement": improvement_per_scenario(p_base, p_tuned, p_teacher, epsilon),
        "alignment": alignment_per_scenario(p_base, p_tuned, p_teacher),
    }


def group_masks(scenarios) -> tuple[list[dict], np.ndarray]:
    """The groups every aggregate is reported for, and a boolean (groups × scenarios) membership matrix.

    `scenarios` is a DataFrame with columns split, game, context (one row per scenario). Groups:
    overall; each split; each game and each context within a split; each scenario alone.
    """
    split = scenarios["split"].to_numpy()
    game = scenarios["game"].to_numpy()
    context = scenarios["context"].to_numpy()
    present = [s for s in SPLIT_ORDER if s in set(split)] + sorted(set(split) - set(SPLIT_ORDER))
    groups, masks = [{"kind": "overall", "split": "overall", "group": "overall"}], [np.ones(len(split), bool)]
    for s in present:
        in_split = split == s
        groups.append({"kind": "split", "split": s, "group": s})
        masks.append(in_split)
        for kind, column in (("game", game), ("context", context)):
            for name in dict.fromkeys(column[in_split]):
                groups.append({"kind": kind, "split": s, "group": name})
                masks.append(in_split & (column == name))
    for i in range(len(split)):
        groups.append({"kind": "scenario", "split": split[i], "group": f"{game[i]}/{context[i]}"})
        masks.append(np.arange(len(split)) == i)
    return groups, np.stack(masks)


def group_transfer(p_teacher, p_base, p_tuned, masks, defined) -> dict[str, np.ndarray]:
    """Aggregate improvement (mean of the defined scenarios) and alignment (distance ratio) per group.

    The propensity arrays may carry leading axes (e.g. bootstrap resamples × scenarios); `defined`
    (scenarios,) is fixed — taken from the point estimate — so a resample cannot change which
    scenarios a mean is over. Returns arrays (..., groups), NaN where a group has nothing to average.
    """
    masks = np.asarray(masks, dtype=float)
    out = group_transfer_weighted(p_teacher, p_base, p_tuned, masks, defined)
    out["n_defined"] = (masks * np.asarray(defined, dtype=bool)).sum(-1).astype(int)
    out["n_scenarios"] = masks.sum(-1).astype(int)
    return out


def group_transfer_weighted(p_teacher, p_base, p_tuned, weights, defined) -> dict[str, np.ndarray]:
    """Improvement and alignment per group with scenario multiplicities `weights` (..., groups,
    scenarios): 0/1 masks for the point estimate and the answer bootstrap, resampled counts for the
    scenario bootstrap. Propensities (..., scenarios) broadcast against the weights."""
    p_teacher, p_base, p_tuned = (np.asarray(x, dtype=float)[..., None, :] for x in (p_teacher, p_base, p_tuned))
    weights = np.asarray(weights, dtype=float)
    defined = np.asarray(defined, dtype=bool)
    gap = p_base - p_teacher
    with np.errstate(divide="ignore", invalid="ignore"):
        per_scenario = np.where(defined, (p_base - p_tuned) / np.where(defined, gap, 1.0), 0.0)
        used = weights * defined
        n_defined = used.sum(-1)
        improvement_mean = np.where(n_defined > 0, (used * per_scenario).sum(-1) / np.maximum(n_defined, 1), np.nan)
        before = (weights * np.abs(gap)).sum(-1)
        after = (weights * np.abs(p_tuned - p_teacher)).sum(-1)
        alignment_ratio = np.where(before > 0, 1.0 - after / np.where(before > 0, before, 1.0), np.nan)
    # A resample whose base–teacher gap hits exactly 0 in a defined scenario divides by zero: that
    # resample has no improvement value (NaN), rather than ±inf dominating the interval.
    improvement_mean = np.where(np.isfinite(improvement_mean), improvement_mean, np.nan)
    return {"improvement": improvement_mean, "alignment": alignment_ratio}


def distance_shares(scenarios: pd.DataFrame, by: str = "game") -> pd.DataFrame:
    """Where each split's remaining distance to the teacher lies: per split and `by` group, Σ|p_tuned − p_teacher|,
    its share of the split's sum, Σ|p_base − p_teacher| and the group's alignment. `alignment` weighs every
    scenario's base gap, so a split can read low because one game kept its gap (docs/findings.md: the held-out
    context's error is the coordination games); this says which.

    `scenarios`: one row per scenario with split, `by`, p_teacher, p_base, p_tuned (Evaluation.scenarios)."""
    missing = {"split", by, "p_teacher", "p_base", "p_tuned"} - set(scenarios.columns)
    if missing:
        raise ValueError(f"distance_shares: the scenario table lacks {sorted(missing)}")
    frame = scenarios.assign(remaining=(scenarios["p_tuned"] - scenarios["p_teacher"]).abs(),
                             base_distance=(scenarios["p_base"] - scenarios["p_teacher"]).abs())
    table = frame.groupby(["split", by], sort=False).agg(
        n_scenarios=("remaining", "size"), remaining=("remaining", "sum"), base_distance=("base_distance", "sum")
    ).reset_index()
    split_total = table.groupby("split", sort=False)["remaining"].transform("sum")
    with np.errstate(divide="ignore", invalid="ignore"):
        table["share_of_split"] = np.where(split_total > 0, table["remaining"] / split_total, np.nan)
        table["alignment"] = np.where(table["base_distance"] > 0, 1.0 - table["remaining"] / table["base_distance"],
                                      np.nan)
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return table.sort_values("split", key=lambda c: c.map(lambda s: order.get(s, len(order))), kind="stable",
                             ignore_index=True)
