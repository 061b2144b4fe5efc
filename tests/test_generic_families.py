"""The generic adapter on families no adapter names: tiny models of each, checked against ``transformers``.

Each family differs from the named ones in a way the generic adapter has to meet without knowing the family:
Gemma 3 (sliding-window LM, bidirectional image block via ``token_type_ids``, one feature tensor for the
batch), LLaVA-OneVision (AnyRes crops), Mistral 3 (Pixtral: every image of a call in one sequence), Idefics3
(sub-images, padding images dropped inside the model), PaliGemma (no chat template, positions counted from 1,
bidirectional prefix), Qwen3-VL (M-RoPE positions, deepstack features) and InternVL (tiles, one feature row
per tile).
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from causalmm import CausalMMConfig
from causalmm.adapters import ADAPTERS, Adapter, UnsupportedModelError
from causalmm.adapters.base import TOKEN_KEYS
from causalmm.sites import Intervention, SiteRule
from causalmm.tiny import GENERIC_FAMILIES

# PaliGemma's processor builds its (unused) labels in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Q = "Is there a cat in the image? Answer yes or no."
Q2 = "Describe the image in detail."
MODES = ["vision", "language", "multimodal", "joint"]


def all_layers(mode: str) -> dict[str, str]:
    """Every layer intervened, for the sites ``mode`` acts on (a layer spec for a site it does not is refused)."""
    return {k: "all" for k, on in (("vision_layers", mode != "language"), ("language_layers", mode != "vision")) if on}


@pytest.fixture(scope="session")
def stock(generic_dirs):
    """The unwrapped ``transformers`` model of a family, eager attention."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoModelForImageTextToText.from_pretrained(
                str(generic_dirs[family]), attn_implementation="eager"
            ).eval()
        return cache[family]

    return get


def _pooled(feature):
    return feature.pooled if hasattr(feature, "pooled") else feature


