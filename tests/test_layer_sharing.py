"""Shared lower layers: a language row runs the LLM layers below the first intervened one through its factual
row only, in prefill and decode, with outputs unchanged.

The reference is the same engine with ``share_layers=False`` and ``reuse_prefix=False`` (every row through every
layer, every prompt prefilled in full).
"""

import pytest
import torch
from transformers import DynamicCache

from causalmm import CausalMMConfig
from causalmm.adapters import Adapter
from causalmm.decoding.sharing import RowPlan, select_cache_rows, share_lower_layers
from causalmm.tiny import FAMILIES

PROMPTS = [
    "Is there a cat in the image?",
    "Describe the image.",
    "Is there a dog on the left side of the picture?",  # shares image 0 with a shorter prompt: middle padding
    "What color is the object?",
]

CONFIGS = {
    # the tiny LLMs have 4 layers: the language branch acts from layer 2 (or 3) on, layers below are shared
    "language": CausalMMConfig(mode="language", language_layers="2-3"),
    "multimodal-k2": CausalMMConfig(mode="multimodal", language_layers=[-1], vision_layers="all", num_cf_samples=2),
    "legacy": CausalMMConfig(mode="multimodal", language_layers=[-1], legacy=True),
}


def _rows_per_layer(cm):
    """Record, per forward of the model, the batch size each decoder layer's attention receives."""
    calls: list[dict[int, int]] = []

    def record(i):
        def hook(m, args, kwargs):
            calls[-1][i] = int((args or (kwargs["hidden_states"],))[0].shape[0])

        return hook

    hooks = [cm.model.register_forward_pre_hook(lambda *a: calls.append({}))]
    hooks += [attn.register_forward_pre_hook(record(i), with_kwargs=True) for i, attn in enumerate(cm.adapter.lm_attn)]
    return calls, hooks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("reuse", [False, True], ids=["full-prefill", "prefix-reuse"])
def test_shared_layers_give_the_reference_tokens_and_logits(family, name, reuse, loaded, images):
    cm = loaded(family)
    cfg = CONFIGS[name]
    shared = cm.with_config(cfg, reuse_prefix=reuse, share_layers=True)
    ref = cm.with_config(cfg, reuse_prefix=False, share_layers=False)
    low = min(shared.engine.language_rule.layers)
    assert shared.engine.share_low == low > 0 and ref.engine.share_low == 0
    imgs = [images[0], images[1], images[0], images[2]]
    for seeds in ([7] * 4, [11, 12, 13, 14]):
        kw = dict(max_new_tokens=5, seeds=seeds, return_branch_logits=True)
        calls, hooks = _rows_per_layer(cm)
        try:
            got = shared.generate(imgs, PROMPTS, **kw)
        finally:
            for h in hooks:
                h.remove()
        want = ref.generate(imgs, PROMPTS, **kw)
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            assert g.branch_logits.keys() == w.branch_logits.keys()
            for key in w.branch_logits:
                assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-4), key
            # the language branch is not the factual branch (else equal outputs would prove nothing)
            assert not torch.allclose(w.branch_logits["L"], w.branch_logits["factual"], atol=1e-3)
        # the layers below `low` ran on fewer rows than the layers from `low` on (in some forwards not at all:
        # language rows fed their factual row's states), in prefill and in every decode step
        n = len(cm.adapter.lm_layers)
        assert all(set(c) in (set(range(n)), set(range(low, n))) for c in calls), calls
        for c in calls:  # one batch size below `low` (or none), one from `low` on
            assert len({c[j] for j in range(low) if j in c}) <= 1 and len({c[j] for j in range(low, n)}) == 1
        if name != "legacy":  # (legacy: the counterfactual rows leave after the first token)
            assert all(c[low - 1] < c[low] for c in calls[-4:]), calls
        assert any(c.get(low - 1, 0) < c[low] for c in calls[:-4]), calls  # in prefill
        if reuse and name != "legacy":  # prompts 0 and 2 share image 0's prefix
            stats, k = shared.engine.prefill_stats, shared.config.num_cf_samples
            if seeds[0] == seeds[2]:  # one image seed: their language rows draw alike there, so they share it too
                assert stats["fed_rows"] == 0 and stats["shared_rows"] >= 2 * (1 + k), stats  # F and L rows
            else:  # their language rows cannot share it, so they are fed their factual rows' states
                assert stats["fed_rows"] >= 2 * k, stats


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sdpa_base_and_single_prompts_share_too(family, loaded, images):
    """Default sdpa underneath (its decode mask may be absent) and a batch of one prompt."""
    cm = loaded(family, "sdpa")
    cfg = CausalMMConfig(mode="language", language_layers="2-3", num_cf_samples=3)
    shared = cm.with_config(cfg, share_layers=True)
    ref = cm.with_config(cfg, reuse_prefix=False, share_layers=False)
    for imgs, prompts in (([images[2]], PROMPTS[:1]), (images[:2], PROMPTS[:2])):
        got = shared.generate(imgs, prompts, max_new_tokens=6, return_branch_logits=True)
        want = ref.generate(imgs, prompts, max_new_tokens=6, return_branch_logits=True)
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            assert torch.allclose(g.branch_logits["combined"], w.branch_logits["combined"], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sid_shares_the_layers_up_to_its_choosing_one(family, loaded, images):
    """SID's pruned row is its factual row up to the layer that chooses the kept image keys: those layers run once
    (that layer's choice read from the factual row's attention), with the reference's tokens and logits."""
    cm = loaded(family)
    cfg = CausalMMConfig(method="sid", params={"layer": 2, "keep": 2})
    shared = cm.with_config(cfg, share_layers=True)
    ref = cm.with_config(cfg, share_layers=False)
    assert shared.engine.share_low == 2 and ref.engine.share_low == 0
    imgs = [images[0], images[1], images[2]]
    kw = dict(max_new_tokens=5, return_branch_logits=True)
    calls, hooks = _rows_per_layer(cm)
    try:
        got = shared.generate(imgs, PROMPTS[:3], **kw)
    finally:
        for h in hooks:
            h.remove()
    want = ref.generate(imgs, PROMPTS[:3], **kw)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for key in w.branch_logits:
            assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-4), key
        assert not torch.allclose(w.branch_logits["sid"], w.branch_logits["factual"], atol=1e-3)
    assert all(c[1] < c[2] for c in calls), calls  # layers 0-1 on the factual rows only, prefill and decode


