"""A batch's shared prompt prefixes run once: the same logits as one padded forward pass, with less work.

The prompts of one context share everything up to their first payoff (the chat template, the
context, the first outcome's words: about a third of their tokens, docs/design.md "Shared prompt
prefixes"). `shared_prefix_logits` groups the rows of a right-padded batch by a common token prefix,
runs each group's prefix once (keeping its key/value cache) and the rows' suffixes on top of their
group's cache; gradients flow back into the prefix through the cache. Rows that share nothing worth it
run as one plain padded pass.

`plan_shared_prefixes` is the pure part: which rows go together and how many tokens they share.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# tokens a group must save to be worth forming (its prefix and suffix rows are padded with the others')
GROUP_COST_TOKENS = 32


@dataclass(frozen=True)
class PrefixGroup:
    rows: tuple[int, ...]  # ascending batch rows
    prefix: int            # tokens shared by every row, run once


@dataclass(frozen=True)
class PrefixPlan:
    groups: tuple[PrefixGroup, ...]
    plain: tuple[int, ...]  # ascending rows that run in one ordinary padded pass
    tokens: int             # tokens of compute under this plan
    unshared_tokens: int    # the rows' real tokens, every one computed (what sharing saves from)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_shared_prefixes(sequences: list[list[int]], limits: list[int],
                         overhead: int = GROUP_COST_TOKENS) -> PrefixPlan:
    """Split rows into groups that share a token prefix, minimising the tokens computed.

    `sequences[r]` are row r's real tokens; `limits[r]` is the most of them its prefix may cover (the
    first position whose logits are needed: a shared prefix yields no logits). Rows sorted by their
    tokens put common prefixes side by side, so optimal groups are contiguous runs of that order: a
    dynamic programme over the runs, each run costing `overhead + prefix + the rows' remaining tokens`
    (a single row costs its length and runs in the plain pass).
    """
    n = len(sequences)
    order = sorted(range(n), key=lambda r: sequences[r])
    adjacent = [_common_prefix(sequences[order[i]], sequences[order[i + 1]]) for i in range(n - 1)]
    best = [0] * (n + 1)           # best[j]: cost of the first j rows of `order`
    choice = [(0, 0)] * (n + 1)    # (start of the last run, its prefix)
    for j in range(1, n + 1):
        last = order[j - 1]
        best[j], choice[j] = best[j - 1] + len(sequences[last]), (j - 1, 0)
        shared, limit, total = 10**9, limits[last], len(sequences[last])
        for i in range(j - 2, -1, -1):  # run order[i:j]
            shared = min(shared, adjacent[i])
            limit = min(limit, limits[order[i]])
            total += len(sequences[order[i]])
            prefix = min(shared, limit)
            if prefix <= 0:
                break
            cost = best[i] + overhead + prefix + (total - prefix * (j - i))
            if cost < best[j]:
                best[j], choice[j] = cost, (i, prefix)
    groups, plain, j = [], [], n
    while j > 0:
        i, prefix = choice[j]
        if prefix:
            groups.append(PrefixGroup(tuple(sorted(order[i:j])), prefix))
        else:
            plain.extend(order[i:j])
        j = i
    return PrefixPlan(tuple(reversed(groups)), tuple(sorted(plain)), best[n],
                      sum(len(s) for s in sequences))


def shared_prefix_logits(forward_kept, model, keep: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """(kept positions, vocab), row-major: what `forward_kept(model, keep, input_ids=..., attention_mask=...)`
    returns for the whole right-padded batch, computed with each group's shared prefix run once.
    `forward_kept` is the plain kept-logits forward (lora_module.kept_logits).

    Two passes whatever the number of groups (a pass has a fixed cost of its own, ~0.4 s for SmolLM2 on
    a 2-core CPU): every group's prefix, right-padded, then every grouped row's suffix on top of its
    group's cache, right-padded, the cache's padding masked. Rows in no group take a third, plain pass."""
    lengths = attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    sequences = [ids[r][:n] for r, n in enumerate(lengths)]
    kept_rows, kept_cols = keep.nonzero(as_tuple=True)
    first_kept = list(lengths)
    for r, c in zip(kept_rows.tolist(), kept_cols.tolist()):
        first_kept[r] = min(first_kept[r], c)
    # a row's prefix ends before its first kept position and leaves it one token to run
    limits = [min(first_kept[r], lengths[r] - 1) for r in range(len(lengths))]
    plan = plan_shared_prefixes(sequences, limits)
    if not plan.groups:
        return forward_kept(model, keep, input_ids=input_ids, attention_mask=attention_mask)
    device = input_ids.device
    grouped = sorted(r for g in plan.groups for r in g.rows)
    group_of = {r: i for i, g in enumerate(plan.groups) for r in g.rows}
    parts = [(torch.tensor(grouped, device=device), _grouped_logits(forward_kept, model, keep, input_ids, plan,
                                                                    grouped, group_of, lengths))]
    if plan.plain:
        rows = torch.tensor(plan.plain, device=device)
        width = max(lengths[r] for r in plan.plain)
        parts.append((rows, forward_kept(model, keep[rows, :width], input_ids=input_ids[rows, :width],
                                         attention_mask=attention_mask[rows, :width])))
    out = parts[0][1].new_empty((len(kept_rows), parts[0][1].shape[-1]))
    for rows, part in parts:
        out[torch.isin(kept_rows, rows)] = part  # rows ascending: the kept order matches the full batch's
    return out


def _cache_name(model) -> str:
    """The key/value cache's argument and output name: `cache` in transformers 5.24, `past_key_values` in 5.17."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _grouped_logits(forward_kept, model, keep, input_ids, plan: PrefixPlan, grouped: list[int],
                    group_of: dict[int, int], lengths: list[int]) -> torch.Tensor:
    device, pad = input_ids.device, 0  # any token: padding is masked
    prefixes = [g.prefix for g in plan.groups]
    prefix_width = max(prefixes)
    prefix_ids = torch.full((len(prefixes), prefix_width), pad, dtype=input_ids.dtype, device=device)
    prefix_mask = torch.zeros((len(prefixes), prefix_width), dtype=torch.long, device=device)
    for i, g in enumerate(plan.groups):
        prefix_ids[i, : g.prefix] = input_ids[g.rows[0], : g.prefix]
        prefix_mask[i, : g.prefix] = 1
    name = _cache_name(model)
    cache = model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1)[name]
    group_index = torch.tensor([group_of[r] for r in grouped], device=device)
    cache.batch_select_indices(group_index)  # each row sees its group's prefix; autograd follows the gather

    width = max(lengths[r] - prefixes[group_of[r]] for r in grouped)
    suffix_ids = torch.full((len(grouped), width), pad, dtype=input_ids.dtype, device=device)
    suffix_mask = torch.zeros((len(grouped), width), dtype=torch.long, device=device)
    suffix_keep = torch.zeros((len(grouped), width), dtype=torch.bool, device=device)
    positions = torch.zeros((len(grouped), width), dtype=torch.long, device=device)
    for i, r in enumerate(grouped):
        start = prefixes[group_of[r]]
        n = lengths[r] - start
        suffix_ids[i, :n] = input_ids[r, start: lengths[r]]
        suffix_mask[i, :n] = 1
        suffix_keep[i, :n] = keep[r, start: lengths[r]]
        positions[i] = torch.arange(start, start + width, device=device)
    attention = torch.cat([prefix_mask[group_index], suffix_mask], dim=1)
    return forward_kept(model, suffix_keep, input_ids=suffix_ids, attention_mask=attention, position_ids=positions,
                        use_cache=True, **{name: cache})
