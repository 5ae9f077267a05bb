"""Propensity to cooperate per model × scenario, from sample records (pure functions on DataFrames).

Everything starts from an *answer table*: for one model, one row per (scenario, answer value)
with a count. The value is on the propensity scale, in [0, 1]:
- generate mode, two-action games: 1 for `C`, 0 for `D`;
- generate mode, public goods: the donation as a share of the endowment;
- score mode (`action_probs`): one row per record, P(C) renormalised over C/D, or the expected
  donation as a share of the endowment; a scenario with score-mode records is measured by them
  alone (its sampled answers, if the dataset also holds some, are not counted: `mixed_scenarios`);
- unparsed answers: value NaN (counted, never part of a propensity).
The point estimate is the count-weighted mean of the parsed values, and the bootstrap
(`stats.bootstrap_scenario_means`) resamples exactly these rows — one source for both.
"""
from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np
import pandas as pd

from tomdistill.errors import UserError
from tomdistill.scenarios.catalogue import REPORT_SPLITS
from tomdistill.scenarios.parsing import UNPARSED

SCENARIO_KEYS = ["split", "game", "context"]
MATRIX_ACTIONS = ("C", "D")
DEFAULT_ENDOWMENT = 10


class PropensityError(ValueError, UserError):
    """Records that cannot give a propensity; the message names the dataset and the scenario."""


def _is_amount(action: str) -> bool:
    return action.isdigit()


def choice_propensity(probs: Mapping[str, float], kind: str | None = None, endowment: int | None = None,
                      label: str = "choice distribution") -> float:
    """The propensity to cooperate of one choice distribution: P(C) renormalised over C and D, or the expected
    donation as a share of the endowment, renormalised over the amounts. The one definition behind evaluation's
    score-mode records and training's `val/alignment` (model/lora_module.py) alike.

    `kind`: "matrix" or "public_goods" (None: matrix when C or D is a key); `endowment`: None = the largest amount.
    """
    if kind is None:
        kind = "matrix" if any(a in probs for a in MATRIX_ACTIONS) else "public_goods"
    if kind == "matrix":
        c, d = float(probs.get("C", 0.0)), float(probs.get("D", 0.0))
        if c + d <= 0:
            raise PropensityError(f"{label}: action_probs {dict(probs)} puts no probability on C or D")
        return c / (c + d)
    amounts = amount_distribution(probs, label)
    return sum(a * p for a, p in amounts.items()) / (endowment or max(amounts))


def amount_distribution(probs: Mapping[str, float], label: str = "choice distribution") -> dict[int, float]:
    """A public-goods choice distribution renormalised over its whole-dollar amounts: {amount: probability}."""
    amounts = {int(a): float(p) for a, p in probs.items() if str(a).isdigit()}
    total = sum(amounts.values())
    if total <= 0:
        raise PropensityError(f"{label}: action_probs {dict(probs)} puts no probability on any donation")
    return {a: p / total for a, p in amounts.items()}


def _score_value(raw, kind: str, endowment: int, label: str) -> float:
    return choice_propensity(json.loads(raw) if isinstance(raw, str) else dict(raw), kind, endowment, label)


def is_scored(records: pd.DataFrame) -> pd.Series:
    """Which records are score-mode records (they carry `action_probs`)."""
    if "action_probs" not in records:
        return pd.Series(False, index=records.index)
    return records["action_probs"].map(lambda v: v not in (None, "") and not (isinstance(v, float) and math.isnan(v)))


def mixed_scenarios(records: pd.DataFrame) -> dict[str, int]:
    """Scenarios holding both score-mode records and sampled answers: {"game/context": sampled answers not counted}.

    The rule (`answer_table`): a scenario with score-mode records is measured by them alone (exact
    probabilities); its sampled answers are left out, never added as extra answers.
    """
    scored = is_scored(records)
    out = {}
    for (game, context), group in records.groupby(["game", "context"], sort=False):
        flags = scored.loc[group.index]
        if flags.any() and not flags.all():
            out[f"{game}/{context}"] = int((~flags).sum())
    return out


