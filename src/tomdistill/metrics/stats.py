"""Statistics: the paper's two-proportion z-test and bootstrap confidence intervals (pure functions)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .propensity import SCENARIO_KEYS


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> dict:
    """Two-sided z-test of p2 − p1 with the *unpooled* standard error, as in the paper's Table 1.

    SE = sqrt(p1(1−p1)/n1 + p2(1−p2)/n2); the interval is difference ± z_{(1+confidence)/2}·SE;
    `star` marks p < 1 − confidence.
    """
    if n1 <= 0 or n2 <= 0:
        raise ValueError(f"two_proportion_ztest needs n1, n2 > 0, got {n1}, {n2}")
    p1, p2 = x1 / n1, x2 / n2
    difference = p2 - p1
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    z_crit = stats.norm.ppf(0.5 + confidence / 2)
    if se > 0:
        z = difference / se
        p_value = float(2 * stats.norm.sf(abs(z)))
    else:  # both proportions at 0 or 1: no sampling variation to test against
        z, p_value = (0.0, 1.0) if difference == 0 else (math.copysign(math.inf, difference), 0.0)
    return {
        "p1": p1, "p2": p2, "n1": n1, "n2": n2, "difference": difference,
        "ci_low": difference - z_crit * se, "ci_high": difference + z_crit * se,
        "se": se, "z": z, "p_value": p_value, "star": "*" if p_value < 1 - confidence else "",
    }


def ztest_table(left: pd.DataFrame, right: pd.DataFrame, on: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """Row-wise z-tests between two propensity tables (columns n_C, n_parsed) joined on `on`.

    Only two-action scenarios in generate mode (with counts) are tested.
    """
    joined = left.merge(right, on=on, suffixes=("_1", "_2"))
    joined = joined[joined["n_C_1"].notna() & joined["n_C_2"].notna()]
    rows = []
    for _, r in joined.iterrows():
        test = two_proportion_ztest(int(r["n_C_1"]), int(r["n_parsed_1"]), int(r["n_C_2"]), int(r["n_parsed_2"]), confidence)
        rows.append({**{k: r[k] for k in on}, **test})
    return pd.DataFrame(rows)


def bootstrap_scenario_means(answers: pd.DataFrame, scenarios: pd.DataFrame, n_resamples: int,
                             rng: np.random.Generator) -> np.ndarray:
    """Resampled propensities (n_resamples × scenarios) of one model, in the order of `scenarios`.

    Within each scenario the parsed answers are resampled with replacement (n_parsed draws from
    the answer table's counts — a multinomial draw, vectorised over resamples); the unparsed
    share is held fixed. Score-mode rows (one per record) are resampled the same way.
    """
    parsed = answers[answers["value"].notna()]
    grouped = {key: g for key, g in parsed.groupby(SCENARIO_KEYS, sort=False)}
    out = np.empty((n_resamples, len(scenarios)))
    for j, key in enumerate(scenarios[SCENARIO_KEYS].itertuples(index=False, name=None)):
        group = grouped[key]
        counts = group["count"].to_numpy(float)
        values = group["value"].to_numpy(float)
        n = int(counts.sum())
        draws = rng.multinomial(n, counts / n, size=n_resamples)
        out[:, j] = draws @ values / n
    return out


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0, ignoring NaN resamples (a group with no defined scenario)."""
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
        low = np.nanquantile(samples, alpha, axis=0)
        high = np.nanquantile(samples, 1 - alpha, axis=0)
    return low, high


def scenario_bootstrap_weights(masks, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities (n_resamples × groups × scenarios): each group's scenarios resampled with
    replacement. Used when the propensities are exact (score mode): the remaining uncertainty is
    which scenarios the study happened to ask, not the answers."""
    masks = np.asarray(masks, dtype=bool)
    weights = np.zeros((n_resamples, *masks.shape))
    for g, mask in enumerate(masks):
        members = np.flatnonzero(mask)
        if members.size:
            weights[:, g, members] = rng.multinomial(members.size, np.full(members.size, 1 / members.size), size=n_resamples)
    return weights