def test_sharing_is_off_where_nothing_can_be_shared(loaded):
    cm = loaded("llava")
    # the language branch from layer 0: nothing below it
    assert cm.with_config(CausalMMConfig(mode="language", language_layers="all")).engine.share_low == 0
    # no language branch
    assert cm.with_config(CausalMMConfig(mode="vision")).engine.share_low == 0
    # the generic adapter does not declare it (a family may act on per-row inputs between layers)
    assert not Adapter.supports_layer_sharing and type(cm.adapter).supports_layer_sharing


def test_row_plan():
    plan = RowPlan([0, 1, 0, 0, 4, 1])
    assert plan.keep == [0, 1, 4] and plan.gather == [0, 1, 0, 0, 2, 1] and plan.shares
    assert not RowPlan([0, 1, 2]).shares
    with pytest.raises(ValueError, match="not their own source"):
        RowPlan([1, 0])


class _Layer(torch.nn.Module):
    """A decoder-layer stand-in: adds the row's mask sum and cos to its hidden state, records what it got."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.got = []

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None, **kw):
        self.got.append((hidden_states.shape[0], attention_mask.shape[0], position_ids.shape))
        cos, _ = position_embeddings
        return hidden_states * self.w + attention_mask.float().sum((1, 2, 3))[:, None, None] + cos


def test_share_lower_layers_slices_inputs_and_forks_output():
    layers = [_Layer(), _Layer()]
    b, q, d = 4, 3, 2
    h = torch.randn(b, q, d)
    mask = torch.rand(b, 1, q, q) > 0.5
    cos = torch.randn(b, q, d)
    pos = torch.arange(3 * b * q).view(3, b, q)  # M-RoPE-style (axes, B, q)

    def run(x):
        for layer in layers:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, cos), position_ids=pos)
        return x

    plan = RowPlan([0, 1, 0, 1])
    # rows 2 and 3 are rows 0 and 1 (their inputs equal), so forking their outputs gives the same result
    h2, mask2, cos2 = h.clone(), mask.clone(), cos.clone()
    for t in (h2, mask2, cos2):
        t[2:] = t[:2]
    h, mask, cos = h2, mask2, cos2
    want = run(h)
    with share_lower_layers(layers, plan):
        got = run(h)
    assert torch.equal(got, want)
    assert [g[:2] for g in layers[0].got[-1:] + layers[1].got[-1:]] == [(2, 2), (2, 2)]
    assert layers[0].got[-1][2] == (3, 2, q)
    # hooks are gone after the block
    run(h)
    assert layers[0].got[-1][0] == b


def test_share_lower_layers_refuses_unknown_per_row_inputs():
    layer = _Layer()
    plan = RowPlan([0, 0])
    with share_lower_layers([layer], plan), pytest.raises(NotImplementedError, match="share_layers=False"):
        layer(
            torch.zeros(2, 1, 2),
            attention_mask=torch.ones(2, 1, 1, 1),
            position_embeddings=(torch.zeros(2, 1, 2),) * 2,
            position_ids=torch.zeros(2, 1),
            visual_pos_masks=torch.ones(2, 1),
        )


def test_select_cache_rows_cuts_lower_and_upper_layers_apart():
    cache = DynamicCache()
    for i in range(3):
        rows = 2 if i < 1 else 4
        cache.update(torch.arange(rows, dtype=torch.float).view(rows, 1, 1, 1), torch.zeros(rows, 1, 1, 1), i)
    select_cache_rows(cache, 1, upper=[3, 0], lower=[1])
    assert cache.layers[0].keys.flatten().tolist() == [1.0]
    assert cache.layers[1].keys.flatten().tolist() == [3.0, 0.0] == cache.layers[2].keys.flatten().tolist()
