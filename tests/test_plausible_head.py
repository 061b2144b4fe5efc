"""Counterfactual logits on the plausible tokens only (``causalmm.decoding.head``): the rule's output is unchanged.

The reference is the same engine with ``plausible_head=False`` (the LM head on every row)."""

import dataclasses

import pytest
import torch

import causalmm.decoding.head as head_module
from causalmm import CausalMMConfig
from causalmm.adapters import Adapter
from causalmm.decoding import contrast, plausible
from causalmm.decoding.head import DENSE_FRACTION, dense_logits, head_on_rows, plausible_logits
from causalmm.tiny import FAMILIES

PROMPTS = ["Is there a cat in the image?", "Describe the image.", "Is there a dog on the left?", "What color is it?"]

CONFIGS = {
    "vision": CausalMMConfig(mode="vision", vision_layers="all"),
    "language": CausalMMConfig(mode="language", language_layers="2-3"),
    "multimodal-k2": CausalMMConfig(mode="multimodal", language_layers=[-1], vision_layers="all", num_cf_samples=2),
    "joint": CausalMMConfig(mode="joint", language_layers=[1], vision_layers="all", gamma=0.5, epsilon=0.01),
    "vcd": CausalMMConfig(method="vcd"),
    "legacy": CausalMMConfig(mode="multimodal", language_layers=[-1], legacy=True),
}


# -- the pure parts ----------------------------------------------------------------------------------------


def test_plausible_is_the_cut_of_the_rule():
    g = torch.Generator().manual_seed(0)
    factual = torch.randn(3, 50, generator=g) * 3
    for eps in (0.5, 0.1, 1e-3):
        keep = plausible(factual, eps)
        probs = factual.softmax(-1)
        want = probs >= eps * probs.amax(-1, keepdim=True)
        # equal up to rounding at the boundary: none of these draws lies within 1e-6 of it
        assert torch.equal(keep, want)
        z = contrast(factual, [torch.randn(3, 50, generator=g)], gamma=1.0, epsilon=eps)
        assert torch.equal(torch.isfinite(z), keep)
    assert plausible(factual, 0.0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_plausible_logits_are_exact_where_the_rule_reads_them(bias):
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(40, 16, generator=g))
        if bias:
            head.bias.copy_(torch.randn(40, generator=g))
    # rows: prompt 0 = (factual 0, cf 1, cf 2), prompt 1 = (factual 3, cf 4)
    hidden = torch.randn(5, 16, generator=g)
    full = head(hidden).detach()
    factual_rows, factual_of, cf = [0, 3], [0, 0, 0, 1, 1], [1, 2, 4]
    eps = 0.05
    got = plausible_logits(head, hidden, full[factual_rows], factual_of, cf, eps)
    assert got.shape == (5, 40) and got.dtype == torch.float32
    keep = plausible(full[factual_rows], eps)
    assert 0 < int(keep.sum()) < 40  # a real cut: some tokens are computed, some are not
    cols = keep.any(0)
    for j, f in enumerate(factual_of):
        if j in cf:  # exact on the union of the plausible sets, the factual row's logits elsewhere
            assert torch.allclose(got[j, cols], full[j, cols], atol=1e-5)
            assert torch.equal(got[j, ~cols], full[factual_rows[f], ~cols])
        else:
            assert torch.equal(got[j], full[j])
    for f, rows in ((0, [1, 2]), (1, [4])):  # the rule's output is the full head's
        want = contrast(full[factual_rows[f]], [full[r] for r in rows], gamma=0.7, epsilon=eps)
        z = contrast(got[factual_rows[f]], [got[r] for r in rows], gamma=0.7, epsilon=eps)
        assert torch.equal(torch.isinf(z), torch.isinf(want))
        assert torch.allclose(z[~torch.isinf(z)], want[~torch.isinf(want)], atol=1e-5)


def test_a_flat_distribution_gets_the_whole_head():
    """Where much of the vocabulary is plausible, the counterfactual rows get the head's own output, whole."""
    head = torch.nn.Linear(8, 40)
    hidden = torch.randn(2, 8)
    full = head(hidden).detach()
    flat = torch.zeros(1, 40)
    flat[0, :11] = 1.0  # 11 of 40 plausible at epsilon 0.5: over a quarter
    got = plausible_logits(head, hidden, flat, [0, 0], [1], 0.5)
    assert plausible(flat, 0.5).sum() * DENSE_FRACTION > 40
    assert torch.allclose(got[1], full[1], atol=1e-6) and torch.equal(got[0], flat[0])
    flat[0, 10] = 0.0  # 10 of 40: sliced
    got = plausible_logits(head, hidden, flat, [0, 0], [1], 0.5)
    assert torch.equal(got[1, 10:], flat[0, 10:]) and torch.allclose(got[1, :10], full[1, :10], atol=1e-6)