def answer_table(records: pd.DataFrame, dataset: str, endowments: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per (scenario, value) with its count; see the module docstring.

    `records` needs the columns split, game, context, action, action_probs. `endowments` maps
    public-goods game names to their endowment (from the catalogue); a game not listed there is
    a public goods game when its parsed answers are whole numbers (endowment 10 unless larger
    answers occur). Errors name `dataset` and the scenario.
    """
    endowments = dict(endowments or {})
    rows = []
    for (split, game, context), group in records.groupby(SCENARIO_KEYS, sort=False):
        label = f"{dataset} dataset, scenario {game}/{context} ({split})"
        if split not in REPORT_SPLITS:
            raise PropensityError(f"{label}: unknown split name {split!r}; expected one of {list(REPORT_SPLITS)}")
        actions = group["action"].astype(str)
        parsed = actions[actions != UNPARSED]
        if game in endowments:
            kind, endowment = "public_goods", int(endowments[game])
        elif parsed.isin(MATRIX_ACTIONS).all():
            kind, endowment = "matrix", 0
        elif parsed.map(_is_amount).all():
            kind = "public_goods"
            endowment = max(DEFAULT_ENDOWMENT, max((int(a) for a in parsed), default=0))
        else:
            odd = sorted(set(parsed[~parsed.isin(MATRIX_ACTIONS) & ~parsed.map(_is_amount)]))[:5]
            raise PropensityError(f"{label}: actions {odd} are neither C/D nor a whole-dollar amount")
        scored = is_scored(group)
        base = {"split": split, "game": game, "context": context, "kind": kind, "endowment": endowment}
        if scored.any():  # exact probabilities win: the scenario's sampled answers are not counted too
            for raw in group.loc[scored, "action_probs"]:
                rows.append({**base, "mode": "score", "value": _score_value(raw, kind, endowment, label), "count": 1})
            continue
        if kind == "matrix":
            values = parsed.map({"C": 1.0, "D": 0.0})
        else:
            values = parsed.astype(int) / endowment
            if (values > 1).any():
                raise PropensityError(f"{label}: a donation exceeds the endowment {endowment}")
        for value, count in values.value_counts().sort_index(ascending=False).items():
            rows.append({**base, "mode": "generate", "value": float(value), "count": int(count)})
        n_unparsed = int((actions == UNPARSED).sum())
        if n_unparsed:
            rows.append({**base, "mode": "generate", "value": math.nan, "count": n_unparsed})
    return pd.DataFrame(rows, columns=[*SCENARIO_KEYS, "kind", "endowment", "mode", "value", "count"])


def donation_shares(records: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """Public goods: each scenario of `answers` (`answer_table(records, …)`) as a distribution over the
    whole-dollar amounts 0..endowment, one row per (scenario, amount) with its `share` — the parsed answers'
    frequencies, or in score mode P(amount) renormalised over the amounts (the distribution `choice_propensity`
    takes the mean of), averaged over the scenario's records.
    """
    rows = []
    for (split, game, context), group in answers[answers["kind"] == "public_goods"].groupby(SCENARIO_KEYS, sort=False):
        endowment = int(group["endowment"].iloc[0])
        shares = np.zeros(endowment + 1)
        if (group["mode"] == "score").any():
            chosen = records[(records["split"] == split) & (records["game"] == game) & (records["context"] == context)]
            for raw in chosen.loc[is_scored(chosen), "action_probs"]:
                probs = json.loads(raw) if isinstance(raw, str) else dict(raw)
                for amount, p in amount_distribution(probs).items():  # the distribution choice_propensity averages
                    if amount > endowment:
                        raise PropensityError(f"scenario {game}/{context} ({split}): action_probs scores ${amount}, "
                                              f"more than the endowment {endowment}")
                    shares[amount] += p
        else:
            parsed = group[group["value"].notna()]
            for value, count in zip(parsed["value"], parsed["count"]):
                shares[round(value * endowment)] += count
        shares = shares / shares.sum() if shares.sum() > 0 else shares
        rows += [{"split": split, "game": game, "context": context, "amount": amount, "share": float(share)}
                 for amount, share in enumerate(shares)]
    return pd.DataFrame(rows, columns=[*SCENARIO_KEYS, "amount", "share"])


def scenario_propensities(answers: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per scenario: n, n_parsed, n_unparsed, n_C, n_D, p (propensity), p_se, mean donation and its SE.

    Raises PropensityError when a scenario has no parsed answer (a propensity would be made up).
    """
    out = []
    for (split, game, context), group in answers.groupby(SCENARIO_KEYS, sort=False):
        parsed = group[group["value"].notna()]
        n_parsed = int(parsed["count"].sum())
        n_unparsed = int(group.loc[group["value"].isna(), "count"].sum())
        if n_parsed == 0:
            raise PropensityError(
                f"{dataset} dataset, scenario {game}/{context} ({split}): no parsed answers "
                f"({n_unparsed} unparsed) — no propensity can be computed"
            )
        kind, endowment, mode = group["kind"].iloc[0], int(group["endowment"].iloc[0]), group["mode"].iloc[0]
        weights = parsed["count"].to_numpy(float)
        values = parsed["value"].to_numpy(float)
        p = float(np.average(values, weights=weights))
        variance = float(np.average((values - p) ** 2, weights=weights))
        se = math.sqrt(variance / n_parsed)
        row = {
            "split": split, "game": game, "context": context, "kind": kind, "mode": mode,
            "n": n_parsed + n_unparsed, "n_parsed": n_parsed, "n_unparsed": n_unparsed,
            "n_C": math.nan, "n_D": math.nan, "p": p, "p_se": se,
            "mean_donation": math.nan, "donation_se": math.nan, "endowment": endowment or math.nan,
        }
        if kind == "matrix" and mode == "generate":
            row["n_C"] = int(parsed.loc[parsed["value"] == 1.0, "count"].sum())
            row["n_D"] = int(parsed.loc[parsed["value"] == 0.0, "count"].sum())
        if kind == "public_goods":
            row["mean_donation"], row["donation_se"] = p * endowment, se * endowment
        out.append(row)
    return pd.DataFrame(out)


def group_propensities(propensities: pd.DataFrame, model_column: str = "model") -> pd.DataFrame:
    """Mean scenario propensity of each model per split, per game and per context (and overall).

    `propensities` holds the scenario tables of several models, told apart by `model_column`. Public
    goods propensities are shares of the endowment; their mean donations are reported apart.
    """
    rows = []
    for model, table in propensities.groupby(model_column, sort=False):
        for by in ("split", "game", "context"):
            for name, group in table.groupby(by, sort=False):
                rows.append({model_column: model, "by": by, "group": name, "p": group["p"].mean(),
                             "n_scenarios": len(group), "n_unparsed": int(group["n_unparsed"].sum())})
        rows.append({model_column: model, "by": "overall", "group": "overall", "p": table["p"].mean(),
                     "n_scenarios": len(table), "n_unparsed": int(table["n_unparsed"].sum())})
    return pd.DataFrame(rows)
