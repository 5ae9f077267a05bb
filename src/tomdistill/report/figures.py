"""Report figures (PNG, matplotlib Agg): the paper's Figures 2–5 and a scenario × model heatmap.

Each figure is built from a plain table that a pure function computes (`transfer_bars`, `clip_intervals`,
`cooperation_bars`, `heatmap_cells`): what is drawn, which intervals are cut at the axis, which bars rest on
little probability mass. The figures are sized for a report page (`PRINT_WIDTH` inches) with fonts of at least
`MIN_FONT` points there, so they stay readable where report.md shows them.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tomdistill.records import MIN_MASS  # noqa: E402

from .tables import propensity_label  # noqa: E402

ROLES = ("teacher", "base", "tuned")
ROLE_COLORS = {"teacher": "#1b7837", "base": "#9e9e9e", "tuned": "#2166ac"}
METRIC_COLORS = {"improvement": "#d6604d", "alignment": "#4393c3"}
MATRIX_SPLITS = ("in_sample", "heldout_context", "oos_context", "oos_payoffs")
PRINT_WIDTH = 10.0  # inches: a figure is drawn at the width report.md shows it, so its fonts are their printed size
MIN_FONT = 9.0  # points: the smallest text on any figure
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
         "legend.fontsize": 10, "legend.title_fontsize": 10, "figure.titlesize": 12}
LOW_MASS_HATCH = "//"


def _role_labels(models: dict[str, str]) -> dict[str, str]:
    return {role: f"{role} ({name})" for role, name in models.items()}


# --- what to draw (pure) ------------------------------------------------------------------------

def low_mass_scenarios(propensities: pd.DataFrame, roles=ROLES, floor: float = MIN_MASS) -> pd.DataFrame:
    """The scenarios (split, game, context) where one of `roles` puts less than `floor` of its probability on the
    answers (`action_mass`; unknown mass counts as enough), with the lowest such mass."""
    if "action_mass" not in propensities:
        return pd.DataFrame(columns=["split", "game", "context", "action_mass"])
    chosen = propensities[propensities["role"].isin(roles) & (propensities["action_mass"] < floor)]
    return chosen.groupby(["split", "game", "context"], as_index=False, sort=False)["action_mass"].min()


def transfer_bars(groups: pd.DataFrame, propensities: pd.DataFrame, split: str, by: str) -> pd.DataFrame:
    """One row per bar of a transfer panel (each `by` group of `split` × metric): its value, interval, scenario
    count, whether an interval is drawn (only where one exists: a one-scenario group under the scenario bootstrap
    has none, and is not drawn as a zero-width one) and whether a scenario of the group rests on little mass."""
    rows = groups[(groups["kind"] == by) & (groups["split"] == split)]
    low = low_mass_scenarios(propensities)
    low_groups = set(low.loc[low["split"] == split, by])
    out = []
    for position, row in enumerate(rows.itertuples()):
        for metric in ("improvement", "alignment"):
            ci_low, ci_high = getattr(row, f"{metric}_ci_low"), getattr(row, f"{metric}_ci_high")
            out.append({"group": row.group, "position": position, "metric": metric, "value": getattr(row, metric),
                        "ci_low": ci_low, "ci_high": ci_high, "n_scenarios": int(row.n_scenarios),
                        "has_interval": bool(np.isfinite(ci_low) and np.isfinite(ci_high)),
                        "low_mass": row.group in low_groups})
    return pd.DataFrame(out, columns=["group", "position", "metric", "value", "ci_low", "ci_high", "n_scenarios",
                                      "has_interval", "low_mass"])


def axis_limits(values) -> tuple[float, float]:
    """The y range of a transfer panel: 0 and 1 (teacher reached) always in view, the bars with a margin; wider
    intervals are cut at it (`clip_intervals` marks them)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return -0.25, 1.25
    return min(-0.25, finite.min() - 0.25), max(1.25, finite.max() + 0.25)


def clip_intervals(bars: pd.DataFrame, limits: tuple[float, float]) -> pd.DataFrame:
    """The drawn part of each interval within the axis `limits` (`draw_low`, `draw_high`; NaN: no interval) and
    whether its end is cut there (`cut_low`, `cut_high`: the figure puts a marker and the true bound at the axis)."""
    bottom, top = limits
    out = bars.copy()
    has = out["has_interval"].to_numpy(bool)
    low, high = out["ci_low"].to_numpy(float), out["ci_high"].to_numpy(float)
    out["cut_low"] = has & (low < bottom)
    out["cut_high"] = has & (high > top)
    out["draw_low"] = np.where(has, np.clip(low, bottom, top), np.nan)
    out["draw_high"] = np.where(has, np.clip(high, bottom, top), np.nan)
    return out