def test_head_on_rows_runs_the_head_on_those_rows_and_keeps_the_input():
    head = torch.nn.Linear(4, 6)
    hidden = torch.randn(3, 1, 4)
    with head_on_rows(head, [2, 0]) as kept:
        out = head(hidden)
    assert torch.equal(out, head(hidden[[2, 0]]))
    assert kept["hidden"] is hidden
    assert torch.equal(head(hidden), head(hidden).detach())  # the hook is gone: all rows again
    assert head(hidden).shape[0] == 3
    with pytest.raises(RuntimeError, match="boom"), head_on_rows(head, [0]):
        raise RuntimeError("boom")
    assert not head._forward_pre_hooks


@pytest.mark.parametrize("bias", [False, True])
def test_dense_logits_are_the_head(bias):
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(24, 70, bias=bias)
    hidden = torch.randn(3, 24, generator=g)
    with torch.no_grad():
        assert torch.allclose(dense_logits(head, hidden), head(hidden), atol=1e-5, rtol=1e-5)
        assert dense_logits(head, hidden[:0]).shape == (0, 70)


# -- the engine --------------------------------------------------------------------------------------------


def _head_rows(cm):
    """Rows the LM head receives, per call."""
    sizes: list[int] = []
    hook = cm.model.get_output_embeddings().register_forward_hook(lambda m, a, out: sizes.append(out.shape[0]))
    return sizes, hook


def _generate_counting_head_rows(cm, runner, *args, **kw):
    """``runner.generate(*args, **kw)`` and the rows the LM head received, per call."""
    sizes, hook = _head_rows(cm)
    try:
        return runner.generate(*args, **kw), sizes
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fraction", [1, 10**9], ids=["sliced", "dense"])
def test_plausible_head_gives_the_reference_tokens(family, name, fraction, loaded, images, monkeypatch):
    """Both ways of computing the counterfactual rows' logits: on the plausible columns (``DENSE_FRACTION`` 1:
    always, however many) and whole (the tiny models' flat distributions mostly take this way by default)."""
    monkeypatch.setattr(head_module, "DENSE_FRACTION", fraction)
    cm = loaded(family)
    cfg = CONFIGS[name]
    fast = cm.with_config(cfg, plausible_head=True)
    ref = cm.with_config(cfg, plausible_head=False)
    assert fast.engine.head is cm.model.get_output_embeddings() and ref.engine.head is None
    imgs = [images[0], images[1], images[0], images[2]]
    for kw in (
        dict(max_new_tokens=6, seeds=[3, 4, 5, 6]),
        dict(max_new_tokens=6, seeds=[3, 4, 5, 6], do_sample=True, temperature=1.5),
    ):
        sizes, hook = _head_rows(cm)
        try:
            got = fast.generate(imgs, PROMPTS, **kw)
            n_fast = len(sizes)
            want = ref.generate(imgs, PROMPTS, **kw)
        finally:
            hook.remove()
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        # the decode steps: the head ran on the factual rows only, where the reference ran it on every row
        # (legacy: only the factual rows are left after the first token); a sampled prompt that has ended drops
        # its rows, so each step counts the prompts still answering
        per_prompt = 1 + (0 if cfg.legacy else len(fast.engine.branches) * cfg.num_cf_samples)
        alive = [n for n in (sum(len(w.token_ids) > k for w in want) for k in range(1, 6)) if n]
        assert sizes[-len(alive) :] == [per_prompt * n for n in alive], sizes
        if fraction == 1:
            assert sizes[n_fast - len(alive) : n_fast] == alive, sizes
    # the contrast acts (else equal tokens would prove nothing): gamma 0 gives other tokens somewhere
    plain = cm.with_config(dataclasses.replace(cfg, gamma=0.0))
    kw = dict(max_new_tokens=6, seeds=[3, 4, 5, 6])
    assert [r.token_ids for r in plain.generate(imgs, PROMPTS, **kw)] != [w.token_ids for w in want]


def test_prompts_leaving_the_batch_keep_their_factual_rows_right(loaded, images, monkeypatch):
    """A prompt that stops early leaves the batch: the factual row of every prompt left must stay paired."""
    monkeypatch.setattr(head_module, "DENSE_FRACTION", 1)
    cm = loaded("llava")
    cfg = CausalMMConfig(mode="multimodal", language_layers=[-1], vision_layers="all")
    ref = cm.with_config(cfg, plausible_head=False)
    got = cm.with_config(cfg, plausible_head=True)
    kw = dict(max_new_tokens=8, seeds=[1, 2, 3])
    stop = ref.generate(images[:3], PROMPTS[:3], **kw)[1].token_ids[2]  # prompt 1 stops at its third token
    ref.engine.eos = got.engine.eos = {stop}
    out = got.generate(images[:3], PROMPTS[:3], **kw)
    want = ref.generate(images[:3], PROMPTS[:3], **kw)
    assert [o.token_ids for o in out] == [w.token_ids for w in want]
    assert out[1].finish_reason == "eos" and len(out[1].token_ids) == 3
    assert any(len(o.token_ids) == 8 for o in out)


