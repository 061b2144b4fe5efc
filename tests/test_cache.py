"""The in-place KV cache (``causalmm.decoding.cache``): the same keys and values as ``DynamicCache``, views handed out
never change, anything that replaces a layer's tensors is picked up, and generation is token-identical to the
engine on ``DynamicCache`` (``preallocate_cache=False``)."""

import pytest
import torch
from transformers import DynamicCache, MistralConfig
from transformers.cache_utils import DynamicLayer

import causalmm.decoding.forward as forward_module
from causalmm import CausalMMConfig
from causalmm.decoding.cache import GrowingLayer, growing_cache
from causalmm.decoding.sharing import select_cache_rows
from causalmm.tiny import FAMILIES


def _kv(batch: int, new: int, seed: int, heads: int = 2, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, new, dim, generator=g), torch.randn(batch, heads, new, dim, generator=g)


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.get_seq_length() == b.get_seq_length()


def test_growing_layer_matches_dynamic_layer_and_allocates_once_within_its_reserve():
    grow, ref = GrowingLayer(reserve=4), DynamicLayer()
    for step, new in enumerate([5, 1, 1, 1, 1]):
        k, v = _kv(2, new, step)
        got, want = grow.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        _same(grow, ref)
        if step == 0:
            buffer = grow._buffers[0].data_ptr()
        assert grow._buffers[0].data_ptr() == buffer and grow.capacity == 9  # prompt + reserve, allocated once
        assert grow.keys.data_ptr() == buffer  # what attention gets is a view of the buffer, not a copy
    k, v = _kv(2, 1, 9)  # one past the reserve: a new buffer, with room for `reserve` more again
    grow.update(k, v), ref.update(k, v)
    _same(grow, ref)
    assert grow._buffers[0].data_ptr() != buffer and grow.capacity == 14


def test_views_handed_out_keep_their_values():
    grow = GrowingLayer(reserve=8)
    grow.update(*_kv(1, 3, 0))
    first = grow.keys
    copy = first.clone()
    for step in range(4):
        grow.update(*_kv(1, 1, step + 1))
    assert torch.equal(first, copy) and first.shape[-2] == 3 and grow.get_seq_length() == 7


def test_replaced_tensors_are_picked_up_by_the_next_update():
    """Row selection (``select_cache_rows``), ``crop``, ``batch_select_indices`` and ``reset`` replace a layer's
    tensors; the next update must append to what they left, not to the old buffer."""
    grow, ref = growing_cache(_tiny_config(), reserve=6), DynamicCache(config=_tiny_config())
    for cache in (grow, ref):
        for layer in cache.layers:
            layer.update(*_kv(3, 4, 0))
    select_cache_rows(grow, 1, [2, 0], [1])  # layer 0 keeps row 1, layer 1 rows 2 and 0
    select_cache_rows(ref, 1, [2, 0], [1])
    grow.layers[1].crop(-1), ref.layers[1].crop(-1)
    for step in range(3):
        for i, (g, r) in enumerate(zip(grow.layers, ref.layers, strict=True)):
            kv = _kv(1 if i == 0 else 2, 1, step + 10 * i)
            g.update(*kv), r.update(*kv)
            _same(g, r)
    grow.layers[1].batch_select_indices(torch.tensor([1])), ref.layers[1].batch_select_indices(torch.tensor([1]))
    kv = _kv(1, 1, 99)
    grow.layers[1].update(*kv), ref.layers[1].update(*kv)
    _same(grow.layers[1], ref.layers[1])
    grow.layers[0].reset()
    assert grow.layers[0].capacity == 0 and grow.layers[0].get_seq_length() == 0
    kv = _kv(1, 2, 5)
    grow.layers[0].update(*kv)
    assert torch.equal(grow.layers[0].keys, kv[0]) and grow.layers[0].capacity == 8


