"""Evaluation: how far fine-tuning moved the student toward the teacher, with statistics.

`compute_evaluation` is the science (records in, tables out; no I/O); `evaluate(cfg)` is the
Hydra-facing edge: it loads the three sample datasets, checks they can be compared, computes,
writes the report, logs to W&B and prints the headline table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from tomdistill.errors import UserError
from tomdistill.metrics import null_students as null, stats, transfer
from tomdistill.records import mass_warning
from tomdistill.metrics.propensity import (
    SCENARIO_KEYS, answer_table, donation_shares, group_propensities, is_scored, mixed_scenarios,
    scenario_propensities,
)
from tomdistill.scenarios.catalogue import AUGMENT_SPLIT, HELDOUT_CONTEXT, REPORT_SPLITS

TRAINING_ONLY_SPLITS = (AUGMENT_SPLIT,)  # scenarios.augment: payoff variants of in-sample games, training only

ROLES = ("teacher", "base", "tuned")
STUDENTS = ("base", "tuned")  # whose mass on the answers decides whether a public-goods number is shown
REFERENCE_PREFIX = "reference:"
HEADLINE_SPLITS = (*REPORT_SPLITS, "overall")
# how the intervals were drawn (summary.json `bootstrap`, the report and the console say which)
BOOTSTRAP_ANSWERS = "answers resampled within each scenario"
BOOTSTRAP_SCENARIOS = "scenarios resampled within each group"
RECORD_FIELDS = ["model", "game", "context", "split", "action", "action_probs", "action_mass", "prompt_version"]


class EvaluationError(ValueError, UserError):
    """Datasets that cannot be compared; the message names the dataset(s) and the scenario(s)."""


class EvaluationWarning(str):
    """A warning's text, tagged with whom it concerns (`role`), what `kind` of problem it is and, for a per-scenario
    problem, the `scenario` and a short `detail`: the report folds the warnings of one role and kind into one line
    (report/tables.py `fold_warnings`). It is a str, so summary.json and warnings.csv keep the full text."""

    role: str | None
    kind: str | None
    scenario: str | None
    detail: str | None

    def __new__(cls, text: str, role: str | None = None, kind: str | None = None, scenario: str | None = None,
                detail: str | None = None):
        self = super().__new__(cls, text)
        self.role, self.kind, self.scenario, self.detail = role, kind, scenario, detail
        return self


@dataclass
class Evaluation:
    """Everything the report shows. Propensities and metrics are fractions (1.0 = 100%)."""

    models: dict[str, str]
    prompt_version: str
    propensities: pd.DataFrame  # one row per role × scenario
    answers: pd.DataFrame  # the answer tables (role, scenario, value, count) the propensities come from
    donations: pd.DataFrame  # public goods: role, scenario, amount, share (answers' frequencies or P(amount))
    scenarios: pd.DataFrame  # one row per scenario: p per role, gap, improvement, alignment (+ CIs)
    groups: pd.DataFrame  # one row per group (overall, split, game/context within a split, scenario)
    cooperation: pd.DataFrame  # mean propensity per role and split / game / context
    significance: pd.DataFrame  # tuned: in-sample game vs doubled payoffs (the paper's Table 1)
    pairwise: pd.DataFrame  # per scenario: tuned vs base and tuned vs teacher
    paper_convention: dict[str, float]  # improvement computed the paper's way (÷ all draws, rounded means)
    action_mass: dict[str, dict[str, float]]
    warnings: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # one row per null student × split (and overall): alignment, improvement, point values (metrics/null_students.py)
    null_students: pd.DataFrame = field(default_factory=pd.DataFrame)
    # the teacher's entropy and each null student's cross-entropy on the two-action training scenarios, nats
    training_cross_entropy: dict = field(default_factory=dict)
    # {split or "overall": {student: mean mass on the answers over its public-goods scenarios}}: public_goods_mass
    format_mass: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def headline(self, metric: str) -> dict[str, dict]:
        """{split: {value, ci_low, ci_high, n_scenarios, n_defined}} for the splits and overall."""
        table = self.groups[self.groups["kind"].isin(["split", "overall"])].set_index("group")
        out = {}
        for split in HEADLINE_SPLITS:
            if split in table.index:
                row = table.loc[split]
                out[split] = {
                    "value": _num(row[metric]), "ci_low": _num(row[f"{metric}_ci_low"]),
                    "ci_high": _num(row[f"{metric}_ci_high"]), "n_scenarios": int(row["n_scenarios"]),
                }
                if metric == "improvement":
                    out[split]["n_defined"] = int(row["n_defined"])
                verdict = self.format_verdict(split)
                if verdict:
                    out[split].update(verdict)
                    if verdict["off_format"]:  # a number read from answers the students hardly give: withheld
                        out[split].update(value=None, ci_low=None, ci_high=None)
            else:
                out[split] = {"value": None, "ci_low": None, "ci_high": None, "n_scenarios": 0}
        return out

    def format_verdict(self, split: str, roles=STUDENTS) -> dict | None:
        """Whether `split`'s number may be shown (`transfer.format_verdict` on `roles`' public-goods mass); None
        where the split holds no public goods."""
        masses = self.format_mass.get(split)
        return transfer.format_verdict({r: masses.get(r) for r in roles}) if masses else None

    def null_headline(self) -> dict[str, dict[str, dict]]:
        """{null student: {split: {alignment, improvement, n_scenarios[, off_format, action_mass, reason]}}}."""
        out: dict[str, dict[str, dict]] = {}
        for row in self.null_students.to_dict("records"):
            entry = {m: _num(row[m]) for m in transfer.TRANSFER_METRICS}
            entry.update(n_scenarios=int(row["n_scenarios"]), n_answered=int(row["n_answered"]))
            if isinstance(row.get("off_format"), (bool, np.bool_)):
                entry.update(off_format=bool(row["off_format"]), action_mass={"base": _num(row["base_action_mass"])})
                if row["off_format"]:
                    entry["reason"] = row["reason"]
            out.setdefault(row["null_student"], {})[row["split"]] = entry
        return out


def _num(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def base_game_of(game: str, bases: Mapping[str, str] | None = None) -> str:
    """The unscaled game a scaled variant comes from, as the catalogue records it (`Game.base`)."""
    return (bases or {}).get(game) or game


# --- checks -------------------------------------------------------------------------------------

def check_comparable(tables: Mapping[str, pd.DataFrame]) -> None:
    """Same scenarios, same split labels and same game kinds in every dataset — else a named error."""
    keys = {role: {(g, c): s for s, g, c in t[SCENARIO_KEYS].itertuples(index=False, name=None)}
            for role, t in tables.items()}
    roles = list(keys)
    reference = roles[0]
    for role in roles[1:]:
        missing = sorted(set(keys[reference]) - set(keys[role]))
        extra = sorted(set(keys[role]) - set(keys[reference]))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the {role} dataset lacks {len(missing)} scenario(s) the {reference} dataset has: "
                             + ", ".join(f"{g}/{c}" for g, c in missing[:8]) + (" …" if len(missing) > 8 else ""))
            if extra:
                parts.append(f"the {role} dataset has {len(extra)} scenario(s) the {reference} dataset lacks: "
                             + ", ".join(f"{g}/{c}" for g, c in extra[:8]) + (" …" if len(extra) > 8 else ""))
            raise EvaluationError("mismatched scenario sets: " + "; ".join(parts)
                                  + ". Sample every model on the same scenarios (or filter with metrics.splits).")
        for key, split in keys[role].items():
            if keys[reference][key] != split:
                raise EvaluationError(
                    f"scenario {key[0]}/{key[1]} is labelled split {keys[reference][key]!r} in the {reference} "
                    f"dataset but {split!r} in the {role} dataset"
                )
    kinds = {role: dict(zip(zip(t["game"], t["context"]), t["kind"])) for role, t in tables.items()}
    for key, kind in kinds[reference].items():
        for role in roles[1:]:
            if kinds[role][key] != kind:
                raise EvaluationError(f"scenario {key[0]}/{key[1]}: {reference} answers read as {kind}, "
                                      f"{role} answers as {kinds[role][key]}")


# --- the computation ----------------------------------------------------------------------------

def compute_evaluation(
    records: Mapping[str, pd.DataFrame],
    *,
    endowments: Mapping[str, int] | None = None,
    game_bases: Mapping[str, str] | None = None,
    splits: list[str] | None = None,
    training: Mapping | None = None,
    epsilon: float = transfer.DEFAULT_EPSILON,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Evaluation:
    """Propensities, transfer metrics per scenario and group, bootstrap CIs and z-tests.

    `records` maps each role (teacher, base, tuned) to its sample records (the record schema's
    columns split, game, context, action, action_probs, and optionally model, action_mass).
    `training` is what the tuned student's adapter was trained on (its `tomdistill_adapter.json`
    `training` record): with it, `in_sample` counts the trained scenarios only and the other in-sample
    scenarios (contexts held out for validation) form the `heldout_context` group.
    """
    missing_roles = [r for r in ROLES if r not in records]
    if missing_roles:
        raise EvaluationError(f"missing dataset(s) {missing_roles}; evaluation needs {list(ROLES)}")
    if n_bootstrap < 1:
        raise EvaluationError(f"metrics.n_bootstrap must be ≥ 1, got {n_bootstrap}")
    if not 0 < confidence < 1:
        raise EvaluationError(f"metrics.confidence must be in (0, 1), got {confidence}")
    if splits is not None:
        unknown = [s for s in splits if s not in REPORT_SPLITS]
        if unknown:
            raise EvaluationError(f"unknown split name(s) {unknown} in metrics.splits; expected some of {list(REPORT_SPLITS)}")
    warnings: list[str] = []
    records = dict(records)
    if training:
        for role in ROLES:
            records[role], notes = label_heldout_scenarios(records[role], training)
            warnings.extend(notes if role == "teacher" else [])
        if training.get("target") == "motivation_answer":
            warnings.append("the tuned student was trained to reason before answering (data.target=motivation_answer) but "
                            "is scored with `Answer:` right after the prompt, without its reasoning")
    answers, props, donations = {}, {}, {}
    for role in ROLES:
        training_only = records[role]["split"].isin(TRAINING_ONLY_SPLITS)
        if training_only.any():
            warnings.append(f"{role}: {int(training_only.sum())} record(s) of the training-only split(s) "
                            f"{sorted(set(records[role].loc[training_only, 'split']))} are not evaluated")
        mixed = mixed_scenarios(records[role][~training_only])
        if mixed:
            warnings.append(f"{role}: {len(mixed)} scenario(s) hold both score-mode records and sampled answers; the "
                            "score-mode probabilities are used and the sampled answers not counted ("
                            + ", ".join(f"{k}: {n} answers" for k, n in list(mixed.items())[:6])
                            + (" …" if len(mixed) > 6 else "") + ")")
        table = answer_table(records[role][~training_only], role, endowments)
        if splits is not None:
            table = table[table["split"].isin(splits)]
            if table.empty:
                raise EvaluationError(f"{role} dataset: no scenarios in the chosen splits {splits}")
        answers[role] = table
        props[role] = scenario_propensities(table, role)
        donations[role] = donation_shares(records[role][~training_only], table)
    check_comparable(props)

    models = {role: _model_name(records[role], role) for role in ROLES}
    modes = {role: sorted(set(props[role]["mode"])) for role in ROLES}
    if len({tuple(m) for m in modes.values()}) > 1:
        warnings.append("propensities come from different modes (" + ", ".join(f"{r}: {'/'.join(m)}" for r, m in modes.items())
                        + "): sampled shares and exact probabilities differ by sampling noise and parsing")

    # Scenario order: the teacher's, sorted by split then as sampled.
    order = props["teacher"][SCENARIO_KEYS + ["kind"]].copy()
    order["_split_rank"] = order["split"].map({s: i for i, s in enumerate(REPORT_SPLITS)})
    order = order.sort_values(["_split_rank"], kind="stable").drop(columns="_split_rank").reset_index(drop=True)
    aligned = {role: order[SCENARIO_KEYS].merge(props[role], on=SCENARIO_KEYS, how="left") for role in ROLES}
    p = {role: aligned[role]["p"].to_numpy(float) for role in ROLES}

    per_scenario = transfer.scenario_transfer(p["teacher"], p["base"], p["tuned"], epsilon)
    groups_meta, masks = transfer.group_masks(order)
    point = transfer.group_transfer(p["teacher"], p["base"], p["tuned"], masks, per_scenario["defined"])

    rng = np.random.default_rng(seed)
    exact = all(((props[r]["mode"] == "score") & (props[r]["n_parsed"] == 1)).all() for r in ROLES)
    if exact:  # exact probabilities: resample the scenarios within each group instead of answers
        weights = stats.scenario_bootstrap_weights(masks, n_bootstrap, rng)
        boot = transfer.group_transfer_weighted(p["teacher"], p["base"], p["tuned"], weights, per_scenario["defined"])
    else:
        resampled = {role: stats.bootstrap_scenario_means(answers[role], order, n_bootstrap, rng) for role in ROLES}
        boot = transfer.group_transfer(resampled["teacher"], resampled["base"], resampled["tuned"], masks,
                                       per_scenario["defined"])
    groups = pd.DataFrame(groups_meta)
    # resampling the scenarios of a one-scenario group always draws that scenario: no interval, not a zero-width one
    no_interval = (point["n_scenarios"] < 2) if exact else np.zeros(len(groups), bool)
    for metric in transfer.TRANSFER_METRICS:
        low, high = stats.percentile_interval(boot[metric], confidence)
        groups[metric] = point[metric]
        groups[f"{metric}_ci_low"] = np.where(no_interval, np.nan, low)
        groups[f"{metric}_ci_high"] = np.where(no_interval, np.nan, high)
    groups["n_scenarios"], groups["n_defined"] = point["n_scenarios"], point["n_defined"]

    scenarios = order.copy()
    for role in ROLES:
        scenarios[f"p_{role}"] = p[role]
        scenarios[f"n_unparsed_{role}"] = aligned[role]["n_unparsed"].to_numpy()
    for key in ("gap", "defined", *transfer.TRANSFER_METRICS):
        scenarios[key] = per_scenario[key]
    per_group = groups[groups["kind"] == "scenario"].reset_index(drop=True)
    for metric in transfer.TRANSFER_METRICS:
        scenarios[f"{metric}_ci_low"] = per_group[f"{metric}_ci_low"].to_numpy()
        scenarios[f"{metric}_ci_high"] = per_group[f"{metric}_ci_high"].to_numpy()
    scenarios.loc[~scenarios["defined"], ["improvement_ci_low", "improvement_ci_high"]] = np.nan

    for role in ROLES:
        scored = props[role][props[role]["mode"] == "score"]
        if len(scored) and (scored["n_parsed"] == 1).all():
            warnings.append(f"{role}: score mode with one record per scenario — its probabilities are exact, so the "
                            "bootstrap has no answers to resample for it" + (
                                "; the intervals resample scenarios within each group instead" if exact else
                                " and its intervals carry no sampling error"))
    undefined = scenarios[~scenarios["defined"]]
    for _, row in undefined.iterrows():
        warnings.append(EvaluationWarning(
            f"improvement undefined for {row['game']}/{row['context']} ({row['split']}): "
            f"|base − teacher| = {abs(row['gap']):.4f} < epsilon {epsilon}; left out of the improvement means",
            kind="improvement_undefined", scenario=f"{row['game']}/{row['context']}", detail=f"gap {abs(row['gap']):.4f}"))
    for role in ROLES:
        unparsed = props[role][props[role]["n_unparsed"] > 0]
        if len(unparsed):
            listing = ", ".join(f"{r.game}/{r.context} {r.n_unparsed}/{r.n}" for r in unparsed.itertuples())
            warnings.append(f"{role}: unparsed answers left out of the propensities in {len(unparsed)} scenario(s): {listing}")

    # each model's mass on the answers per scenario, for the figures to mark where it is low
    propensities = pd.concat([aligned[role].assign(role=role, model=models[role],
                                                   action_mass=scenario_mass(records[role], aligned[role]))
                              for role in ROLES], ignore_index=True)
    propensities = propensities[["role", "model", *[c for c in propensities.columns if c not in ("role", "model")]]]
    cooperation = group_propensities(propensities, model_column="role")

    action_mass = {}
    for role in ROLES:
        table = records[role]
        mass = pd.to_numeric(table.get("action_mass", pd.Series(dtype=float, index=table.index)), errors="coerce")
        if mass.notna().any():
            valid = mass.dropna()
            action_mass[role] = {"mean": float(valid.mean()), "min": float(valid.min()), "max": float(valid.max())}
            for index in valid.index:
                scenario_id = f"{table.at[index, 'game']}/{table.at[index, 'context']}"
                problem = mass_warning(scenario_id, float(valid[index]))
                if problem:  # one per record: the report folds them per role and kind
                    warnings.append(EvaluationWarning(
                        f"{role}: action_mass {problem}", role=role, scenario=scenario_id, detail=f"{valid[index]:.3f}",
                        kind="action_mass_above_1" if valid[index] > 1 else "action_mass_low"))

    format_mass = public_goods_mass(records, props)
    null_table, cross_entropy, notes = null_student_table(records["teacher"], scenarios.assign(
        endowment=aligned["teacher"]["endowment"]), endowments, game_bases, format_mass)
    warnings.extend(notes)
    return Evaluation(
        models=models,
        prompt_version=str(records["teacher"]["prompt_version"].iloc[0]) if "prompt_version" in records["teacher"] else "",
        propensities=propensities,
        answers=pd.concat([answers[role].assign(role=role) for role in ROLES], ignore_index=True),
        donations=pd.concat([donations[role].assign(role=role) for role in ROLES], ignore_index=True),
        scenarios=scenarios,
        groups=groups,
        cooperation=cooperation,
        significance=_payoff_significance(aligned["tuned"], game_bases, confidence),
        pairwise=_pairwise(aligned, confidence),
        paper_convention=paper_convention(aligned),
        action_mass=action_mass,
        null_students=null_table,
        training_cross_entropy=cross_entropy,
        format_mass=format_mass,
        warnings=warnings,
        settings={"epsilon": epsilon, "n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed,
                  "splits": splits, "bootstrap": BOOTSTRAP_SCENARIOS if exact else BOOTSTRAP_ANSWERS,
                  "propensity": "exact" if all((props[r]["mode"] == "score").all() for r in ROLES) else "sampled",
                  "trained_scenarios_known": bool(training),
                  "teacher_labels": (training or {}).get("teacher_labels")},
    )


def public_goods_mass(records: Mapping[str, pd.DataFrame], props: Mapping[str, pd.DataFrame],
                      roles=STUDENTS) -> dict[str, dict[str, float | None]]:
    """Each student's mean mass on the public-goods answers per split (and "overall"), over the split's public-goods
    scenarios: {split: {role: mass}}, only for splits holding public goods. A scenario's mass is, in score mode, the
    mean `action_mass` of its score records (None where they carry none), and for sampled answers the share that
    parsed (an unparsed answer is mass outside the format; records.py and `answer_table` count it apart). The headline
    withholds a split's numbers where a student's mass is below `transfer.MIN_FORMAT_MASS` (Evaluation.headline)."""
    out: dict[str, dict[str, float | None]] = {}
    for role in roles:
        table = props[role][props[role]["kind"] == "public_goods"]
        if table.empty:
            continue
        frame = table[["split"]].assign(mass=scenario_mass(records[role], table))
        for split, group in [*frame.groupby("split", sort=False), ("overall", frame)]:
            value = group["mass"].mean()  # scenarios without a known mass are left out
            out.setdefault(split, {})[role] = None if math.isnan(value) else float(value)
    return out


def scenario_mass(records: pd.DataFrame, props: pd.DataFrame) -> np.ndarray:
    """A model's mass on the answers for each scenario (row) of `props`: in score mode the mean `action_mass` of its
    score records (NaN where they carry none), for sampled answers the share that parsed."""
    scored = is_scored(records)
    mass = (pd.to_numeric(records["action_mass"], errors="coerce") if "action_mass" in records
            else pd.Series(np.nan, records.index))
    by_scenario = mass[scored].groupby([records.loc[scored, k] for k in SCENARIO_KEYS]).mean()
    values = [by_scenario.get((r.split, r.game, r.context), np.nan) if r.mode == "score" else r.n_parsed / r.n
              for r in props.itertuples()]
    return np.asarray(values, dtype=float)


def null_student_table(teacher_records: pd.DataFrame, scenarios: pd.DataFrame, endowments=None, game_bases=None,
                       format_mass: Mapping | None = None) -> tuple[pd.DataFrame, dict[str, float], list[str]]:
    """The null students (metrics/null_students.py) against this evaluation's teacher and base: one row per null
    student × split and overall, point values. They are built from the teacher's propensities on its `in_sample`
    records (as labelled here: the trained scenarios when the adapter's training record is known), whatever
    `metrics.splits` evaluates. `scenarios`: Evaluation.scenarios with each scenario's `endowment`. A split whose
    base student is off format on public goods has no value (the null students answer in format by construction).
    Returns the table, the cross-entropies on the training scenarios (`null_students.training_cross_entropy`) and
    notes for the warnings."""
    trained = teacher_records[teacher_records["split"] == "in_sample"]
    if trained.empty:
        return pd.DataFrame(), {}, ["no null students: the teacher dataset holds no in_sample (training) scenario"]
    training = scenario_propensities(answer_table(trained, "teacher dataset (training scenarios)", endowments), "teacher")
    nulls = null.null_propensities(training, scenarios, game_bases)
    table = null.null_transfer(nulls, scenarios, scenarios["p_teacher"], scenarios["p_base"], scenarios["defined"])
    verdicts = [transfer.format_verdict({"base": (format_mass or {})[s].get("base")})
                if (format_mass or {}).get(s) else None for s in table["split"]]
    table["off_format"] = [v["off_format"] if v else None for v in verdicts]
    table["base_action_mass"] = [v["action_mass"].get("base", np.nan) if v else np.nan for v in verdicts]
    table["reason"] = [v.get("reason", "") if v else "" for v in verdicts]
    table.loc[table["off_format"].eq(True), list(transfer.TRANSFER_METRICS)] = np.nan
    return table, null.training_cross_entropy(training, game_bases), []


def label_heldout_scenarios(records: pd.DataFrame, training: Mapping) -> tuple[pd.DataFrame, list[str]]:
    """Relabel the in-sample scenarios the adapter was not trained on as `heldout_context`.

    `training["trained_scenarios"]` lists "game/context" ids; `validation_contexts` the contexts held out.
    Returns the relabelled records and notes on in-sample scenarios neither trained nor held out.
    """
    trained = set(training.get("trained_scenarios") or [])
    if not trained:
        return records, []
    held_out = set(training.get("validation_contexts") or [])
    ids = records["game"].astype(str) + "/" + records["context"].astype(str)
    untrained = (records["split"] == "in_sample") & ~ids.isin(trained)
    out = records.copy()
    out.loc[untrained, "split"] = HELDOUT_CONTEXT
    stray = sorted(set(ids[untrained & ~records["context"].isin(held_out)]))
    notes = []
    if stray:
        notes.append(f"{len(stray)} in-sample scenario(s) were neither trained on nor in a held-out validation context "
                     f"({', '.join(stray[:6])}{' …' if len(stray) > 6 else ''}); they are reported under {HELDOUT_CONTEXT}")
    return out, notes


def _model_name(records: pd.DataFrame, role: str) -> str:
    if "model" not in records:
        return role
    names = sorted(set(records["model"].dropna().astype(str)))
    return names[0] if len(names) == 1 else "+".join(names)


def _payoff_significance(tuned: pd.DataFrame, game_bases, confidence: float) -> pd.DataFrame:
    """The paper's Table 1: the tuned model's share of C, in-sample game vs the same game with scaled payoffs."""
    table = tuned.copy()
    table["base_game"] = [base_game_of(g, game_bases) for g in table["game"]]
    left = table[table["split"].isin(["in_sample", HELDOUT_CONTEXT])]  # the in-sample games, trained or held out
    right = table[table["split"] == "oos_payoffs"]
    if left.empty or right.empty:
        return pd.DataFrame()
    tests = stats.ztest_table(left, right, on=["context", "base_game"], confidence=confidence)
    if tests.empty:
        return tests
    return tests.rename(columns={"base_game": "game", "p1": "p_in_sample", "p2": "p_scaled_payoffs"})


def _pairwise(aligned: Mapping[str, pd.DataFrame], confidence: float) -> pd.DataFrame:
    frames = []
    for other in ("base", "teacher"):
        tests = stats.ztest_table(aligned[other], aligned["tuned"], on=SCENARIO_KEYS, confidence=confidence)
        if not tests.empty:
            frames.append(tests.assign(comparison=f"tuned − {other}"))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["comparison", *[c for c in out.columns if c != "comparison"]]]


def paper_convention(aligned: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """Mean improvement per split computed the way the paper's tables do.

    Two-action games: C divided by *all* draws (unparsed included); public goods: mean donations
    rounded to cents. Only for generate-mode data with counts; shows where the paper's printed
    numbers come from.
    """
    p = {}
    for role, table in aligned.items():
        if (table["mode"] != "generate").any():
            return {}
        values = np.where(table["kind"] == "matrix", table["n_C"] / table["n"],
                          np.round(table["mean_donation"].astype(float), 2))
        p[role] = values.astype(float)
    split = aligned["teacher"]["split"].to_numpy()
    values = transfer.improvement_per_scenario(p["base"], p["tuned"], p["teacher"])
    out = {}
    for name in REPORT_SPLITS:
        chosen = values[(split == name) & ~np.isnan(values)]
        if chosen.size:
            out[name] = float(chosen.mean())
    return out


# --- the Hydra edge -----------------------------------------------------------------------------

def resolve_source(source, role: str, cache_dir: str | Path):
    """A samples location: a directory, a parquet file, a hub id, or `reference:<name>/<role>`."""
    if source is None or str(source).strip() == "":
        raise EvaluationError(f"no {role} dataset given: pass {role}=DIR (a samples directory, a .parquet file, "
                              f"a hub id) or {role}=reference:paper_published/{role}")
    text = str(source)
    if not text.startswith(REFERENCE_PREFIX):
        return text
    name, _, ref_role = text[len(REFERENCE_PREFIX):].partition("/")
    if name != "paper_published":
        raise EvaluationError(f"{role} dataset {text}: unknown reference data {name!r}; available: paper_published")
    from tomdistill.reference import paper_published

    ref_role = ref_role or role
    if ref_role not in paper_published.ROLES:
        raise EvaluationError(f"{role} dataset {text}: unknown role {ref_role!r}; expected one of {paper_published.ROLES}")
    return str(paper_published.materialise(cache_dir)[ref_role])


def load_records(source: str, role: str) -> tuple[pd.DataFrame, object]:
    from tomdistill.records import load_samples

    dataset = load_samples(source, name=role)
    columns = [c for c in RECORD_FIELDS if c in dataset.column_names]
    return dataset.select_columns(columns).to_pandas(), dataset


def catalogue_facts(scenarios_cfg) -> tuple[dict[str, int], dict[str, str], str | None]:
    """Endowments of public goods games and the base game of each scaled variant, from the configured
    catalogue (with its `extra_dirs` and augmentation, as sample.py and train.py read it)."""
    from tomdistill.scenarios import CatalogueError, catalogue_from_config

    try:
        catalogue = catalogue_from_config(scenarios_cfg)
    except CatalogueError as err:
        return {}, {}, f"scenario catalogue unavailable ({err}); game kinds inferred from the answers"
    endowments = {n: g.endowment for n, g in catalogue.games.items() if g.kind == "public_goods"}
    bases = {n: g.base for n, g in catalogue.games.items() if g.base}
    return endowments, bases, None


def tuned_training_record(source: str) -> dict | None:
    """What the tuned student's adapter was trained on, from its samples' manifest (None if unknown)."""
    from tomdistill.records import read_manifest

    path = Path(source)
    if not path.is_dir():
        return None
    return read_manifest(path).get("adapter_training")


def evaluated_model(manifest: Mapping, samples: str) -> dict:
    """What answered in a samples location, from its manifest (sampling/manifest.py): the model's name, the weights it
    was loaded from (a local directory or hub id; for a GGUF model the snapshot directory model/loading.py builds from
    it; for recorded answers their source) and the adapter on them (None: the plain model)."""
    model_cfg = (manifest.get("config") or {}).get("model") or {}
    gguf = model_cfg.get("gguf") or {}
    if manifest.get("recording"):
        weights = f"recorded answers from {manifest['recording'].get('source')}"
    elif model_cfg.get("name_or_path"):
        weights = str(model_cfg["name_or_path"])
    elif gguf.get("file"):
        cache_dir = (manifest.get("config") or {}).get("paths", {}).get("cache_dir", "<cache>")
        snapshot = Path(cache_dir) / "models" / (model_cfg.get("cache_name") or Path(gguf["file"]).stem)
        weights = f"{snapshot} (from {gguf.get('package')}/{gguf['file']})"
    elif model_cfg.get("tiny"):
        weights = "a tiny random model (model.tiny)"
    else:
        weights = None  # no manifest (a parquet file, a hub dataset): unknown
    return {"samples": samples, "model": manifest.get("model"), "weights": weights, "adapter": manifest.get("adapter")}


def evaluated_models(sources: Mapping[str, str], given: Mapping[str, str]) -> dict[str, dict]:
    """`evaluated_model` for each role's samples (`sources`: resolved locations, `given`: as the user passed them)."""
    from tomdistill.records import read_manifest

    return {role: evaluated_model(read_manifest(sources[role]) if Path(sources[role]).is_dir() else {}, given[role])
            for role in sources}


def reference_evaluation(cache_dir, **kwargs) -> Evaluation:
    """The paper's published counts, evaluated exactly like a user's samples (their games are the shipped
    catalogue's: its scaled games name their base)."""
    if kwargs.get("game_bases") is None:
        from tomdistill import CATALOGUE_DIR
        from tomdistill.scenarios import load_catalogue

        kwargs["game_bases"] = {n: g.base for n, g in load_catalogue(CATALOGUE_DIR).games.items() if g.base}
    records = {role: load_records(resolve_source(f"{REFERENCE_PREFIX}paper_published/{role}", role, cache_dir), role)[0]
               for role in ROLES}
    return compute_evaluation(records, **kwargs)


def evaluate(cfg) -> dict:
    """Run the evaluation for a Hydra config (see conf/evaluate.yaml); returns summary.json's content."""
    from omegaconf import OmegaConf

    from tomdistill.records import check_same_prompt_version, prompt_versions
    from tomdistill.report import write_report

    compare = cfg.get("compare")
    if compare not in (None, "paper_published"):
        raise EvaluationError(f"unknown compare={compare!r}; expected null or paper_published")
    from tomdistill.paths import run_output_dir

    output = run_output_dir(cfg.get("output"))
    cache_dir = cfg.paths.cache_dir
    metrics_cfg = cfg.metrics
    if int(metrics_cfg.n_bootstrap) < 1000:
        print(f"note: metrics.n_bootstrap={metrics_cfg.n_bootstrap} < 1000; intervals will be rough")

    records, datasets_by_role, sources = {}, {}, {}
    for role in ROLES:
        sources[role] = resolve_source(cfg.get(role), role, cache_dir)
        records[role], datasets_by_role[role] = load_records(sources[role], role)
    # base and tuned must have seen the same prompts; the teacher the same scenarios, however it was asked
    version = check_same_prompt_version(datasets_by_role, elicitation_may_differ=("teacher",))
    teacher_version = next(iter(prompt_versions(datasets_by_role["teacher"])))
    training = tuned_training_record(sources["tuned"])

    endowments, bases, catalogue_warning = catalogue_facts(cfg.scenarios)
    splits = OmegaConf.to_container(metrics_cfg.splits) if metrics_cfg.get("splits") is not None else None
    options = dict(endowments=endowments, game_bases=bases, splits=splits, epsilon=float(metrics_cfg.epsilon),
                   n_bootstrap=int(metrics_cfg.n_bootstrap), confidence=float(metrics_cfg.confidence),
                   seed=int(cfg.seed))
    result = compute_evaluation(records, training=training, **options)
    if catalogue_warning:
        result.warnings.insert(0, catalogue_warning)
    if teacher_version != version:
        result.warnings.insert(0, f"the teacher's answers were elicited differently (prompt_version {teacher_version}) "
                                  f"from the students' ({version}); same scenarios, other answer prompt")
    if training is None:
        result.warnings.insert(0, "the tuned samples do not say which scenarios their adapter was trained on (no "
                                  "adapter_training in their manifest): in_sample counts every in-sample scenario")

    reference = None
    if compare is not None:
        reference = reference_evaluation(cache_dir, **{**options, "splits": None})

    given = {role: str(cfg.get(role)) for role in ROLES}
    summary = write_report(result, output, reference=reference, sources=given,
                           evaluated=evaluated_models(sources, given))
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")  # conf/logger/wandb.yaml
    if wandb_cfg:
        from tomdistill.report.wandb_logging import log_to_wandb

        log_to_wandb(result, output, summary, logger_cfg=OmegaConf.to_container(wandb_cfg, resolve=True),
                     run_config=OmegaConf.to_container(cfg, resolve=False))
    from tomdistill.report.console import print_summary

    print_summary(result, summary, output, reference=reference)
    return summary