def test_no_generic_family_has_an_adapter():
    assert not set(GENERIC_FAMILIES) & set(ADAPTERS)


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_the_generic_adapter_is_used(family, generic):
    cm = generic(family)
    assert type(cm.adapter) is Adapter
    assert cm.adapter.vision_attn and cm.adapter.lm_attn


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_regular_greedy_equals_transformers_generate(family, generic, stock, images):
    cm = generic(family)
    res = cm.generate(images[0], Q2, max_new_tokens=8)
    enc = cm.adapter.encode(images[0], Q2)
    out = stock(family).generate(**enc, max_new_tokens=8, do_sample=False)
    expected = out[0, enc["input_ids"].shape[1] :].tolist()
    assert res.token_ids == expected[: len(res.token_ids)]
    assert len(res.token_ids) == len(expected) or res.finish_reason == "eos"


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_hook_without_intervention_equals_stock_forward(family, generic, stock, images):
    """Features handed over through ``mm_encoder_outputs`` and our positions give the stock logits exactly."""
    ad = generic(family).adapter
    enc = ad.encode(images[1], Q2)
    imgs = ad.image_inputs(enc)
    feats = ad.image_features(ad.collate_images([imgs]))
    batch = {k: v for k, v in enc.items() if k in TOKEN_KEYS and k != "labels"}
    meta = ad.collate_images([{k: v for k, v in imgs.items() if k != "pixel_values"}])
    ours = ad.model(**batch, position_ids=ad.prefill_positions(batch, meta), **ad.features_input(feats)).logits
    ref = stock(family)(**{k: v for k, v in enc.items() if k != "labels"}).logits
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_sdpa_base_matches_eager_closely(family, generic, images):
    e = generic(family, "eager").generate(images[0], Q2, max_new_tokens=3, return_branch_logits=True)
    s = generic(family, "sdpa").generate(images[0], Q2, max_new_tokens=3, return_branch_logits=True)
    assert torch.allclose(e.branch_logits["factual"][0], s.branch_logits["factual"][0], atol=1e-4)


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_gamma_zero_reproduces_regular_greedy(family, generic, images):
    cm = generic(family)
    regular = cm.generate(images[1], Q2, max_new_tokens=6).token_ids
    for mode in MODES:
        cfg = CausalMMConfig(mode=mode, **all_layers(mode), gamma=0.0)
        assert cm.with_config(cfg).generate(images[1], Q2, max_new_tokens=6).token_ids == regular, mode
    vcd = CausalMMConfig(method="vcd", gamma=0.0)
    assert cm.with_config(vcd).generate(images[1], Q2, max_new_tokens=6).token_ids == regular


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_counterfactual_branches_differ_and_factual_is_untouched(family, generic, images):
    cm = generic(family)
    regular = cm.generate(images[0], Q2, max_new_tokens=4, return_branch_logits=True)
    cfg = CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all")
    logs = cm.with_config(cfg).generate(images[0], Q2, max_new_tokens=4, return_branch_logits=True).branch_logits
    assert set(logs) == {"factual", "V", "L", "combined"}
    assert torch.allclose(logs["factual"][0], regular.branch_logits["factual"][0], atol=1e-4)
    for name in ("V", "L"):
        gaps = (logs[name] - logs["factual"]).abs().amax(-1)
        # the counterfactual differs from the factual at the first token AND after it (own KV cache)
        assert gaps[0] > 1e-3 and gaps[1:].max() > 1e-3, (name, gaps)
    combined = torch.where(torch.isinf(logs["combined"]), 0, logs["combined"])
    assert not torch.equal(combined, logs["factual"])
    vcd = cm.with_config(CausalMMConfig(method="vcd")).generate(
        images[0], Q2, max_new_tokens=2, return_branch_logits=True
    )
    assert (vcd.branch_logits["noise"][0] - vcd.branch_logits["factual"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_left_padded_batch_equals_one_by_one(family, generic, images):
    cm = generic(family).with_config(
        CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all", num_cf_samples=2)
    )
    prompts = [Q, Q2, "What color is the object?"]
    batch = cm.generate(images, prompts, max_new_tokens=4, seeds=[1, 2, 3])
    for img, prompt, seed, res in zip(images, prompts, [1, 2, 3], batch, strict=True):
        alone = cm.generate([img], [prompt], max_new_tokens=4, seeds=[seed])[0]
        assert alone.token_ids == res.token_ids


def test_rows_leaving_the_batch_keep_sliding_window_caches_right(generic, images):
    """Gemma 3: a prompt that stops early leaves the batch (its cache rows are dropped, sliding layers too)."""
    cm = generic("gemma3").with_config(CausalMMConfig(mode="multimodal", language_layers="all"))
    prompts = [Q, Q2, "What color is the object?"]
    first = cm.generate(images[0], prompts[0], max_new_tokens=8).text
    stop = first[2:4]
    batch = cm.generate(images, prompts, max_new_tokens=8, stop_strings=[stop])
    assert batch[0].finish_reason == "stop" and any(r.finish_reason == "length" for r in batch)
    for img, prompt, res in zip(images, prompts, batch, strict=True):
        assert cm.generate(img, prompt, max_new_tokens=8, stop_strings=[stop]).token_ids == res.token_ids


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_vision_intervention_hits_exactly_the_counterfactual_images(family, generic, images):
    """Images are the generic adapter's vision units, whatever the tower makes of them (crops, tiles, one
    packed sequence); an intervened image is the same whether it is alone or in a batch."""
    ad = generic(family).adapter
    items = [ad.image_inputs(ad.encode(im, Q)) for im in images]
    batch = ad.collate_images(items)
    assert ad.vision_units(batch) == [1, 1, 1]
    plain = [_pooled(f) for f in ad.image_features(batch)]
    rule = SiteRule("random", frozenset(range(ad.n_vision_layers)))

    def cf(batch, lo, hi):
        state = Intervention(vision=rule, vision_targets=[(lo, hi, torch.Generator().manual_seed(0))])
        return [_pooled(f) for f in ad.image_features(batch, state)]

    hit = cf(batch, 1, 2)
    assert torch.equal(hit[0], plain[0]) and torch.equal(hit[2], plain[2])
    assert (hit[1] - plain[1]).abs().max() > 1e-3
    assert torch.equal(cf(ad.collate_images([items[1]]), 0, 1)[0], hit[1])


def test_unsplittable_image_outputs_are_refused_clearly(generic, images, monkeypatch):
    """A further field of the image output that is not laid out per image cannot reach the LLM: say so."""
    ad = generic("gemma3").adapter
    inner = ad.model.model
    stock_features = inner.get_image_features

    def with_extra(*args, **kwargs):
        out = stock_features(*args, **kwargs)
        out["mystery_field"] = torch.zeros(3)
        return out

    monkeypatch.setattr(inner, "get_image_features", with_extra)
    imgs = ad.image_inputs(ad.encode(images[0], Q))
    with pytest.raises(UnsupportedModelError, match="mystery_field"):
        ad.image_features(ad.collate_images([imgs]))


def test_paligemma_needs_no_chat_template(generic, images):
    ad = generic("paligemma").adapter
    assert not ad.processor.chat_template
    assert ad.format_prompt(Q) == "<image>" + Q
    enc = ad.encode(images[0], Q)
    batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
    assert ad.prefill_positions(batch, {})[0, 0] == 1  # PaliGemma counts positions from 1, as generate does


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_visualize_and_explain_on_generic_families(family, generic, images, tmp_path):
    """visualize and explain on the generic adapter: the maps are real (not flat, each counterfactual differs,
    uniform is flat), the figure is written at its size, and explain's combined logits are the decoding rule's."""
    from PIL import Image

    from causalmm.decoding import contrast
    from causalmm.explain import explain
    from causalmm.visualize import DEFAULT_METHODS, attention_maps, figure_size, render

    cm = generic(family)
    res = attention_maps(cm, images[0], Q2)
    for kind in ("vision", "language"):
        factual = res.maps[f"{kind}/factual"]
        assert np.isfinite(factual).all() and np.ptp(factual) > 1e-4, (kind, "flat factual map")
        for method in DEFAULT_METHODS:
            assert np.abs(res.maps[f"{kind}/{method}"] - factual).max() > 1e-4, (kind, method)
        assert np.ptp(res.maps[f"{kind}/uniform"]) == pytest.approx(0.0, abs=1e-7), kind
    with Image.open(render(res, tmp_path / "fig.png")) as im:
        assert im.size == figure_size(res)
    cfg = CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all")
    ex = explain(cm.with_config(cfg), images[0], Q2, max_new_tokens=3, top_k=3)
    names = [b.name for b in cm.with_config(cfg).engine.branches]
    logs = ex.branch_logits
    z = contrast(logs["factual"], [logs[n] for n in names], gamma=cfg.gamma, epsilon=cfg.epsilon)
    assert torch.equal(z, logs["combined"]) and logs["combined"].argmax(-1).tolist() == ex.token_ids