def test_growing_cache_is_filled_from_data_and_refuses_what_it_cannot_hold():
    data = [_kv(2, 3, i) for i in range(2)]
    cache = growing_cache(_tiny_config(), reserve=5, data=data)
    assert all(type(layer) is GrowingLayer for layer in cache.layers) and cache.get_seq_length() == 3
    for layer, (k, v) in zip(cache.layers, data, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and layer.capacity == 8
    sliding = MistralConfig(
        num_hidden_layers=2, sliding_window=4, hidden_size=8, num_attention_heads=2, num_key_value_heads=2
    )
    with pytest.raises(ValueError, match="plain full-attention.*DynamicSlidingWindowLayer"):
        growing_cache(sliding, reserve=4)
    with pytest.raises(ValueError, match="reserve must be >= 0"):
        GrowingLayer(reserve=-1)


def _tiny_config() -> MistralConfig:
    return MistralConfig(
        num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2, sliding_window=None
    )


PROMPTS = ["Is there a cat in the image?", "Describe the image.", "Is there a dog on the left side of the picture?"]

CONFIGS = {
    "regular": CausalMMConfig(method="regular"),
    "vision": CausalMMConfig(mode="vision", vision_layers="all"),
    "multimodal-k2": CausalMMConfig(mode="multimodal", language_layers=[-1], vision_layers="all", num_cf_samples=2),
    "legacy": CausalMMConfig(mode="multimodal", language_layers=[-1], legacy=True),  # rows leave after token 1
    "vcd": CausalMMConfig(method="vcd"),
}


def _decode_caches(cm):
    """Record, at every forward of the model, its cache and each layer's buffer (kept alive, so a new buffer
    cannot be the old one's memory)."""
    seen: list = []

    def hook(m, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name depends on the transformers version
        seen.append((cache, [getattr(lay, "_buffers", None) for lay in cache.layers]))

    return seen, cm.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [64, 2], ids=["reserve-once", "regrow"])
def test_generation_on_the_growing_cache_gives_the_reference_tokens(family, name, chunk, loaded, images, monkeypatch):
    monkeypatch.setattr(forward_module, "RESERVE_CHUNK", chunk)
    cm = loaded(family)
    cfg = CONFIGS[name]
    fast = cm.with_config(cfg, preallocate_cache=True)
    ref = cm.with_config(cfg, preallocate_cache=False)
    assert fast.engine.preallocate and not ref.engine.preallocate
    fast.engine.eos = ref.engine.eos = set()  # all 6 tokens (prompts leaving early: the test below)
    imgs = [images[0], images[1], images[0]]  # prompts 0 and 2 share image 0: prefix reuse forks a cache
    kw = dict(max_new_tokens=6, seeds=[5, 6, 7], image_seeds=[1, 2, 1], return_branch_logits=True)
    seen, hook = _decode_caches(cm)
    try:
        got = fast.generate(imgs, PROMPTS, **kw)
    finally:
        hook.remove()
    want = ref.generate(imgs, PROMPTS, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for key in w.branch_logits:
            assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-5), key
    # every decode step ran on one growing cache, written in place while within its reserve (6 tokens: the
    # prefill's room lasts all 5 decode steps), reallocated every 2 tokens with `chunk` 2
    cache = seen[-1][0]
    assert all(c is cache for c, _ in seen[-5:]) and all(type(lay) is GrowingLayer for lay in cache.layers)
    bufs = [b for _, b in seen[-5:]]

    def same(i: int, j: int) -> bool:
        return all(a[0] is b[0] for a, b in zip(bufs[i], bufs[j], strict=True))

    if name == "legacy":  # the counterfactual rows leave after token 1: a new buffer at the next update
        assert not same(0, 1) and same(1, 2) and same(1, 3) and same(1, 4) == (chunk == 64)
    elif chunk == 64:
        assert all(same(0, j) for j in range(1, 5))
        assert all(lay.capacity == lay.get_seq_length() + 1 for lay in cache.layers)
    else:
        assert same(0, 1) and same(1, 2) and not same(2, 3)  # room for 2 tokens after the prefill, then again


def test_prompts_leaving_the_batch_on_the_growing_cache(loaded, images):
    """A prompt that stops early leaves the batch (its rows are selected out of the cache mid-generation)."""
    cm = loaded("qwen2_vl")
    cfg = CausalMMConfig(mode="multimodal", language_layers=[-1], vision_layers="all")
    ref = cm.with_config(cfg, preallocate_cache=False)
    got = cm.with_config(cfg, preallocate_cache=True)
    kw = dict(max_new_tokens=8, seeds=[1, 2, 3])
    stop = ref.generate(images[:3], PROMPTS, **kw)[1].token_ids[2]  # prompt 1 stops at its third token
    ref.engine.eos = got.engine.eos = {stop}
    out = got.generate(images[:3], PROMPTS, **kw)
    want = ref.generate(images[:3], PROMPTS, **kw)
    assert [o.token_ids for o in out] == [w.token_ids for w in want]
    assert out[1].finish_reason == "eos" and len(out[1].token_ids) == 3
    assert any(len(o.token_ids) == 8 for o in out)
