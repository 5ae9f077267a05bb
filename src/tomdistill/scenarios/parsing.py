"""Answer parsing: a raw completion -> an action (`C`, `D`, a dollar amount) or `unparsed`.

Real model output is messy ("**Answer:** c", "I choose to cooperate.", '{"answer": "D"}',
"Answer: C\\nMotivation: ..."). The rules run from most to least explicit; anything none of them
reads is `UNPARSED` — counted and reported by the caller, never dropped.
"""
from __future__ import annotations

import json
import re

from .catalogue import Game

UNPARSED = "unparsed"

_LETTER = r"[\"'`(\[*]*\s*(?:option\s+)?([CDcd])(?![A-Za-z])"
_ANSWER_RE = re.compile(r"\b(?:final\s+)?(?:answer|choice|decision|action)\b\**\s*(?:is)?\s*[:=\-]?\s*\**\s*" + _LETTER, re.I)
_CHOOSE_RE = re.compile(
    r"\b(?:i\s+(?:would|will|'ll)?\s*)?(?:choose|chose|pick|select|go\s+with|opt\s+for|play)\s+(?:to\s+play\s+)?(?:option\s+|strategy\s+|action\s+)?"
    r"[\"'`(\[*]*([CD])(?![A-Za-z])",
    re.I,
)
_BARE_RE = re.compile(r"^[\s\"'`(\[*]*(?:option\s+)?([CDcd])[\s\"'`)\]*.!]*$", re.I)
_LEADING_RE = re.compile(r"^[\s\"'`(\[*]*([CD])(?:[\s\"'`)\]*.:,!-]|$)")
_COOPERATE_RE = re.compile(r"\b(cooperat\w*|collaborat\w*|defect\w*|betray\w*)", re.I)
_NEGATION_RE = re.compile(r"\b(?:not|never|won't|wouldn't|don't|refuse\s+to|no)\s+(?:\w+\s+){0,1}$", re.I)
_INT_RE = re.compile(r"(?<![\d.])\$?\s*(\d{1,3})(?![\d.]\d)")
_AMOUNT_ANSWER_RE = re.compile(r"\b(?:answer|donat\w*|give|contribut\w*|put)\b[^\d\n]{0,30}?\$?\s*(\d{1,3})(?![\d.]\d)", re.I)
_MOTIVATION_RE = re.compile(r"\bmotivation\b\**\s*[:\-]\s*\**\s*(.*)", re.I | re.S)
_JSON_RE = re.compile(r"\{[^{}]*\}", re.S)
_JSON_KEYS = ("answer", "choice", "action", "decision", "donation", "amount")


def _from_json(text: str) -> str | None:
    for match in _JSON_RE.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key in obj:
                if key.lower() in _JSON_KEYS:
                    return str(obj[key]).strip()
    return None


def _parse_letter(text: str) -> str | None:
    from_json = _from_json(text)
    if from_json is not None:
        letter = _BARE_RE.match(from_json)
        return letter.group(1).upper() if letter else None
    for pattern in (_ANSWER_RE, _CHOOSE_RE):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    for pattern in (_BARE_RE, _LEADING_RE):
        match = pattern.match(first_line)
        if match:
            return match.group(1).upper()
    word = _COOPERATE_RE.search(text)
    if word:
        cooperative = word.group(1).lower().startswith(("cooperat", "collaborat"))
        if _NEGATION_RE.search(text[: word.start()]):
            cooperative = not cooperative
        return "C" if cooperative else "D"
    return None


def _parse_amount(text: str, endowment: int) -> str | None:
    from_json = _from_json(text)
    candidates = []
    if from_json is not None:
        candidates.append(from_json)
    match = _AMOUNT_ANSWER_RE.search(text)
    if match:
        candidates.append(match.group(1))
    match = _INT_RE.search(text)  # the paper's rule: the first integer in the text
    if match:
        candidates.append(match.group(1))
    for candidate in candidates:
        digits = re.search(r"\d+", candidate)
        if digits and 0 <= int(digits.group(0)) <= endowment:
            return str(int(digits.group(0)))
        if digits:
            return None  # an explicit amount out of range is not silently clipped
    return None


def parse_action(completion: str, game: Game) -> str:
    """The action a completion chose for `game`, or `UNPARSED`."""
    if not isinstance(completion, str) or not completion.strip():
        return UNPARSED
    if game.kind == "public_goods":
        action = _parse_amount(completion, game.endowment)
    else:
        action = _parse_letter(completion)
    return action if action is not None else UNPARSED


def parse_motivation(completion: str) -> str:
    """The motivation part of a teacher completion: after `Motivation:`, else the lines after the answer."""
    if not isinstance(completion, str):
        return ""
    match = _MOTIVATION_RE.search(completion)
    if match:
        return match.group(1).strip()
    lines = completion.strip().splitlines()
    return "\n".join(lines[1:]).strip()
