"""The paper's z-test (Table 1 rows, docs/paper.md, statsmodels) and bootstrap interval coverage."""
import numpy as np
import pandas as pd
import pytest
from statsmodels.stats import proportion as sm_proportion

from tomdistill.metrics import stats, transfer

# docs/paper.md, the paper's Table 1: tuned 7b, in-sample game vs doubled payoffs (C out of 300 each).
TABLE_1 = [
    # context, game, C in-sample, C doubled, difference, ci_low, ci_high, se, p, star
    ("team", "prisoners_dilemma", 225, 213, -0.04, -0.111, 0.031, 0.036, 0.269, ""),
    ("business", "stag_hunt", 214, 190, -0.08, -0.155, -0.005, 0.038, 0.036, "*"),
    ("environment", "snowdrift", 186, 200, 0.05, -0.030, 0.123, 0.039, 0.232, ""),
    ("diplomacy", "prisoners_delight", 225, 210, -0.05, -0.121, 0.021, 0.036, 0.170, ""),
]


@pytest.mark.parametrize("context, game, x1, x2, diff, low, high, se, p, star", TABLE_1)
def test_ztest_reproduces_paper_rows(context, game, x1, x2, diff, low, high, se, p, star):
    out = stats.two_proportion_ztest(x1, 300, x2, 300)
    assert round(out["difference"], 2) == pytest.approx(diff)
    assert (round(out["ci_low"], 3), round(out["ci_high"], 3)) == pytest.approx((low, high))
    assert round(out["se"], 3) == pytest.approx(se)
    assert round(out["p_value"], 3) == pytest.approx(p)
    assert out["star"] == star


@pytest.mark.parametrize("x1, n1, x2, n2", [(225, 300, 213, 300), (214, 300, 190, 300), (30, 80, 61, 120), (5, 50, 1, 40)])
def test_ztest_matches_statsmodels(x1, n1, x2, n2):
    out = stats.two_proportion_ztest(x1, n1, x2, n2)
    ref = sm_proportion.test_proportions_2indep(x2, n2, x1, n1, method="wald", compare="diff")
    low, high = sm_proportion.confint_proportions_2indep(x2, n2, x1, n1, method="wald", compare="diff")
    assert out["z"] == pytest.approx(ref.statistic, rel=1e-9)
    assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-9)


def test_significance_table_from_reference_data(tmp_path):
    from tomdistill.evaluation import reference_evaluation

    table = reference_evaluation(tmp_path, n_bootstrap=10).significance.set_index(["context", "game"])
    assert len(table) == 20
    assert table["star"].tolist().count("*") == 1  # business × stag_hunt is the only significant row
    for context, game, *_, se, p, star in TABLE_1:
        assert round(table.loc[(context, game), "p_value"], 3) == pytest.approx(p)
        assert table.loc[(context, game), "star"] == star


def _answers(counts_c: np.ndarray, n: int) -> pd.DataFrame:
    rows = []
    for j, c in enumerate(counts_c):
        rows.append({"split": "in_sample", "game": f"g{j}", "context": "x", "value": 1.0, "count": int(c)})
        rows.append({"split": "in_sample", "game": f"g{j}", "context": "x", "value": 0.0, "count": int(n - c)})
    return pd.DataFrame(rows)


def test_bootstrap_resamples_match_binomial_spread():
    rng = np.random.default_rng(1)
    answers = _answers(np.array([60, 150]), 200)
    scenarios = pd.DataFrame({"split": ["in_sample"] * 2, "game": ["g0", "g1"], "context": ["x", "x"]})
    draws = stats.bootstrap_scenario_means(answers, scenarios, 4000, rng)
    assert draws.shape == (4000, 2)
    assert draws.mean(axis=0) == pytest.approx([0.3, 0.75], abs=0.005)
    assert draws.std(axis=0) == pytest.approx([np.sqrt(0.3 * 0.7 / 200), np.sqrt(0.75 * 0.25 / 200)], rel=0.08)


def test_bootstrap_intervals_cover_true_values_at_nominal_rate():
    """Synthetic models with known propensities: 95% intervals should cover the truth ~95% of the time."""
    rng = np.random.default_rng(7)
    true = {"teacher": np.array([0.2, 0.35, 0.5, 0.8, 0.3, 0.6]),
            "base": np.array([0.85, 0.9, 0.8, 0.3, 0.9, 0.95])}
    true["tuned"] = true["base"] + 0.45 * (true["teacher"] - true["base"])  # 45% of each gap closed
    n, replications, resamples = 250, 150, 1000
    scenarios = pd.DataFrame({"split": ["in_sample"] * 6, "game": [f"g{j}" for j in range(6)], "context": ["x"] * 6})
    _, masks = transfer.group_masks(scenarios)
    defined = np.ones(6, bool)
    truth = transfer.group_transfer(true["teacher"], true["base"], true["tuned"], masks[:1], defined)
    covered = {"improvement": 0, "alignment": 0}
    for _ in range(replications):
        draws = {}
        for role, p in true.items():
            draws[role] = stats.bootstrap_scenario_means(_answers(rng.binomial(n, p), n), scenarios, resamples, rng)
        boot = transfer.group_transfer(draws["teacher"], draws["base"], draws["tuned"], masks[:1], defined)
        for metric in covered:
            low, high = stats.percentile_interval(boot[metric])
            covered[metric] += bool(low[0] <= truth[metric][0] <= high[0])
    for metric, hits in covered.items():
        assert 0.88 <= hits / replications <= 0.995, (metric, hits / replications)


def test_percentile_interval_ignores_nan_resamples():
    samples = np.array([[np.nan, 1.0], [np.nan, 2.0], [np.nan, 3.0]])
    low, high = stats.percentile_interval(samples, 0.5)
    assert np.isnan(low[0]) and low[1] == pytest.approx(1.5) and high[1] == pytest.approx(2.5)


def test_scenario_bootstrap_resamples_within_each_group():
    import numpy as np

    from tomdistill.metrics.stats import scenario_bootstrap_weights
    from tomdistill.metrics.transfer import group_transfer, group_transfer_weighted

    masks = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=float)
    weights = scenario_bootstrap_weights(masks, 500, np.random.default_rng(0))
    assert weights.shape == (500, 3, 5)
    assert (weights.sum(-1) == masks.sum(-1)).all()  # each group keeps its size
    assert (weights[:, masks == 0] == 0).all()  # and draws only its own scenarios
    teacher, base = np.array([0.2, 0.3, 0.4, 0.5, 0.6]), np.array([0.8, 0.8, 0.8, 0.8, 0.8])
    tuned = np.array([0.5, 0.55, 0.6, 0.65, 0.7])
    defined = np.ones(5, dtype=bool)
    point = group_transfer(teacher, base, tuned, masks, defined)
    boot = group_transfer_weighted(teacher, base, tuned, weights, defined)
    low, high = np.quantile(boot["alignment"], [0.025, 0.975], axis=0)
    assert ((low <= point["alignment"]) & (point["alignment"] <= high)).all()
    assert (high - low)[2] > 0  # scenarios differ, so the interval is not degenerate
