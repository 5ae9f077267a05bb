"""A batch's shared prompt prefixes run once: the same logits as one padded forward pass, with less work.

The prompts of one context share everything up to their first payoff (the chat template, the
context, the first outcome's words: about a third of their tokens, docs/design.md "Shared prompt
prefixes"). `shared_prefix_logits` groups the rows of a right-padded batch by a common token prefix,
runs each group's prefix once (keeping its key/value cache) and the rows' suffixes on top of their
group's cache; gradients flow back into the prefix through the cache. Rows that share nothing worth it
run as one plain padded pass. The suffixes run in a few passes of similar lengths (`plan_suffix_passes`): padded
to the longest in one pass, a quarter of the demo's computed tokens were padding.

Works under gradient checkpointing (`model.gradient_checkpointing`): the cache (`_PrefixCache`) is written once
by the prefix pass and only read afterwards, so a checkpointed layer's replay in the backward pass sees the states
its first run saw (transformers keeps a cache under checkpointing only for such layers: `_can_checkpoint_with_cache`).

`plan_shared_prefixes` and `plan_suffix_passes` are the pure parts: which rows go together and how many tokens
they share, and which suffixes run in one pass.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass

import torch

# tokens a group must save to be worth forming (its prefix and suffix rows are padded with the others')
GROUP_COST_TOKENS = 32
# a forward and backward pass's fixed cost in tokens (its ~30 layers' dispatch): what one more suffix pass must save
PASS_COST_TOKENS = 128


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


def plan_suffix_passes(lengths: list[int], overhead: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Split rows into passes, each padded to its longest row, minimising the tokens computed (padding included)
    plus `overhead` per pass: contiguous runs of the rows sorted by length (a dynamic programme). Returns each
    pass's indices into `lengths`, ascending."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    best = [0] + [None] * len(order)  # best[j]: cost of the j shortest rows
    start = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]  # the run's longest row
        for i in range(j):
            cost = best[i] + overhead + width * (j - i)
            if best[j] is None or cost < best[j]:
                best[j], start[j] = cost, i
    passes, j = [], len(order)
    while j > 0:
        passes.append(sorted(order[start[j]:j]))
        j = start[j]
    return passes[::-1]


def checkpointing_keeps_caches() -> bool:
    """Whether this transformers lets a checkpointed decoder layer keep its cache (`_can_checkpoint_with_cache`,
    transformers/modeling_layers.py); without it checkpointing drops the prefix's cache and the module runs full
    passes instead (lora_module.py)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def shared_prefix_logits(forward_kept, model, keep: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """(kept positions, vocab), row-major: what `forward_kept(model, keep, input_ids=..., attention_mask=...)`
    returns for the whole right-padded batch, computed with each group's shared prefix run once.
    `forward_kept` is the plain kept-logits forward (lora_module.kept_logits).

    Every group's prefix in one pass, right-padded, then the grouped rows' suffixes on top of their group's
    cache in a few passes of similar lengths (`plan_suffix_passes`: a pass has a fixed cost of its own), each
    right-padded, the cache's padding masked. Rows in no group take one more, plain pass."""
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
    with _caches_kept_under_checkpointing(model):
        parts = _grouped_logits(forward_kept, model, keep, input_ids, plan, lengths)
    if plan.plain:
        rows = torch.tensor(plan.plain, device=device)
        width = max(lengths[r] for r in plan.plain)
        parts.append((rows, forward_kept(model, keep[rows, :width], input_ids=input_ids[rows, :width],
                                         attention_mask=attention_mask[rows, :width])))
    out = parts[0][1].new_empty((len(kept_rows), parts[0][1].shape[-1]))
    for rows, part in parts:
        out[torch.isin(kept_rows, rows)] = part  # rows ascending: the kept order matches the full batch's
    return out


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers


@contextlib.contextmanager
def _caches_kept_under_checkpointing(model):
    """The decoder layers keep their `_PrefixCache` under gradient checkpointing for the block (instance attributes:
    other passes still drop theirs, which are written on every call)."""
    layers = list(_decoder_layers(model))
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


@functools.cache
def _prefix_cache_class():
    from transformers import DynamicCache

    class _PrefixCache(DynamicCache):
        """A `DynamicCache` written once, by the prefix pass, then only read: a suffix pass's view (`rows`) gets its
        rows' prefix states followed by their own (as `DynamicCache` returns them) without storing them, and the
        prefix pass's replay under checkpointing gets its own states back. Every call of a layer therefore sees what
        its first call saw."""

        index: torch.Tensor | None = None  # a suffix pass's view: row i reads group index[i]'s prefix

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.index is not None:
                # gathered here, inside the (checkpointed) layer: replayed in the backward pass rather than kept
                layer = self.layers[layer_idx]
                return (torch.cat([layer.keys[self.index], key_states], dim=-2),
                        torch.cat([layer.values[self.index], value_states], dim=-2))
            if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
                return key_states, value_states  # a checkpointed replay of the prefix pass: already stored
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        def rows(self, index: torch.Tensor):
            """A read-only view of the prefixes: row i sees group `index[i]`'s; autograd follows the gather."""
            view = copy.copy(self)
            view.index = index
            return view

    return _PrefixCache


def _cache_name(model) -> str:
    """The key/value cache's argument and output name: `cache` in transformers 5.24, `past_key_values` in 5.17."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _grouped_logits(forward_kept, model, keep, input_ids, plan: PrefixPlan,
                    lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(rows, their kept logits)] of the grouped rows: the prefixes' pass, then one pass per `plan_suffix_passes`."""
    device, pad = input_ids.device, 0  # any token: padding is masked
    prefixes = [g.prefix for g in plan.groups]
    prefix_width = max(prefixes)
    prefix_ids = torch.full((len(prefixes), prefix_width), pad, dtype=input_ids.dtype, device=device)
    prefix_mask = torch.zeros((len(prefixes), prefix_width), dtype=torch.long, device=device)
    for i, g in enumerate(plan.groups):
        prefix_ids[i, : g.prefix] = input_ids[g.rows[0], : g.prefix]
        prefix_mask[i, : g.prefix] = 1
    name = _cache_name(model)
    cache = _prefix_cache_class()(config=model.config)
    model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1, **{name: cache})

    grouped = sorted(r for g in plan.groups for r in g.rows)
    group_of = {r: i for i, g in enumerate(plan.groups) for r in g.rows}
    start = {r: prefixes[group_of[r]] for r in grouped}
    parts = []
    for members in plan_suffix_passes([lengths[r] - start[r] for r in grouped], PASS_COST_TOKENS):
        rows = [grouped[i] for i in members]
        width = max(lengths[r] - start[r] for r in rows)
        suffix_ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=device)
        suffix_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        suffix_keep = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            n = lengths[r] - start[r]
            suffix_ids[i, :n] = input_ids[r, start[r]: lengths[r]]
            suffix_mask[i, :n] = 1
            suffix_keep[i, :n] = keep[r, start[r]: lengths[r]]
            positions[i] = torch.arange(start[r], start[r] + width, device=device)
        group_index = torch.tensor([group_of[r] for r in rows], device=device)
        attention = torch.cat([prefix_mask[group_index], suffix_mask], dim=1)
        logits = forward_kept(model, suffix_keep, input_ids=suffix_ids, attention_mask=attention,
                              position_ids=positions, use_cache=True, **{name: cache.rows(group_index)})
        parts.append((torch.tensor(rows, device=device), logits))
    return parts
