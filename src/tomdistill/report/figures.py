"""Report figures (PNG, matplotlib Agg): the paper's Figures 2–5 and a scenario × model heatmap."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .tables import propensity_label  # noqa: E402

ROLE_COLORS = {"teacher": "#1b7837", "base": "#9e9e9e", "tuned": "#2166ac"}
METRIC_COLORS = {"improvement": "#d6604d", "alignment": "#4393c3"}
MATRIX_SPLITS = ("in_sample", "heldout_context", "oos_context", "oos_payoffs")


def _role_labels(models: dict[str, str]) -> dict[str, str]:
    return {role: f"{role} ({name})" for role, name in models.items()}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cooperation_figure(evaluation, path: Path) -> Path | None:
    """Figure 2: each model's mean propensity to cooperate by context and by game (two-action games)."""
    props = evaluation.propensities[evaluation.propensities["kind"] == "matrix"]
    if props.empty:
        return None
    labels = _role_labels(evaluation.models)
    props = props.assign(model_label=props["role"].map(labels))
    palette = {labels[r]: c for r, c in ROLE_COLORS.items() if r in labels}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    for ax, by in zip(axes, ("context", "game")):
        sns.barplot(data=props, x=by, y="p", hue="model_label", palette=palette, errorbar=None, ax=ax,
                    order=list(dict.fromkeys(props[by])), hue_order=list(labels.values()))
        ax.set_title(f"Cooperation by {by} (mean over scenarios)")
        ax.set_xlabel(by)
        ax.set_ylabel(propensity_label(evaluation))
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    fig.legend(handles, names, title="model", loc="lower center", ncol=len(names), fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def transfer_by_figure(evaluation, by: str, path: Path) -> Path | None:
    """Figures 3 and 4: improvement and alignment per game (or context), one panel per split, mean lines."""
    groups = evaluation.groups
    splits = [s for s in MATRIX_SPLITS if s in set(groups.loc[groups["kind"] == "split", "group"])]
    if not splits:
        return None
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        rows = groups[(groups["kind"] == by) & (groups["split"] == split)]
        names = list(rows["group"])
        x = np.arange(len(names))
        width = 0.38
        for offset, metric in ((-width / 2, "improvement"), (width / 2, "alignment")):
            values = rows[metric].to_numpy(float)
            low = values - rows[f"{metric}_ci_low"].to_numpy(float)
            high = rows[f"{metric}_ci_high"].to_numpy(float) - values
            ax.bar(x + offset, values, width, color=METRIC_COLORS[metric], label=metric,
                   yerr=np.clip(np.nan_to_num(np.vstack([low, high])), 0, None), capsize=3, error_kw={"elinewidth": 0.8})
            mean = groups[(groups["kind"] == "split") & (groups["group"] == split)][metric].iloc[0]
            ax.axhline(mean, color=METRIC_COLORS[metric], linestyle="--", linewidth=1.2,
                       label=f"{split} {metric} {100 * mean:.1f}%")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xticks(x, names, rotation=35, ha="right")
        ax.set_title(f"{split}: transfer by {by}")
        ax.set_xlabel(by)
        ax.set_ylabel("gap closed (1 = teacher reached)")
        points = rows[["improvement", "alignment"]].to_numpy(float)
        finite = points[np.isfinite(points)]
        if finite.size:  # keep the bars readable; very wide bootstrap intervals are clipped
            ax.set_ylim(min(-0.25, finite.min() - 0.25), max(1.25, finite.max() + 0.25))
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Improvement (paper: mean of per-scenario gap closure) and alignment (distance removed); "
                 "bars: 95% bootstrap CI", fontsize=9)
    return _save(fig, path)


def public_goods_figure(evaluation, path: Path) -> Path | None:
    """Figure 5: donations in the public goods game — distribution and mean ± 95% CI per model. The distribution
    is each model's share of parsed answers per amount, or in score mode its P(amount) (`Evaluation.donations`)."""
    donations = evaluation.donations
    if donations.empty:
        return None
    labels = _role_labels(evaluation.models)
    props = evaluation.propensities[evaluation.propensities["kind"] == "public_goods"]
    scenario_names = list(dict.fromkeys(zip(donations["game"], donations["context"])))
    fig, axes = plt.subplots(len(scenario_names), 2, figsize=(12, 4.2 * len(scenario_names)), squeeze=False)
    for (game, context), (ax_dist, ax_mean) in zip(scenario_names, axes):
        chosen = donations[(donations["game"] == game) & (donations["context"] == context)]
        endowment = int(chosen["amount"].max())
        amounts = np.arange(endowment + 1)
        width = 0.8 / len(labels)
        for i, (role, label) in enumerate(labels.items()):
            shares = chosen[chosen["role"] == role].set_index("amount")["share"].reindex(amounts, fill_value=0)
            ax_dist.bar(amounts + (i - 1) * width, shares, width, color=ROLE_COLORS[role], label=label)
        ax_dist.set_xticks(amounts)
        ax_dist.set_xlabel("donation ($)")
        ax_dist.set_ylabel("share of parsed answers (score mode: P(amount))")
        ax_dist.set_title(f"{game} / {context}: donations")
        ax_dist.legend(title="model", fontsize=8)
        scenario = props[(props["game"] == game) & (props["context"] == context)].set_index("role")
        means = [scenario.loc[r, "mean_donation"] for r in labels]
        errors = [1.96 * scenario.loc[r, "donation_se"] for r in labels]
        ax_mean.bar(list(labels.values()), means, yerr=errors, capsize=4,
                    color=[ROLE_COLORS[r] for r in labels])
        for x, (m, e) in enumerate(zip(means, errors)):
            ax_mean.text(x, m + e + 0.25, f"${m:.2f}", ha="center", fontsize=9)
        ax_mean.set_ylim(0, endowment)
        ax_mean.set_ylabel("mean donation ($), ±95% CI")
        ax_mean.set_xlabel("model")
        ax_mean.set_title(f"{game} / {context}: mean donation (endowment ${endowment})")
        ax_mean.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def heatmap_figure(evaluation, path: Path) -> Path:
    """Scenario × model heatmap of the propensity (public goods: mean donation / endowment)."""
    labels = {role: f"{role}\n{name}" for role, name in evaluation.models.items()}
    scenarios = evaluation.scenarios
    matrix = pd.DataFrame(
        {labels[r]: scenarios[f"p_{r}"].to_numpy() for r in labels},
        index=[f"{s} · {g} · {c}" for s, g, c in zip(scenarios["split"], scenarios["game"], scenarios["context"])],
    )
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(matrix) + 1.8))
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0, vmax=1, ax=ax, annot_kws={"fontsize": 7},
                cbar_kws={"label": f"{propensity_label(evaluation)} (public goods: donation / endowment)", "shrink": 0.5})
    ax.set_title("Propensity to cooperate per scenario and model")
    ax.set_xlabel("model")
    ax.set_ylabel("split · game · context")
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", labelsize=8, rotation=0)
    return _save(fig, path)


def write_figures(evaluation, directory: Path) -> dict[str, Path]:
    made = {
        "cooperation": cooperation_figure(evaluation, directory / "cooperation.png"),
        "improvement_by_game": transfer_by_figure(evaluation, "game", directory / "improvement_by_game.png"),
        "improvement_by_context": transfer_by_figure(evaluation, "context", directory / "improvement_by_context.png"),
        "public_goods": public_goods_figure(evaluation, directory / "public_goods.png"),
        "heatmap": heatmap_figure(evaluation, directory / "heatmap.png"),
    }
    return {name: path for name, path in made.items() if path is not None}
