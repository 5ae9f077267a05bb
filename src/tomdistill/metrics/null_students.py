"""Null students: what a student that learned nothing but the teacher's averages would score (pure functions).

A tuned student is measured against the distance between the base and the teacher. A student that answers every
scenario with the teacher's mean propensity on the training scenarios already closes much of that distance when the
teacher is far from the base (issue 49: the 70b's in-sample mean against SmolLM2's base scores about 0.5 alignment
on every split, above the paper's 7b student). So the evaluation sets these null students beside the tuned one,
each built from the teacher's propensities on the TRAINING scenarios only (the `in_sample` split as the evaluation
labels it: with the adapter's training record, the scenarios it trained on) and scored against the same teacher and
base with the same group machinery (`transfer.group_masks`, `transfer.group_transfer`):

- `teacher_mean`: the teacher's mean propensity over the training scenarios, for every scenario;
- `context_mean`: the teacher's mean over the training scenarios of the scenario's context where that context was
  trained, else the overall mean (it knows the context, not the game);
- `game_mean`: the mean over the training scenarios of the scenario's base game (a scaled variant such as
  `prisoners_dilemma_x2` counts as the game it was scaled from, `Game.base`) where that game was trained, else the
  overall mean;
- `uniform_amounts`: public goods only, uniform over the allowed amounts 0..endowment, whose propensity (the
  expected donation over the endowment, `propensity.choice_propensity`) is 1/2; it answers no two-action game, so a
  group holding one has no value for it.

`training_cross_entropy` says how far apart these students are where the soft loss trains: each one's mean
cross-entropy against the teacher's choice distribution on the two-action training scenarios, beside the teacher's
own entropy, the floor of that loss. A training loss that sits at `context_mean`'s has learned the contexts alone;
when the teacher's entropy lies just below it, the games add almost nothing to learn (docs/findings.md, "The real
teacher").

Propensities are on the evaluation's scale (P(C) or the donation share), so the means mix the two-action games'
P(C) and, where public goods was trained, donation shares, exactly as a student answering with one number would.
The null rows are point values: no bootstrap interval is drawn for them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from . import transfer
from .propensity import choice_propensity

NULL_STUDENTS = ("teacher_mean", "context_mean", "game_mean", "uniform_amounts")
DESCRIPTIONS = {
    "teacher_mean": "the teacher's mean propensity over the training scenarios, everywhere",
    "context_mean": "the teacher's training mean for the scenario's context (trained contexts), else its overall mean",
    "game_mean": "the teacher's training mean for the scenario's base game (trained games), else its overall mean",
    "uniform_amounts": "public goods only: every amount 0..endowment equally likely (propensity 1/2)",
}
NULL_GROUP_KINDS = ("overall", "split")  # the headline's groups


def uniform_amounts_propensity(endowment: int) -> float:
    """The propensity of a public-goods answer spread evenly over the whole-dollar amounts 0..endowment."""
    endowment = int(endowment)
    if endowment < 1:
        raise ValueError(f"endowment {endowment}: expected a whole number ≥ 1")
    uniform = {str(amount): 1.0 / (endowment + 1) for amount in range(endowment + 1)}
    return choice_propensity(uniform, "public_goods", endowment)


def null_propensities(training: pd.DataFrame, scenarios: pd.DataFrame,
                      game_bases: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Each null student's propensity on every evaluated scenario: {name: array aligned with `scenarios`}.

    `training`: the teacher's propensity on each training scenario (columns game, context, p).
    `scenarios`: the evaluated scenarios (columns game, context; `kind` and `endowment` for public goods: a
    scenario without kind "public_goods" gets NaN from `uniform_amounts`). `game_bases` maps a scaled game to the
    game it was scaled from (the catalogue's `Game.base`); a game not in it is its own base.
    """
    if training.empty:
        raise ValueError("null students need the teacher's propensities on at least one training scenario")
    bases = dict(game_bases or {})

    def base(game: str) -> str:
        return bases.get(game) or game

    overall = float(training["p"].mean())
    by_context = training.groupby("context")["p"].mean().to_dict()
    by_game = training.assign(base_game=[base(g) for g in training["game"]]).groupby("base_game")["p"].mean().to_dict()
    games, contexts = scenarios["game"].astype(str), scenarios["context"].astype(str)
    kinds = scenarios["kind"] if "kind" in scenarios else pd.Series("matrix", index=scenarios.index)
    endowments = scenarios["endowment"] if "endowment" in scenarios else pd.Series(np.nan, index=scenarios.index)
    uniform = [uniform_amounts_propensity(e) if k == "public_goods" and pd.notna(e) else np.nan
               for k, e in zip(kinds, endowments)]
    return {
        "teacher_mean": np.full(len(scenarios), overall),
        "context_mean": np.array([by_context.get(c, overall) for c in contexts], dtype=float),
        "game_mean": np.array([by_game.get(base(g), overall) for g in games], dtype=float),
        "uniform_amounts": np.array(uniform, dtype=float),
    }