def cooperation_bars(propensities: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean propensity per `by` group and role over the two-action scenarios, with the lowest mass on the answers
    among them and whether it is below `MIN_MASS`."""
    props = propensities[propensities["kind"] == "matrix"]
    mass = props["action_mass"] if "action_mass" in props else pd.Series(np.nan, props.index)
    table = (props.assign(mass=mass).groupby([by, "role"], sort=False)
             .agg(p=("p", "mean"), min_mass=("mass", "min")).reset_index().rename(columns={by: "group"}))
    table["low_mass"] = table["min_mass"] < MIN_MASS
    return table


def heatmap_cells(scenarios: pd.DataFrame, propensities: pd.DataFrame, roles=ROLES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The heatmap's values (rows: scenarios, columns: roles) and its cell texts: the propensity, with `*` where
    that model puts less than `MIN_MASS` of its probability on the answers."""
    index = [f"{s} · {g} · {c}" for s, g, c in zip(scenarios["split"], scenarios["game"], scenarios["context"])]
    values = pd.DataFrame({r: scenarios[f"p_{r}"].to_numpy(float) for r in roles}, index=index)
    keys = scenarios[["split", "game", "context"]]
    texts = pd.DataFrame(index=index, columns=list(roles), dtype=object)
    for role in roles:
        mass = (keys.merge(propensities[propensities["role"] == role][["split", "game", "context", "action_mass"]],
                           on=["split", "game", "context"], how="left")["action_mass"].to_numpy(float)
                if "action_mass" in propensities else np.full(len(keys), np.nan))
        texts[role] = [f"{v:.2f}" + ("*" if m < MIN_MASS else "") if np.isfinite(v) else "—"
                       for v, m in zip(values[role], mass)]
    return values, texts


def smallest_font(fig) -> float:
    """The smallest font size (points) of the visible text on a figure (tests hold it to `MIN_FONT`)."""
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) if sizes else float("inf")


# --- the figures --------------------------------------------------------------------------------

def cooperation_figure(evaluation):
    """Figure 2: each model's mean propensity to cooperate by context and by game (two-action games)."""
    props = evaluation.propensities[evaluation.propensities["kind"] == "matrix"]
    if props.empty:
        return None
    labels = _role_labels(evaluation.models)
    fig, axes = plt.subplots(2, 1, figsize=(PRINT_WIDTH, 8.5), sharey=True)
    for ax, by in zip(axes, ("context", "game")):
        bars = cooperation_bars(evaluation.propensities, by)
        names = list(dict.fromkeys(bars["group"]))
        width = 0.8 / len(labels)
        for i, role in enumerate(labels):
            chosen = bars[bars["role"] == role].set_index("group").reindex(names)
            ax.bar(np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width, chosen["p"], width,
                   color=ROLE_COLORS[role], edgecolor="black", linewidth=0.3,
                   hatch=[LOW_MASS_HATCH if low else None for low in chosen["low_mass"].fillna(False).astype(bool)])
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"Cooperation by {by} (mean over scenarios)")
        ax.set_xlabel(by)
        ax.set_ylabel(propensity_label(evaluation))
        ax.set_ylim(0, 1)
    handles, names = [Patch(facecolor=ROLE_COLORS[role]) for role in labels], list(labels.values())
    if cooperation_bars(evaluation.propensities, "game")["low_mass"].any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=LOW_MASS_HATCH))
        names.append(f"hatched: in a scenario of the group the model puts\nunder {MIN_MASS:g} of its probability "
                     "on the answers")
    fig.legend(handles, names, title="model", loc="lower center", ncol=min(3, len(names)))
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(names) > 3)), 1, 1))
    return fig