def test_plausible_head_is_off_where_the_rule_needs_full_logits(loaded, images):
    cm = loaded("llava")
    head = cm.model.get_output_embeddings()
    assert cm.with_config(CausalMMConfig(mode="vision")).engine.head is head
    assert cm.with_config(CausalMMConfig(mode="vision", epsilon=0.0)).engine.head is None  # no cut
    assert cm.with_config(CausalMMConfig(method="regular")).engine.head is None  # nothing to contrast
    assert not Adapter.plain_lm_head  # the generic adapter: a family may cap or scale its logits
    # branch logits asked for: the head runs on every row, and they are whole (finite everywhere)
    sizes, hook = _head_rows(cm)
    try:
        res = cm.with_config(CausalMMConfig(mode="vision")).generate(
            images[0], PROMPTS[0], max_new_tokens=3, return_branch_logits=True
        )
    finally:
        hook.remove()
    assert sizes == [2, 2, 2]
    assert torch.isfinite(res.branch_logits["V"]).all()


#: methods whose rule reads whole counterfactual distributions (log-softmax), and a cut of zero
WHOLE = {
    "m3id": CausalMMConfig(method="m3id", params={"alpha": 1.0, "lamb": 0.5}),
    "pai": CausalMMConfig(method="pai", gamma=2.0, params={"start_layer": 1}),
    "no cut": CausalMMConfig(mode="language", language_layers="all", epsilon=0.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_distributions_in_one_product_give_the_reference_tokens(family, name, loaded, images):
    """Where the rule reads whole distributions, decode steps compute every row's logits in one ``dense_logits``
    product (the model's own head gets no row): the tokens of the head on every row, greedy and sampled."""
    cm = loaded(family)
    if name == "pai" and len(cm.adapter.lm_layers) < 2:
        pytest.skip("a one-layer LLM has no layer 1 to boost")
    cfg = WHOLE[name]
    fast, ref = cm.with_config(cfg), cm.with_config(cfg, plausible_head=False)
    head = cm.model.get_output_embeddings()
    if not cm.adapter.plain_lm_head or type(head) is not torch.nn.Linear:
        assert fast.engine.forward.dense_head is None  # a capped or scaled head keeps the model's own path
        return
    assert fast.engine.forward.dense_head is head and fast.engine.head is None
    assert ref.engine.forward.dense_head is None
    imgs = [images[0], images[1], images[0], images[2]]
    for kw in (
        dict(max_new_tokens=5, seeds=[3, 4, 5, 6]),
        dict(max_new_tokens=5, seeds=[3, 4, 5, 6], do_sample=True, temperature=1.5),
    ):
        got, sizes = _generate_counting_head_rows(cm, fast, imgs, PROMPTS, **kw)
        want = ref.generate(imgs, PROMPTS, **kw)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert sizes[-4:] == [0] * 4, sizes  # the 4 decode steps: no row through the model's head


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exits_and_final_logits_are_one_product(family, loaded, images):
    """DoLa and DeCo on a plain head: the final rows join the early exits' product (the model's own head gets
    no row), and with the contrast off the tokens are regular decoding's."""
    cm = loaded(family)
    imgs, kw = [images[0], images[1]], dict(max_new_tokens=4, seeds=[1, 2])
    want = [r.token_ids for r in cm.with_config(CausalMMConfig(method="regular")).generate(imgs, PROMPTS[:2], **kw)]
    for cfg in (CausalMMConfig(method="dola", gamma=0.0), CausalMMConfig(method="deco", params={"alpha": 0.0})):
        got, sizes = _generate_counting_head_rows(cm, cm.with_config(cfg), imgs, PROMPTS[:2], **kw)
        assert [r.token_ids for r in got] == want, cfg.method
        assert sizes and set(sizes) == {0}, sizes
    # at the official settings, the tokens of the model's own head on the final rows (plausible_head=False)
    for cfg in (CausalMMConfig(method="dola"), CausalMMConfig(method="deco")):
        ref = cm.with_config(cfg, plausible_head=False)
        assert ref.engine.forward.dense_head is None
        got = cm.with_config(cfg).generate(imgs, PROMPTS[:2], **kw)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref.generate(imgs, PROMPTS[:2], **kw)]