def null_transfer(nulls: Mapping[str, np.ndarray], scenarios: pd.DataFrame, p_teacher, p_base,
                  defined) -> pd.DataFrame:
    """Alignment and improvement of each null student per split and overall: one row per null student × group.

    `scenarios` (columns split, game, context) and the arrays are aligned; `defined` is the tuned student's
    (|base − teacher| ≥ epsilon), so a null student's improvement averages the same scenarios. A group holding a
    scenario the null student does not answer (NaN: `uniform_amounts` on a two-action game) has no value (NaN),
    `n_answered` says how many it answers. Point values only (no interval).
    """
    meta, masks = transfer.group_masks(scenarios)
    keep = [i for i, g in enumerate(meta) if g["kind"] in NULL_GROUP_KINDS]
    meta, masks = [meta[i] for i in keep], masks[keep]
    p_teacher, p_base = np.asarray(p_teacher, dtype=float), np.asarray(p_base, dtype=float)
    rows = []
    for name, p_null in nulls.items():
        p_null = np.asarray(p_null, dtype=float)
        answered = ~np.isnan(p_null)
        point = transfer.group_transfer(p_teacher, p_base, np.where(answered, p_null, 0.0), masks, defined)
        complete = ~(masks & ~answered).any(axis=1)
        for i, group in enumerate(meta):
            rows.append({
                "null_student": name, "split": group["group"],
                **{m: float(point[m][i]) if complete[i] else np.nan for m in transfer.TRANSFER_METRICS},
                "n_scenarios": int(point["n_scenarios"][i]), "n_answered": int((masks[i] & answered).sum()),
                "n_defined": int(point["n_defined"][i]),
            })
    return pd.DataFrame(rows, columns=["null_student", "split", *transfer.TRANSFER_METRICS, "n_scenarios",
                                       "n_answered", "n_defined"])


def training_cross_entropy(training: pd.DataFrame, game_bases: Mapping[str, str] | None = None) -> dict[str, float]:
    """{"teacher": its mean entropy, null student: its mean cross-entropy against the teacher} in nats, over the
    two-action training scenarios (`training`: columns game, context, kind, p = the teacher's P(C)). Empty where
    no two-action scenario trained. The null students are `null_propensities` built and answered on the training
    scenarios themselves; `uniform_amounts` answers none of them."""
    matrix = training[training["kind"] != "public_goods"] if "kind" in training else training
    if matrix.empty:
        return {}
    teacher = matrix["p"].to_numpy(float)
    nulls = null_propensities(training, training, game_bases)
    rows = (training["kind"] != "public_goods").to_numpy() if "kind" in training else np.ones(len(training), bool)

    def cross_entropy(p: np.ndarray, q: np.ndarray) -> float:
        q = np.clip(q, 1e-12, 1 - 1e-12)
        return float(np.mean(-(p * np.log(q) + (1 - p) * np.log(1 - q))))

    out = {"teacher": cross_entropy(teacher, teacher)}
    for name, p_null in nulls.items():
        if not np.isnan(p_null[rows]).any():
            out[name] = cross_entropy(teacher, p_null[rows])
    return out
