"""The registered attention hook: stock parity, and interventions confined to the counterfactual rows."""

import pytest
import torch

from causalmm.attention import Intervention, SiteRule, intervene
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
