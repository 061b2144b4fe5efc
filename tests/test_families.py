"""End-to-end behaviour of the engine on tiny models of every supported family."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from causalmm import CausalMMConfig
from causalmm.tiny import FAMILIES

Q = "Is there a cat in the image? Answer yes or no."
Q2 = "Describe the image in detail."
MODES = ["vision", "language", "multimodal", "joint"]


def all_layers(mode: str) -> dict[str, str]:
    """Every layer intervened, for the sites ``mode`` acts on (a layer spec for a site it does not is refused)."""
    return {k: "all" for k, on in (("vision_layers", mode != "language"), ("language_layers", mode != "vision")) if on}


@pytest.mark.parametrize("family", FAMILIES)
def test_regular_greedy_equals_transformers_generate(family, loaded, model_dirs, images):
    cm = loaded(family)
    res = cm.generate(images[0], Q, max_new_tokens=8)
    enc = cm.adapter.encode(images[0], Q)
    ref = AutoModelForImageTextToText.from_pretrained(str(model_dirs[family]), attn_implementation="eager")
    out = ref.generate(**enc, max_new_tokens=8, do_sample=False)
    expected = out[0, enc["input_ids"].shape[1] :].tolist()
    assert res.token_ids == expected[: len(res.token_ids)]
    assert len(res.token_ids) == len(expected) or res.finish_reason == "eos"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("neutral", [{"gamma": 0.0}, {"epsilon": 1.0}])
def test_gamma_zero_and_epsilon_one_reproduce_regular_greedy(family, neutral, loaded, images):
    cm = loaded(family)
    regular = cm.generate(images[1], Q2, max_new_tokens=8).token_ids
    for mode in MODES:
        cfg = CausalMMConfig(mode=mode, **all_layers(mode), **neutral)
        assert cm.with_config(cfg).generate(images[1], Q2, max_new_tokens=8).token_ids == regular, mode
    vcd = CausalMMConfig(method="vcd", **neutral)
    assert cm.with_config(vcd).generate(images[1], Q2, max_new_tokens=8).token_ids == regular


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_counterfactual_branches_differ_and_factual_is_untouched(family, mode, loaded, images):
    cm = loaded(family)
    regular = cm.generate(images[0], Q2, max_new_tokens=6, return_branch_logits=True)
    cfg = CausalMMConfig(mode=mode, **all_layers(mode))
    res = cm.with_config(cfg).generate(images[0], Q2, max_new_tokens=6, return_branch_logits=True)
    logs = res.branch_logits
    # the factual row is plain decoding (bit-identity within one batch is proven in test_attention.py)
    assert torch.allclose(logs["factual"][0], regular.branch_logits["factual"][0], atol=1e-4)
    for name in {"vision": ["V"], "language": ["L"], "multimodal": ["V", "L"], "joint": ["J"]}[mode]:
        gaps = (logs[name] - logs["factual"]).abs().amax(-1)
        # the counterfactual differs from the factual at the first token AND after it (own KV cache)
        assert gaps[0] > 1e-3 and gaps[1:].max() > 1e-3, (name, gaps)
    combined = torch.where(torch.isinf(logs["combined"]), 0, logs["combined"])
    assert not torch.equal(combined, logs["factual"])


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_contrast_acts_on_the_first_token_only(family, loaded, images):
    cm = loaded(family)
    cfg = CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all", legacy=True)
    res = cm.with_config(cfg).generate(images[0], Q2, max_new_tokens=5, return_branch_logits=True)
    logs = res.branch_logits
    for name in ("V", "L"):
        assert (logs[name][0] - logs["factual"][0]).abs().max() > 1e-3
        assert torch.equal(logs[name][1:], logs["factual"][1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_one_by_one(family, loaded, images):
    cm = loaded(family).with_config(
        CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all", num_cf_samples=2)
    )
    prompts = [Q, Q2, "What color is the object?"]
    batch = cm.generate(images, prompts, max_new_tokens=6, seeds=[1, 2, 3])
    for img, prompt, seed, res in zip(images, prompts, [1, 2, 3], batch, strict=True):
        alone = cm.generate([img], [prompt], max_new_tokens=6, seeds=[seed])[0]
        assert alone.token_ids == res.token_ids


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_seeds_drive_counterfactual_draws_and_sampling(family, loaded, images):
    cm = loaded(family).with_config(CausalMMConfig(mode="language", language_layers="all"))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, return_branch_logits=True)
    a = cm.generate([images[0]], [Q2], seeds=[5], **kw)[0]
    b = cm.generate([images[0]], [Q2], seeds=[5], **kw)[0]
    c = cm.generate([images[0]], [Q2], seeds=[6], **kw)[0]
    assert a.token_ids == b.token_ids and torch.equal(a.branch_logits["L"], b.branch_logits["L"])
    assert not torch.equal(a.branch_logits["L"][0], c.branch_logits["L"][0])


def test_num_cf_samples_averages_k_draws(loaded, images):
    cm = loaded("llava")

    def lang_logits(method, k):
        cfg = CausalMMConfig(mode="language", language_layers="all", language_cf=method, num_cf_samples=k)
        res = cm.with_config(cfg).generate(images[0], Q, max_new_tokens=2, return_branch_logits=True)
        return res.branch_logits["L"]

    # K identical (deterministic) draws average to one draw; K random draws do not
    assert torch.allclose(lang_logits("uniform", 3), lang_logits("uniform", 1), atol=1e-5)
    assert (lang_logits("random", 3) - lang_logits("random", 1)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_combined_logits_follow_the_rule(family, loaded, images):
    from causalmm.contrast import contrast

    cm = loaded(family)
    cfg = CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all", gamma=0.7, epsilon=0.05)
    res = cm.with_config(cfg).generate(images[2], Q, max_new_tokens=3, return_branch_logits=True)
    logs = res.branch_logits
    expect = contrast(logs["factual"], [logs["V"], logs["L"]], gamma=0.7, epsilon=0.05)
    assert torch.equal(expect, logs["combined"])
    assert res.token_ids == logs["combined"].argmax(-1).tolist()


def test_stop_strings_and_eos(loaded, images):
    cm = loaded("llava")
    free = cm.generate(images[0], Q2, max_new_tokens=10)
    assert free.finish_reason in ("length", "eos")
    text = free.text
    assert len(text) > 4, "the tiny model should say something"
    stop = text[2:4]
    cut = cm.generate(images[0], Q2, max_new_tokens=10, stop_strings=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert text.startswith(cut.text) and len(cut.token_ids) < len(free.token_ids)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_gate_style_runs_in_the_engine(family, loaded, images):
    cfg = CausalMMConfig(mode="vision", vision_style="gate")
    res = loaded(family).with_config(cfg).generate(images[0], Q2, max_new_tokens=3, return_branch_logits=True)
    assert (res.branch_logits["V"] - res.branch_logits["factual"]).abs().amax(-1).min() > 1e-3
