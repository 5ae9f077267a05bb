"""The oracle reference agent: a transparent, known-truth teacher (not a language model).

It holds a context-dependent belief `b` that the coplayer cooperates (theory of mind) and weighs
the other players' payoff by `w` (other-regard): `u = (1 - w) * own + w * others`, where `others`
is the total payoff of the other players (in a two-player game, the coplayer's). It picks each action
with logit probability over expected utilities, `P(a) ∝ exp(λ · EU(a))` (for two actions,
`P(C) = σ(λ (EU_C − EU_D))`). Public goods: the same response over donations 0..endowment, the
others expected to give `endowment · b` each; each dollar given costs the donor 1 − m/n and gives
the others (n − 1)·m/n in total (m the multiplier, n the players). Volunteer's dilemma: each other player
volunteers with probability `b`, independently; everyone gains the benefit if anyone volunteers, and each
volunteer pays the cost.

Records name the agent and its precision (`oracle_identity`): the context parameters are part of
the catalogue, hence of `prompt_version`, so two different oracles never pass for one.
"""
from __future__ import annotations

import math
import random

from .catalogue import Game, Scenario

ORACLE_MODEL_NAME = "oracle-logit"
# bumped whenever the agent's model changes (r2: `others` is the total payoff of the other players)
ORACLE_REVISION = "r2"
DEFAULT_PRECISION = 0.6


def oracle_identity(precision: float = DEFAULT_PRECISION) -> str:
    """What the records' `model` field says: the agent, its revision and its precision λ."""
    return f"{ORACLE_MODEL_NAME}-{ORACLE_REVISION}-lambda{precision:g}"


def expected_utilities(scenario: Scenario) -> dict[str, float]:
    game, context = scenario.game, scenario.context
    w, b = context.regard, context.belief
    if game.kind == "volunteer":
        return volunteer_utilities(game, w, b)
    if game.kind == "public_goods":
        n_others = game.players - 1
        others_give = game.endowment * b
        out = {}
        for action in game.actions:
            give = int(action)
            pot_share = game.multiplier * (give + n_others * others_give) / game.players
            own = game.endowment - give + pot_share
            others = n_others * (game.endowment - others_give + pot_share)  # the TOTAL of the other players
            out[action] = (1 - w) * own + w * others
        return out

    def utility(mine: str, theirs: str) -> float:
        return (1 - w) * game.payoff(mine, theirs) + w * game.payoff(theirs, mine)

    return {a: b * utility(a, "C") + (1 - b) * utility(a, "D") for a in game.actions}


def volunteer_utilities(game: Game, regard: float, belief: float) -> dict[str, float]:
    """Expected utilities of volunteering (C) and staying out (D) when each of the n − 1 others volunteers with
    probability `belief`; `others` is the expected total payoff of the other players."""
    n, benefit, cost = game.players, game.benefit, game.cost
    nobody_else = (1 - belief) ** (n - 1)  # none of the others volunteers
    own = {"C": benefit - cost, "D": benefit * (1 - nobody_else)}
    # another player volunteers (pays the cost, gains the benefit) or, staying out, gains it if anyone else does:
    # always when I volunteer, else when one of the other n − 2 does
    others = {
        "C": (n - 1) * (benefit - belief * cost),
        "D": (n - 1) * (belief * (benefit - cost) + (1 - belief) * benefit * (1 - (1 - belief) ** (n - 2))),
    }
    return {a: (1 - regard) * own[a] + regard * others[a] for a in ("C", "D")}


def action_probabilities(scenario: Scenario, precision: float = DEFAULT_PRECISION) -> dict[str, float]:
    """The oracle's exact choice distribution over the scenario's actions."""
    utilities = expected_utilities(scenario)
    top = max(utilities.values())
    weights = {a: math.exp(precision * (u - top)) for a, u in utilities.items()}
    total = sum(weights.values())
    return {a: w / total for a, w in weights.items()}


_BELIEF_WORDS = [(0.75, "very likely"), (0.55, "more likely than not"), (0.45, "about as likely as not"),
                 (0.25, "unlikely"), (0.0, "very unlikely")]
