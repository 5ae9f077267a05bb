"""Prompts: system = the context, user = the game's payoffs in words and the question.

Prompt text is deterministic. `prompt_version(...)` names the template revision, a hash of the
catalogue, the outcome shuffle and the answer prefix, and travels with every record so that
samples rendered from different catalogues, templates or prompts never mix silently.
"""
from __future__ import annotations

import random

from .catalogue import Catalogue, Game, Scenario

TEMPLATE_REVISION = "p1"
ANSWER_PREFIX = "Answer:"
MOTIVATION_PREFIX = "Motivation:"
ROLES = ("teacher", "student")

SYSTEM_INSTRUCTION = (
    "You are taking part in the situation described below. Play it as yourself, as a real participant would."
)


ANSWER_PREFIX_TAG = "+answer-prefix"


def prompt_version(catalogue: Catalogue, shuffle_seed: int | None = None, answer_prefix: bool = False) -> str:
    """Everything that changes the prompt text: the template revision, the catalogue, the outcome
    shuffle (`-shuffle<seed>`) and, after a `+`, how the answer is elicited (`+answer-prefix`: the
    assistant turn starts with `Answer:`, as in score mode and prefilled generation)."""
    version = f"{TEMPLATE_REVISION}-{catalogue.fingerprint()}"
    if shuffle_seed is not None:
        version += f"-shuffle{shuffle_seed}"
    return version + (ANSWER_PREFIX_TAG if answer_prefix else "")


def scenario_version(version: str) -> str:
    """The part of a prompt_version that fixes the scenario text (template, catalogue, shuffle), without
    the elicitation: a teacher asked to reason and students asked for the answer alone share it."""
    return version.split("+", 1)[0]


def _points(value: float) -> str:
    return f"{value:g}"


def describe_game(scenario: Scenario, shuffle_seed: int | None = None) -> str:
    """The game's consequences in words, for this context. `shuffle_seed` shuffles the outcome order."""
    game, context = scenario.game, scenario.context
    if game.kind == "public_goods":
        return (
            f"You and {context.group or context.others(game.players)} each hold ${game.endowment}. Each of you decides how many whole dollars, "
            f"from 0 to {game.endowment}, to put into the shared fund; you keep whatever you do not give. "
            f"A sponsor multiplies the fund by {game.multiplier:g}, and the result is shared equally among all "
            f"{game.players} of you, whatever each one gave. Points stand for {context.points}."
        )
    if game.kind == "volunteer":
        return (
            f"You and {context.others(game.players)}, {game.players} of you in all, each choose one of two options, C "
            f"(volunteer) or D (stay out). Points stand for {context.points}.\n"
            f"- If at least one of you chooses C, each of you gets {_points(game.benefit)} points, and each who chose C "
            f"pays {_points(game.cost)} of them: you get {_points(game.benefit - game.cost)} points if you choose C, "
            f"and {_points(game.benefit)} points if you choose D while someone else chooses C.\n"
            f"- If nobody chooses C, each of you gets 0 points."
        )
    lines = []
    for mine in ("C", "D"):
        for theirs in ("C", "D"):
            lines.append(
                f"- If you choose {mine} and {context.coplayer} chooses {theirs}, you get "
                f"{_points(game.payoff(mine, theirs))} points and {context.coplayer} gets "
                f"{_points(game.payoff(theirs, mine))} points."
            )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(lines)
    return (
        f"You and {context.coplayer} each choose one of two options, C or D. Points stand for {context.points}.\n"
        + "\n".join(lines)
    )


def question(game: Game, role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if game.kind == "public_goods":
        choice, example = f"the number of dollars you give (0 to {game.endowment})", f"{ANSWER_PREFIX} <dollars>"
    else:
        choice, example = "C or D", f"{ANSWER_PREFIX} C"
    if role == "teacher":
        return (
            f"Think the situation through, then give your choice and your reasoning in exactly this format: "
            f"a first line '{example}' with {choice}, then a line starting '{MOTIVATION_PREFIX}' that explains it."
        )
    return f"Reply with one line only, '{example}', giving {choice}. Do not explain."


def build_messages(scenario: Scenario, role: str, shuffle_seed: int | None = None) -> list[dict[str, str]]:
    """Chat messages for a scenario: system = the context framing, user = the game and the question."""
    system = f"{SYSTEM_INSTRUCTION}\n\n{scenario.context.framing}"
    user = f"{describe_game(scenario, shuffle_seed)}\n\n{question(scenario.game, role)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt string through the tokenizer's own chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(
            f"tokenizer {name!r} has no chat template; set `model.chat_template` in the model config "
            "to a Jinja template (or use an instruct/chat checkpoint)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A template-free rendering, for backends without a tokenizer (the oracle)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages) + "\n\n[assistant]\n"


def answer_text(action: str, motivation: str | None = None) -> str:
    """The canonical assistant turn: `Answer: X` then optionally `Motivation: ...`."""
    text = f"{ANSWER_PREFIX} {action}"
    if motivation:
        text += f"\n{MOTIVATION_PREFIX} {motivation}"
    return text
