"""The registered attention hook: stock parity, and interventions confined to the counterfactual rows."""

import pytest
import torch

from causalmm.sites import Draws, Intervention, SiteRule, intervene
from causalmm.sites.attention import _blocks
from causalmm.tiny import FAMILIES

Q = "Describe the image in detail."


def _two_rows(cm, image):
    """The same prompt twice, as one batch of two rows, with its image features."""
    ad = cm.adapter
    enc = ad.encode(image, Q)
    imgs = ad.image_inputs(enc)
    feats = ad.image_features(ad.collate_images([imgs, imgs]))
    batch = {k: torch.cat([v, v]) for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    meta = ad.collate_images([{k: v for k, v in imgs.items() if k != "pixel_values"}] * 2)
    pos = ad.prefill_positions(batch, meta)
    return ad, batch, feats, pos, imgs


def _logits(ad, batch, feats, pos, state=None):
    with intervene(state or Intervention()):
        return ad.model(**batch, position_ids=pos, **ad.features_input(feats)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_without_intervention_equals_stock_eager(family, loaded, model_dirs, images):
    from transformers import AutoModelForImageTextToText

    cm = loaded(family, "eager")
    ad, batch, feats, pos, imgs = _two_rows(cm, images[0])
    ours = _logits(ad, batch, feats, pos)
    stock = AutoModelForImageTextToText.from_pretrained(str(model_dirs[family]), attn_implementation="eager")
    enc = ad.encode(images[0], Q)
    ref = stock(**enc).logits
    assert torch.equal(ours[0], ref[0])
    # the stock vision tower too
    ref_feats = stock.model.get_image_features(**{k: v for k, v in imgs.items()}, return_dict=True).pooler_output
    assert torch.equal(torch.cat(list(feats[:1])), torch.cat(list(ref_feats)))


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_base_matches_eager_closely(family, loaded, images):
    ad_e, batch, feats, pos, _ = _two_rows(loaded(family, "eager"), images[0])
    ad_s = loaded(family, "sdpa").adapter
    assert torch.allclose(_logits(ad_e, batch, feats, pos), _logits(ad_s, batch, feats, pos), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "uniform", "reversed", "shuffle"])
def test_language_intervention_touches_only_counterfactual_rows(family, method, loaded, images):
    ad, batch, feats, pos, _ = _two_rows(loaded(family), images[0])
    plain = _logits(ad, batch, feats, pos)
    rule = SiteRule(method, frozenset(range(ad.n_language_layers)))
    state = Intervention(language=rule, language_rows={1: torch.Generator().manual_seed(0)})
    cf = _logits(ad, batch, feats, pos, state)
    assert torch.equal(cf[0], plain[0])
    assert (cf[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_language_intervention_respects_layers_and_heads(family, loaded, images):
    ad, batch, feats, pos, _ = _two_rows(loaded(family), images[0])
    seen = []
    rule = SiteRule("uniform", frozenset({1}), heads=(0,))
    state = Intervention(
        language=rule, language_rows={1: None}, on_probs=lambda site, rows, f, c: seen.append((site, f, c))
    )
    _logits(ad, batch, feats, pos, state)
    assert [s.layer for s, _, _ in seen] == [1]
    site, fact, cf = seen[0]
    assert site.kind == "language"
    assert not torch.equal(cf[:, 0], fact[:, 0])  # head 0 replaced
    assert torch.equal(cf[:, 1:], fact[:, 1:])  # other heads untouched
    # the causal mask is respected: nothing above the diagonal
    q = cf.shape[-2]
    assert torch.all(torch.triu(cf[0, 0], diagonal=cf.shape[-1] - q + 1) == 0)


def _maps_of_one_prompt(ad, image, prompt, rule, gen):
    """The counterfactual maps ``(layer, heads, q, k)`` of one prompt run alone, and its image prefix length."""
    enc = ad.encode(image, prompt)
    imgs = ad.image_inputs(enc)
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    meta = ad.collate_images([{k: v for k, v in imgs.items() if k != "pixel_values"}])
    pos = ad.prefill_positions(batch, meta)
    image_token = ad.model.config.image_token_id
    prefix = int((enc["input_ids"][0] == image_token).nonzero()[-1]) + 1
    seen = []
    state = Intervention(language=rule, language_rows={0: gen(prefix)}, on_probs=lambda s, r, f, c: seen.append(c[0]))
    _logits(ad, batch, ad.image_features(ad.collate_images([imgs])), pos, state)
    return torch.stack(seen), prefix


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "shuffle"])
def test_draws_split_at_the_image_prefix(family, method, loaded, images):
    """Two questions on one image, one prefix stream, two sample streams: the maps of the queries in the image
    prefix are equal (so that prefix can be prefilled once for both), the later ones differ; a plain generator
    draws every query from one stream."""
    ad = loaded(family).adapter
    rule = SiteRule(method, frozenset(range(ad.n_language_layers)))

    def draws(sample_seed):
        return lambda n: Draws(torch.Generator().manual_seed(sample_seed), torch.Generator().manual_seed(5), n)

    a, n = _maps_of_one_prompt(ad, images[0], Q, rule, draws(1))
    b, n_b = _maps_of_one_prompt(ad, images[0], "Is there a dog?", rule, draws(2))
    assert n == n_b and a.shape[-1] > n + 1 and b.shape[-1] > n + 1
    assert torch.equal(a[..., :n, :n], b[..., :n, :n])
    assert torch.all(a[..., :n, n:] == 0)  # causal: nothing past the prefix
    assert not torch.equal(a[..., n, : n + 1], b[..., n, : n + 1])  # the first query after it: own stream
    # the same sample stream over the same prompt draws the same maps after the prefix too
    again, _ = _maps_of_one_prompt(ad, images[0], Q, rule, draws(1))
    assert torch.equal(again, a)
    plain, _ = _maps_of_one_prompt(ad, images[0], Q, rule, lambda n: torch.Generator().manual_seed(5))
    assert not torch.equal(plain[..., :n, :n], a[..., :n, :n])


def test_draws_blocks_split_queries_and_fall_back_where_the_prefix_sees_past_it():
    """The blocks of one row: prefix queries over the prefix keys, later queries over every real key; with
    bidirectional attention over the prompt (a prefix query sees a later key) the whole row takes one stream."""
    k = 6
    real = torch.tensor([1, 2, 3, 4, 5])  # key 0 is padding
    causal = torch.tril(torch.ones(k, k, dtype=torch.bool))[None]
    causal[..., 0] = False
    g, pg = torch.Generator(), torch.Generator()
    blocks = _blocks(causal[:, 1:], real, torch.arange(5), Draws(g, pg, 2))
    assert [(q.tolist(), kk.tolist(), gen) for q, kk, gen in blocks] == [
        ([0, 1], [1, 2], pg),
        ([2, 3, 4], [1, 2, 3, 4, 5], g),
    ]
    # a decode step (one query, after the prefix) and a row with no image prefix take the sample stream only
    assert [gen for *_, gen in _blocks(causal[:, -1:], real, torch.tensor([0]), Draws(g, pg, 2))] == [g]
    assert [gen for *_, gen in _blocks(causal[:, 1:], real, torch.arange(5), Draws(g, pg, 0))] == [g]
    full = causal.clone()
    full[..., 1:] = True
    assert [gen for *_, gen in _blocks(full[:, 1:], real, torch.arange(5), Draws(g, pg, 2))] == [g]
    assert [gen for *_, gen in _blocks(causal[:, 1:], real, torch.arange(5), g)] == [g]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_intervention_hits_exactly_the_counterfactual_images(family, loaded, images):
    ad = loaded(family).adapter
    items = [ad.image_inputs(ad.encode(im, Q)) for im in images]
    batch = ad.collate_images(items)
    plain = ad.image_features(batch)
    units = ad.vision_units(batch)
    assert len(units) == 3
    start = sum(units[:1])
    rule = SiteRule("random", frozenset(range(ad.n_vision_layers)))
    state = Intervention(vision=rule, vision_targets=[(start, start + units[1], torch.Generator().manual_seed(0))])
    cf = ad.image_features(batch, state)
    assert torch.equal(cf[0], plain[0]) and torch.equal(cf[2], plain[2])
    assert (cf[1] - plain[1]).abs().max() > 1e-3


def test_feature_gate_hand_computed_on_llava(loaded, images):
    """uniform, unnormalised: every map entry is 1/(N+1), so the gate divides the patch features by N+1."""
    ad = loaded("llava").adapter
    imgs = ad.image_inputs(ad.encode(images[0], Q))
    layer = ad.default_vision_layers()[0]
    rule = SiteRule("uniform", frozenset({layer}), renormalize=False)
    gated = ad.gated_image_features(imgs, rule, [(0, 1, None)])[0]
    inner = ad.model.model
    hs = inner.vision_tower(imgs["pixel_values"], output_hidden_states=True).hidden_states[layer + 1]
    tokens = hs.shape[1]
    expect = inner.multi_modal_projector(hs[:, 1:] / tokens)[0]
    assert torch.allclose(gated, expect, atol=1e-5)
    assert not torch.allclose(gated, ad.image_features(imgs)[0], atol=1e-3)


def test_feature_gate_is_refused_for_packed_towers(loaded):
    from causalmm import CausalMMConfig, ConfigError

    with pytest.raises(ConfigError, match="gate"):
        loaded("qwen2_vl").with_config(CausalMMConfig(mode="vision", vision_style="gate"))
