"""Exact action probabilities from next-token log-probabilities (score mode).

For each scenario, the prompt (through the chat template) is followed by the answer prefix
`Answer:`; the probability of action `a` is the product of the probabilities of the tokens of
" a" after it. Prompt and continuation are tokenized together (" C" and "C" are different tokens).
When every action is one token (C/D with Llama/SmolLM2 tokenizers), one forward pass per
scenario gives them all; multi-token actions take one sequence per action.

Numeric answers (public-goods donations) are scored as *complete* answers: tokenizers split
digits, so the tokens of " 1" are a prefix of those of " 10", and the probability of the tokens
of " 1" already contains every answer that starts with 1. The probability of the amount 1 is
therefore P(tokens of " 1") × P(no further digit follows), which makes the amounts disjoint
events whose probabilities sum to at most 1 (`answer_logprob`).

`action_mass` is the raw probability mass on the actions before renormalising: how much of the
model's next-token distribution sits on valid answers at all (≤ 1 by construction; a mass above
1 + 1e-6 or below 0.5 is reported: `records.mass_warning`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .scenarios import ANSWER_PREFIX, Scenario, build_messages, render_prompt

ASCII_DIGITS = frozenset("0123456789")


@dataclass
class ScoringItem:
    prompt: str                      # the full text up to and including the answer prefix
    actions: tuple[str, ...]
    continuation_ids: list[list[int]]  # token ids of " <action>" after the prompt, per action
    prompt_ids: list[int]
    # numeric answers: the tokens that would extend a number (start with a digit); an amount is a
    # complete answer only when none of them follows its tokens. Empty for C/D actions.
    extension_ids: list[int] = field(default_factory=list)

    @property
    def open_ended(self) -> bool:
        return bool(self.extension_ids)


_EXTENSION_IDS: dict[int, tuple[object, list[int]]] = {}


def number_extension_ids(tokenizer) -> list[int]:
    """Token ids whose text starts with an ASCII digit: what could continue a number (cached per tokenizer)."""
    cached = _EXTENSION_IDS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = [i for i, text in enumerate(texts) if text[:1] in ASCII_DIGITS]
    _EXTENSION_IDS[id(tokenizer)] = (tokenizer, ids)  # the tokenizer is kept, so its id is never reused
    return ids


def is_numeric(actions: tuple[str, ...]) -> bool:
    return bool(actions) and all(a.isascii() and a.isdigit() for a in actions)


def answer_logprob(token_logprobs: torch.Tensor, extension_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """log P(answer) from its tokens' log-probabilities; for a numeric answer also × P(no digit follows).

    `extension_logprobs`: the log-probabilities, after the answer's last token, of every token that
    would extend the number. Differentiable.
    """
    total = token_logprobs.sum()
    if extension_logprobs is None or extension_logprobs.numel() == 0:
        return total
    continues = torch.logsumexp(extension_logprobs.float(), dim=-1).clamp(max=-1e-12)  # log P(another digit)
    return total + torch.log(-torch.expm1(continues))  # + log(1 - P(another digit))


def action_distribution(logprobs: dict[str, float]) -> tuple[dict[str, float], float]:
    """(probabilities renormalised over the actions, raw mass on the actions) from action log-probabilities."""
    raw = {a: math.exp(float(v.detach() if isinstance(v, torch.Tensor) else v)) for a, v in logprobs.items()}
    mass = sum(raw.values())
    probs = {a: (p / mass if mass > 0 else 1.0 / len(raw)) for a, p in raw.items()}
    return probs, mass


def score_prompt(tokenizer, scenario: Scenario, role: str = "student", shuffle_seed: int | None = None) -> str:
    return render_prompt(tokenizer, build_messages(scenario, role, shuffle_seed)) + ANSWER_PREFIX


def prepare_item(tokenizer, prompt: str, actions: tuple[str, ...]) -> ScoringItem:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    continuations = []
    for action in actions:
        full = tokenizer(prompt + " " + action, add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            # the tokenizer merged across the boundary: fall back to tokenizing the continuation alone
            continuations.append(tokenizer(" " + action, add_special_tokens=False)["input_ids"])
        else:
            continuations.append(full[len(prompt_ids):])
    extension = number_extension_ids(tokenizer) if is_numeric(tuple(actions)) else []
    return ScoringItem(prompt, tuple(actions), continuations, prompt_ids, list(extension))


def _pad_left(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _forward_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Log-softmax over the vocabulary; `keep` > 0 projects only the last `keep` positions (the
    vocabulary projection of every prompt position would cost batch × length × vocab memory)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": keep} if keep else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
    return torch.log_softmax(logits.float(), dim=-1)


def action_logprobs(model, tokenizer, items: list[ScoringItem], batch_size: int = 16) -> list[dict[str, float]]:
    """Log-probability of each action's continuation, per item (differentiable if grad is on)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[dict[str, float] | None] = [None] * len(items)
    # one forward pass per prompt when every action is one token and complete once emitted (C/D)
    single = [i for i, it in enumerate(items) if not it.open_ended and all(len(c) == 1 for c in it.continuation_ids)]
    multi = [i for i in range(len(items)) if i not in set(single)]
    # batch prompts of similar length together: less left padding for the forward passes to carry
    single.sort(key=lambda i: len(items[i].prompt_ids), reverse=True)
    for start in range(0, len(single), batch_size):
        chunk = single[start:start + batch_size]
        ids, mask = _pad_left([items[i].prompt_ids for i in chunk], pad_id, device)
        logprobs = _forward_logprobs(model, ids, mask, keep=1)[:, -1, :]
        for row, index in enumerate(chunk):
            item = items[index]
            results[index] = {a: logprobs[row, c[0]] for a, c in zip(item.actions, item.continuation_ids)}
    sequences, owners = [], []
    for index in multi:
        item = items[index]
        for action, cont in zip(item.actions, item.continuation_ids):
            sequences.append((item.prompt_ids + cont, len(cont)))
            owners.append((index, action))
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids, mask = _pad_left([s for s, _ in chunk], pad_id, device)
        longest = max(n for _, n in chunk)
        logprobs = _forward_logprobs(model, ids, mask, keep=longest + 1)
        for row, (seq, n_cont) in enumerate(chunk):
            index, action = owners[start + row]
            target = ids[row, -n_cont:]
            predicted = logprobs[row, -n_cont - 1:-1, :]
            extension = items[index].extension_ids
            # the distribution after the answer's last token: how likely the number goes on
            after = logprobs[row, -1, extension] if extension else None
            total = answer_logprob(predicted.gather(-1, target.unsqueeze(-1)).squeeze(-1), after)
            if results[index] is None:
                results[index] = {}
            results[index][action] = total
    return results  # type: ignore[return-value]


@torch.no_grad()
def score_scenarios(
    model, tokenizer, scenarios: list[Scenario], role: str = "student", batch_size: int = 16,
    shuffle_seed: int | None = None,
) -> list[tuple[str, dict[str, float], float]]:
    """(prompt, renormalised action probabilities, raw action mass) for each scenario."""
    items = [prepare_item(tokenizer, score_prompt(tokenizer, s, role, shuffle_seed), s.game.actions) for s in scenarios]
    was_training = model.training
    model.eval()
    try:
        logprobs = action_logprobs(model, tokenizer, items, batch_size)
    finally:
        model.train(was_training)
    return [(item.prompt, *action_distribution(lp)) for item, lp in zip(items, logprobs)]
