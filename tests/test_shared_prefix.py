"""Shared prompt prefixes run once per batch (src/tomdistill/model/shared_prefix.py): the plans are optimal on
small cases, and the logits, loss and adapter gradients equal one plain padded forward pass, with gradient
checkpointing too."""
import pytest
import torch

from tomdistill.model import shared_prefix
from tomdistill.model.shared_prefix import GROUP_COST_TOKENS, plan_shared_prefixes, plan_suffix_passes


def test_the_plan_groups_rows_by_their_common_prefix_and_leaves_loners_plain():
    a = list(range(100)) + [1, 2, 3]          # context A, two games
    b = list(range(100)) + [7, 8]
    c = list(range(50)) + [900 + i for i in range(60)]  # context C shares 50 tokens with A: one group of its own
    d = list(range(50)) + [900 + i for i in range(60)] + [4]
    e = [5, 6, 7]                               # shares nothing
    plan = plan_shared_prefixes([a, b, c, d, e], [len(a), len(b), len(c), len(d), 3])
    groups = {g.rows: g.prefix for g in plan.groups}
    assert groups == {(0, 1): 100, (2, 3): 110}
    assert plan.plain == (4,)
    total = sum(map(len, (a, b, c, d, e)))
    assert plan.unshared_tokens == total
    assert plan.tokens == 2 * GROUP_COST_TOKENS + (100 + 3 + 2) + (110 + 0 + 1) + 3


def test_a_prefix_stops_before_the_first_kept_position_and_short_shares_stay_plain():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]]
    assert plan_shared_prefixes(rows, [2, 6], overhead=0).groups[0].prefix == 2  # row 0 needs logits from position 2
    plan = plan_shared_prefixes(rows, [6, 6])  # 5 shared tokens do not pay for a second pass
    assert not plan.groups and plan.plain == (0, 1)


def test_suffixes_of_similar_lengths_share_a_pass_when_that_saves_its_cost():
    lengths = [150, 80, 148, 84, 152, 78]
    assert plan_suffix_passes(lengths, overhead=128) == [[1, 3, 5], [0, 2, 4]]  # 3*84 + 3*152 + 2*128, shortest first
    assert plan_suffix_passes(lengths, overhead=10**6) == [[0, 1, 2, 3, 4, 5]]  # one pass, padded to 152
    assert plan_suffix_passes(lengths, overhead=0) == [[5], [1], [3], [2], [0], [4]]  # no padding at all
    assert plan_suffix_passes([]) == []


def _modules(tiny_model_cfg, settings: dict) -> dict:
    """{name: LoRADistillModule(**kwargs)}: the same non-zero adapter in each (fp32, the tiny Llama)."""
    from tomdistill.losses import SFTPlusSoftLoss
    from tomdistill.model.lora_module import LoRADistillModule

    modules = {}
    for name, kwargs in settings.items():
        torch.manual_seed(0)
        lora = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
        modules[name] = LoRADistillModule(tiny_model_cfg, lora, {"lr": 1e-2}, SFTPlusSoftLoss(), **kwargs)
        torch.manual_seed(1)
        for _, p in sorted(modules[name].named_parameters()):
            if p.requires_grad:
                p.data.normal_(0, 0.05)  # a non-zero adapter, the same in each
    return modules


def _batch() -> dict:
    """Two contexts of three and two rows (prefixes 40 and 60 tokens), one row sharing nothing; right-padded."""
    torch.manual_seed(2)
    context_a, context_b = torch.randint(5, 1000, (40,)).tolist(), torch.randint(5, 1000, (60,)).tolist()
    rows = [context_a + [11, 12, 13], context_a + [14, 15, 16, 17], context_b + [21, 22],
            context_a + [18], context_b + [23, 24, 25, 26, 27], [31, 32, 33, 34, 35]]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    lengths = mask.sum(-1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : 41] = -100  # the next-token loss reads the rows' ends (the shared prefixes yield no logits)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "answer_pos": lengths - 1,
            "scenario": torch.arange(len(rows)), "soft_ids": torch.tensor([[340, 422]] * len(rows)),
            "soft_probs": torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])}


def _step(modules: dict, batch: dict) -> tuple[dict, dict]:
    """{name: (losses, adapter gradients)} of one forward and backward pass, {name: decoder forward calls}."""
    results, calls = {}, {}
    for name, module in modules.items():
        decoder = module.model.get_base_model().get_decoder()
        handle = decoder.register_forward_pre_hook(lambda *_, name=name: calls.update({name: calls.get(name, 0) + 1}))
        module.zero_grad()
        out = module.compute_losses(batch)
        out["loss"].backward()
        handle.remove()
        results[name] = (out, {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    return results, calls


@pytest.mark.parametrize("native", [True, False])
def test_shared_prefix_logits_loss_and_gradients_equal_the_padded_pass(tiny_model_cfg, monkeypatch, native):
    from tomdistill.model import lora_module

    monkeypatch.setattr(lora_module, "NATIVE_MASK_SLICING", native and lora_module.NATIVE_MASK_SLICING)
    modules = _modules(tiny_model_cfg, {False: {"shared_prefix": False}, True: {"shared_prefix": True}})
    results, calls = _step(modules, _batch())
    (plain, plain_grads), (fast, fast_grads) = results[False], results[True]
    assert calls[True] == 3  # every prefix, every grouped suffix (one pass: short), the row in no group
    for part in ("sft", "soft", "loss"):
        torch.testing.assert_close(fast[part], plain[part], atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pass_cost", [shared_prefix.PASS_COST_TOKENS, 0])
def test_checkpointed_layers_keep_the_shared_prefixes_and_their_losses_and_gradients(tiny_model_cfg, monkeypatch,
                                                                                      pass_cost):
    # pass cost 0: each of the five grouped suffixes in a pass of its own, against the padded pass
    monkeypatch.setattr(shared_prefix, "PASS_COST_TOKENS", pass_cost)
    modules = _modules(tiny_model_cfg, {"padded": {"shared_prefix": False}, "shared": {"shared_prefix": True},
                                        "checkpointed": {"shared_prefix": True, "gradient_checkpointing": True}})
    assert modules["checkpointed"].shared_prefix
    results, calls = _step(modules, _batch())
    suffix_passes = 1 if pass_cost else 5
    assert calls["shared"] == calls["checkpointed"] == 1 + suffix_passes + 1
    (padded, padded_grads), (shared, shared_grads), (checkpointed, checkpointed_grads) = results.values()
    assert shared_grads.keys() == checkpointed_grads.keys() and shared_grads
    for part in ("sft", "soft", "loss"):  # the replayed layers compute what the first run did (fp32)
        torch.testing.assert_close(checkpointed[part], shared[part], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shared[part], padded[part], atol=1e-5, rtol=1e-5)
    for name in shared_grads:
        torch.testing.assert_close(checkpointed_grads[name], shared_grads[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shared_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)