_REGARD_WORDS = [(0.4, "I care a great deal about how {c} fares"), (0.2, "I give real weight to how {c} fares"),
                 (0.05, "I give a little weight to how {c} fares"), (0.0, "I look only at my own result")]


def _word(table, value):
    return next(text for threshold, text in table if value >= threshold)


def motivation(scenario: Scenario, action: str, seed: int) -> str:
    """A short explanation true to the oracle's analysis, worded by one of several templates."""
    game, context = scenario.game, scenario.context
    rng = random.Random(seed)
    utilities = expected_utilities(scenario)
    belief = _word(_BELIEF_WORDS, context.belief)
    regard = _word(_REGARD_WORDS, context.regard).format(c=context.coplayer)
    if game.kind == "public_goods":
        per_dollar = game.multiplier / game.players
        others = (game.players - 1) * per_dollar
        templates = [
            f"Each dollar I give comes back to me as ${per_dollar:.3f} and gives ${others:.3f} to the others. "
            f"I expect {context.coplayer} to give about ${game.endowment * context.belief:.0f} each, and {regard[0].lower() + regard[1:]}, so I give ${action}.",
            f"Keeping a dollar beats giving it for me alone (${per_dollar:.3f} back per dollar), but the group gains "
            f"${game.multiplier:.1f} per dollar. {regard}; I settle on ${action}.",
            f"I think it is {belief} that the others give generously. Weighing my own money against the party, ${action} feels right.",
        ]
        return rng.choice(templates)
    if game.kind == "volunteer":
        rest = game.players - 1
        someone, each = ("the other player", "they do") if rest == 1 else (f"one of the {rest} others", "each of them does")
        templates = [
            f"If I volunteer I am sure of {_fmt(game.benefit - game.cost)} points; if I wait, I get {_fmt(game.benefit)} "
            f"only if {someone} steps up. I think it is {belief} that {each}, and {regard}, "
            f"so I choose {action}.",
            f"{regard}. With {game.players} of us, it is {belief} that any one of the others volunteers; weighing the "
            f"cost of {_fmt(game.cost)} against the risk that nobody does, {action} is my pick.",
        ]
        return rng.choice(templates)
    other = "D" if action == "C" else "C"
    gap = utilities[action] - utilities[other]
    best_vs_c = max("CD", key=lambda a: game.payoff(a, "C"))
    best_vs_d = max("CD", key=lambda a: game.payoff(a, "D"))
    payoff_line = (
        f"If {context.coplayer} picks C, {best_vs_c} pays me more ({_fmt(game.payoff(best_vs_c, 'C'))} vs "
        f"{_fmt(game.payoff('D' if best_vs_c == 'C' else 'C', 'C'))}); if they pick D, {best_vs_d} pays me more "
        f"({_fmt(game.payoff(best_vs_d, 'D'))} vs {_fmt(game.payoff('D' if best_vs_d == 'C' else 'C', 'D'))})."
    )
    lean = "clearly" if abs(gap) > 2 else "slightly" if abs(gap) > 0.3 else "barely"
    templates = [
        f"{payoff_line} I think it is {belief} that {context.coplayer} cooperates, and {regard[0].lower() + regard[1:]}. "
        f"Weighing both, {action} {lean} comes out ahead, so I choose {action}.",
        f"It is {belief} that {context.coplayer} chooses C here. {regard}. {payoff_line} On balance {action} is my pick.",
        f"{regard}. Given how {context.coplayer} is likely to act ({belief} to cooperate), option {action} "
        f"{lean} serves me better than {other}.",
        f"My read of {context.coplayer}: {belief} to cooperate. {payoff_line} Taking their outcome into account as well, I go with {action}.",
    ]
    return rng.choice(templates)


def _fmt(value: float) -> str:
    return f"{value:g}"


def sample_actions(scenario: Scenario, n: int, seed: int, precision: float = DEFAULT_PRECISION) -> list[str]:
    """`n` independent draws from the oracle's distribution, reproducible from `seed`."""
    probs = action_probabilities(scenario, precision)
    rng = random.Random(seed)
    actions = list(probs)
    return rng.choices(actions, weights=[probs[a] for a in actions], k=n)