def transfer_by_figure(evaluation, by: str):
    """Figures 3 and 4: improvement and alignment per game (or context), one panel per split, mean lines. An
    interval cut at the axis ends in a triangle with its true bound; a one-scenario group has none (n=1)."""
    groups = evaluation.groups
    splits = [s for s in MATRIX_SPLITS if s in set(groups.loc[groups["kind"] == "split", "group"])]
    if not splits:
        return None
    ncols = min(2, len(splits))
    nrows = -(-len(splits) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PRINT_WIDTH, 4.6 * nrows + 0.6), squeeze=False)
    width = 0.38
    low_mass_seen, means = False, {}
    for ax, split in zip(axes.flat, splits):
        bars = transfer_bars(groups, evaluation.propensities, split, by)
        limits = axis_limits(bars["value"])
        bars = clip_intervals(bars, limits)
        for offset, metric in ((-width / 2, "improvement"), (width / 2, "alignment")):
            rows = bars[bars["metric"] == metric]
            x = rows["position"].to_numpy(float) + offset
            ax.bar(x, rows["value"], width, color=METRIC_COLORS[metric], edgecolor="black",
                   linewidth=0.3, hatch=[LOW_MASS_HATCH if low else None for low in rows["low_mass"]])
            drawn = rows["has_interval"].to_numpy(bool)
            value = rows["value"].to_numpy(float)
            ax.errorbar(x[drawn], value[drawn], fmt="none", ecolor="black", elinewidth=0.9, capsize=3,
                        yerr=np.vstack([value[drawn] - rows["draw_low"].to_numpy(float)[drawn],
                                        rows["draw_high"].to_numpy(float)[drawn] - value[drawn]]))
            for xi, bound, cut, edge, marker, va in [
                    *[(xi, b, c, limits[1], "^", "top") for xi, b, c in zip(x, rows["ci_high"], rows["cut_high"])],
                    *[(xi, b, c, limits[0], "v", "bottom") for xi, b, c in zip(x, rows["ci_low"], rows["cut_low"])]]:
                if cut:  # the interval goes on past the axis: say so, and where it ends
                    ax.plot([xi], [edge], marker=marker, color="black", markersize=7, clip_on=False)
                    ax.annotate(f"{100 * bound:.0f}%", (xi, edge), xytext=(0, -9 if va == "top" else 9),
                                textcoords="offset points", ha="center", va=va, fontsize=MIN_FONT,
                                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})
            means[metric] = groups[(groups["kind"] == "split") & (groups["group"] == split)][metric].iloc[0]
            ax.axhline(means[metric], color=METRIC_COLORS[metric], linestyle="--", linewidth=1.2)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle=":")
        names = bars.drop_duplicates("position")
        ax.set_xticks(names["position"], [g + (" (n=1)" if n == 1 else "") for g, n in
                                          zip(names["group"], names["n_scenarios"])], rotation=30, ha="right")
        ax.set_ylim(*limits)
        ax.set_xlim(-0.6, max(len(names), 3) - 0.4)  # bars as wide in a panel of one group as in one of three
        ax.set_title(f"{split}: improvement {100 * means['improvement']:.1f}%, alignment {100 * means['alignment']:.1f}%")
        ax.set_ylabel("gap closed (1 = teacher reached)")
        low_mass_seen |= bool(bars["low_mass"].any())
    # one legend for all panels, in a spare panel or below them (inside a panel it hides bars and cut bounds)
    handles = [*(Patch(facecolor=METRIC_COLORS[m]) for m in METRIC_COLORS),
               *(Line2D([], [], color=METRIC_COLORS[m], linestyle="--") for m in METRIC_COLORS)]
    names = [*METRIC_COLORS, *(f"{m}, the whole split" for m in METRIC_COLORS)]
    if low_mass_seen:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=LOW_MASS_HATCH))
        names.append(f"hatched: a model puts under {MIN_MASS:g} of its\nprobability on the answers in a scenario of the group")
    spare = list(axes.flat[len(splits):])
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(handles, names, loc="center")
    else:
        fig.legend(handles, names, loc="lower center", ncol=2)
    level = int(100 * evaluation.settings.get("confidence", 0.95))
    fig.suptitle(f"Transfer by {by}: improvement (mean per-scenario gap closure) and alignment (distance removed)\n"
                 f"bars: {level}% bootstrap CI; ▲/▼ at the axis: the interval goes on, to the bound printed; "
                 "(n=1): one scenario, no interval")
    fig.tight_layout(rect=(0, 0 if spare else 0.1 / nrows + (0.04 if low_mass_seen else 0), 1, 1))
    return fig


