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

# A choice letter, perhaps quoted/bold/bracketed or called "option C"; "C or D" is no choice.
_OTHER_LETTER = r"(?![ \t\"'`)\]*.,:;/-]{0,4}(?:(?:or|and|nor|vs\.?)\s+)?[\"'`(\[*]*[CDcd]\b)"
_LETTER = r"[\"'`(\[*]*\s*(?:option\s+|strategy\s+|action\s+)?([CDcd])(?![A-Za-z])" + _OTHER_LETTER
_ANSWER_RE = re.compile(
    r"\b(?:final\s+|my\s+)?(?:answer|choice|decision|action)\b\**\s*(?:is|would\s+be|will\s+be)?\s*[:=\-]?\s*\**\s*"
    + _LETTER, re.I,
)
# First person only: "If you choose C" or "your friend didn't choose C" say nothing about the answer.
_I = r"\b(?:i(?='[dl])|i\s+|i'm\s+|i\s+am\s+|let's\s+|let\s+me\s+|we\s+)"
_MODAL = r"(?:(?:would|will|'ll|'d|shall|must|should|am\s+going\s+to|going\s+to|have\s+to|)\s*(?:definitely|rather|probably)?\s*)"
_CHOOSE_RE = re.compile(
    _I + _MODAL + r"(?:choose|chose|choosing|pick|picking|select|go\s+with|going\s+with|opt\s+for|play|take)\s+"
    r"(?:to\s+play\s+)?" + _LETTER, re.I,
)
_IMPERATIVE_RE = re.compile(r"^[\s\"'`(\[*#-]*(?:choose|pick|select|option)\b\**\s*[:\-]?\s*" + _LETTER, re.I)
_BARE_RE = re.compile(r"^[\s\"'`(\[*]*(?:option\s+)?([CDcd])[\s\"'`)\]*.!]*$", re.I)
_LEADING_RE = re.compile(r"^[\s\"'`(\[*]*([CD])(?![A-Za-z0-9])" + _OTHER_LETTER)
# "I choose to cooperate", "I will not defect", or the bare word as the whole answer
_COOPERATE_WORD = r"(cooperat\w*|collaborat\w*|defect\w*|betray\w*)"
_COOPERATE_RE = re.compile(
    _I + _MODAL + r"(not\s+|never\s+)?(?:(?:choose|decide|want|plan|prefer|opt)\s+(not\s+)?to\s+)?" + _COOPERATE_WORD,
    re.I,
)
_NEGATED_COOPERATE_RE = re.compile(r"\bi\s+(?:won't|wouldn't|will\s+not|would\s+not|don't|do\s+not|refuse\s+to)\s+"
                                   + _COOPERATE_WORD, re.I)
_BARE_WORD_RE = re.compile(r"^[\W_]*" + _COOPERATE_WORD + r"[\W_]*$", re.I)
_ANSWER_WORD_RE = re.compile(r"\b(?:answer|choice|decision)\b\**\s*(?:is)?\s*[:=\-]?\s*\**\s*(?:to\s+)?" + _COOPERATE_WORD,
                             re.I)

_NUMBER_WORDS = {"zero": 0, "nothing": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                 "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_AMOUNT = r"\$?\s*(\d{1,3}(?![\d.]\d)|" + "|".join(_NUMBER_WORDS) + r"|all|everything)\b"
_INT_RE = re.compile(r"(?<![\d.])\$?\s*(\d{1,3})(?![\d.]\d)")
_AMOUNT_ANSWER_RE = re.compile(
    r"\b(?:answer|donat\w*|give|giving|contribut\w*|put|putting|offer)\b[^\d\n$]{0,30}?" + _AMOUNT, re.I)
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


def _cooperation_word(text: str) -> str | None:
    """C/D from a first-person "cooperate"/"defect" (negation flips it), or from the bare word."""
    for pattern in (_ANSWER_WORD_RE, _BARE_WORD_RE):
        match = pattern.search(text)
        if match:
            return "C" if match.group(1).lower().startswith(("cooperat", "collaborat")) else "D"
    negated = _NEGATED_COOPERATE_RE.search(text)
    match = _COOPERATE_RE.search(text)
    if negated and (match is None or negated.start() <= match.start()):
        return "D" if negated.group(1).lower().startswith(("cooperat", "collaborat")) else "C"
    if match:
        cooperative = match.group(3).lower().startswith(("cooperat", "collaborat"))
        if match.group(1) or match.group(2):
            cooperative = not cooperative
        return "C" if cooperative else "D"
    return None


def _parse_letter(text: str) -> str | None:
    from_json = _from_json(text)
    if from_json is not None:
        letter = _BARE_RE.match(from_json)
        if letter:
            return letter.group(1).upper()
        word = _BARE_WORD_RE.match(from_json)
        return _cooperation_word(from_json) if word else None
    for pattern in (_ANSWER_RE, _CHOOSE_RE):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    for pattern in (_IMPERATIVE_RE, _BARE_RE, _LEADING_RE):
        match = pattern.match(first_line)
        if match:
            return match.group(1).upper()
    return _cooperation_word(text)


def _amount_value(token: str, endowment: int) -> int | None:
    token = token.strip().lower()
    if token in ("all", "everything"):
        return endowment
    if token in _NUMBER_WORDS:
        return _NUMBER_WORDS[token]
    digits = re.search(r"\d+", token)
    return int(digits.group(0)) if digits else None


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
        value = _amount_value(candidate, endowment)
        if value is not None:
            # an explicit amount out of range is not silently clipped
            return str(value) if 0 <= value <= endowment else None
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