def public_goods_figure(evaluation):
    """Figure 5: donations in the public goods game — distribution and mean ± 95% CI per model. The distribution
    is each model's share of parsed answers per amount, or in score mode its P(amount) (`Evaluation.donations`);
    each model's mass on the answers is printed under it, hatched where below `MIN_MASS`."""
    donations = evaluation.donations
    if donations.empty:
        return None
    labels = _role_labels(evaluation.models)
    props = evaluation.propensities[evaluation.propensities["kind"] == "public_goods"]
    scenario_names = list(dict.fromkeys(zip(donations["game"], donations["context"])))
    fig, axes = plt.subplots(len(scenario_names), 2, figsize=(PRINT_WIDTH, 4.6 * len(scenario_names)), squeeze=False)
    for (game, context), (ax_dist, ax_mean) in zip(scenario_names, axes):
        chosen = donations[(donations["game"] == game) & (donations["context"] == context)]
        endowment = int(chosen["amount"].max())
        amounts = np.arange(endowment + 1)
        width = 0.8 / len(labels)
        scenario = props[(props["game"] == game) & (props["context"] == context)].set_index("role")
        mass = {r: float(scenario.loc[r, "action_mass"]) if "action_mass" in scenario and r in scenario.index
                else np.nan for r in labels}
        hatch = {r: LOW_MASS_HATCH if mass[r] < MIN_MASS else None for r in labels}
        for i, (role, label) in enumerate(labels.items()):
            shares = chosen[chosen["role"] == role].set_index("amount")["share"].reindex(amounts, fill_value=0)
            ax_dist.bar(amounts + (i - 1) * width, shares, width, color=ROLE_COLORS[role], label=role, hatch=hatch[role])
        ax_dist.set_xticks(amounts)
        ax_dist.set_xlabel("donation ($)")
        ax_dist.set_ylabel("share of parsed answers\n(score mode: P(amount))")
        ax_dist.set_title(f"{game} / {context}: donations")
        ax_dist.legend(title="model")
        means = [scenario.loc[r, "mean_donation"] for r in labels]
        errors = [1.96 * scenario.loc[r, "donation_se"] for r in labels]
        ax_mean.bar(range(len(labels)), means, yerr=errors, capsize=4, color=[ROLE_COLORS[r] for r in labels],
                    hatch=[hatch[r] for r in labels], edgecolor="black", linewidth=0.3)
        for x, (m, e) in enumerate(zip(means, errors)):
            ax_mean.text(x, m + e + 0.25, f"${m:.2f}", ha="center")
        ticks = [f"{role}\n{evaluation.models[role]}\nmass {mass[role]:.2f}" if np.isfinite(mass[role])
                 else f"{role}\n{evaluation.models[role]}" for role in labels]
        ax_mean.set_xticks(range(len(labels)), ticks)
        for tick, role in zip(ax_mean.get_xticklabels(), labels):
            if mass[role] < MIN_MASS:
                tick.set_color("#b2182b")
        ax_mean.set_ylim(0, endowment)
        ax_mean.set_ylabel("mean donation ($), ±95% CI")
        ax_mean.set_title(f"mean donation (endowment ${endowment})")
    if "action_mass" in props and props["action_mass"].notna().any():
        fig.text(0.5, 0.005, "mass: the model's probability on the answers 0..endowment; hatched, in red: under "
                 f"{MIN_MASS:g}",
                 ha="center", va="bottom", fontsize=MIN_FONT)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    return fig


def heatmap_figure(evaluation):
    """Scenario × model heatmap of the propensity (public goods: mean donation / endowment); `*` marks a model
    that puts little probability on the answers there."""
    values, texts = heatmap_cells(evaluation.scenarios, evaluation.propensities, list(evaluation.models))
    values.columns = [f"{role}\n{name}" for role, name in evaluation.models.items()]
    fig, ax = plt.subplots(figsize=(PRINT_WIDTH, 0.3 * len(values) + 2.4))
    sns.heatmap(values, annot=texts.to_numpy(), fmt="", cmap="RdYlGn", vmin=0, vmax=1, ax=ax,
                annot_kws={"fontsize": MIN_FONT},
                cbar_kws={"label": f"{propensity_label(evaluation)} (public goods: donation / endowment)", "shrink": 0.5})
    marked = texts.apply(lambda column: column.str.endswith("*")).to_numpy().any()
    ax.set_title("Propensity to cooperate per scenario and model" + (
        f"\n*: the model puts under {MIN_MASS:g} of its probability on the answers there" if marked else ""))
    ax.set_xlabel("model")
    ax.set_ylabel("split · game · context")
    ax.tick_params(axis="y", labelsize=MIN_FONT)
    ax.tick_params(axis="x", rotation=0)
    fig.tight_layout()
    return fig


FIGURES = {
    "cooperation": cooperation_figure,
    "improvement_by_game": lambda evaluation: transfer_by_figure(evaluation, "game"),
    "improvement_by_context": lambda evaluation: transfer_by_figure(evaluation, "context"),
    "public_goods": public_goods_figure,
    "heatmap": heatmap_figure,
}


def build_figures(evaluation) -> dict:
    """{name: matplotlib figure} for the figures this evaluation has (drawn in `STYLE`)."""
    with plt.rc_context(STYLE):
        made = {name: build(evaluation) for name, build in FIGURES.items()}
    return {name: fig for name, fig in made.items() if fig is not None}


def write_figures(evaluation, directory: Path) -> dict[str, Path]:
    paths = {}
    for name, fig in build_figures(evaluation).items():
        paths[name] = Path(directory) / f"{name}.png"
        fig.savefig(paths[name], dpi=150, bbox_inches="tight")  # nothing cut off (the heatmap's colour bar label)
        plt.close(fig)
    return paths
