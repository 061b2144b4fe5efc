"""The field's baselines in the engine: each rule against a hand-computed example, each branch input against
what the official code builds, neutral settings against regular decoding, and the engine's combination on every
tiny family (adapter and generic)."""

import math

import pytest
import torch

from causalmm import CausalMMConfig, ConfigError
from causalmm.adapters import UnsupportedModelError
from causalmm.methods import get_method
from causalmm.methods.icd import PREFIXES, instruction
from causalmm.methods.m3id import m3id_scores
from causalmm.methods.pai import pai_scores
from causalmm.sites import Intervention, Site, intervene
from causalmm.sites.edits import Boost, edited_attention
from causalmm.tiny import ALL_FAMILIES

# PaliGemma's processor builds its (unused) labels in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Q = "Is there a cat in the image? Answer yes or no."
HALF = torch.tensor([0.5, 0.25, 0.25]).log()  # log-probabilities, so log_softmax leaves them as they are
SWAP = torch.tensor([0.25, 0.5, 0.25]).log()


def _step_logits(cm, enc):
    """The stock model's next-token logits for one processor output (its own positions and image handling)."""
    with torch.no_grad():
        return cm.model(**{k: v for k, v in enc.items() if k != "labels"}).logits[0, -1].float()


# -- the rules, by hand -----------------------------------------------------------------------------------------
def test_icd_rule_is_one_plus_alpha_l_minus_alpha_l_icd_under_the_cut():
    cfg = CausalMMConfig(method="icd")
    assert (cfg.gamma, cfg.epsilon) == (1.0, 0.1)
    lf, ld = torch.tensor([2.0, 1.0, -3.0]), torch.tensor([1.0, 1.5, -3.0])
    # (1 + 1) * [2, 1] - [1, 1.5] = [3, 0.5]; p(-3) / p(2) = e^-5 < 0.1 is cut
    z = get_method("icd").combine(lf, {"instruction": ld}, cfg, 0)
    assert torch.equal(z, torch.tensor([3.0, 0.5, -math.inf]))
    z = get_method("icd").combine(lf, {"instruction": ld}, cfg.replace(gamma=0.5, epsilon=0.0), 0)
    assert torch.allclose(z, 1.5 * lf - 0.5 * ld)


def test_m3id_rule_grows_with_the_step_and_gates_on_confidence():
    # w_t = (1 - e^{-lamb t}) / e^{-lamb t}; lamb = ln 2: w_1 = 1, w_2 = 3
    z1 = m3id_scores(HALF, SWAP, t=1, lamb=math.log(2), alpha=0.6, epsilon=0.1)
    assert torch.allclose(z1, torch.tensor([0.0, math.log(1 / 8), math.log(1 / 4)]))  # 2 lc - lu
    z2 = m3id_scores(HALF, SWAP, t=2, lamb=math.log(2), alpha=0.6, epsilon=0.1)
    assert torch.allclose(z2, 4 * HALF - 3 * SWAP)
    # the factual top probability 0.5 is not below alpha = 0.3: the factual log-probabilities
    assert torch.allclose(m3id_scores(HALF, SWAP, t=5, lamb=0.02, alpha=0.3, epsilon=0.1), HALF)
    # the cut: a token under epsilon times the top probability is -inf where the contrast applies
    far = torch.tensor([0.9, 0.09, 0.01]).log()
    z = m3id_scores(far, SWAP, t=1, lamb=math.log(2), alpha=1.0, epsilon=0.1)
    assert z[2] == -math.inf and torch.isfinite(z[:2]).all()
    cfg = CausalMMConfig(method="m3id")
    assert cfg.params == {"lamb": 0.02, "alpha": 0.3} and cfg.epsilon == 0.1
    # the engine's step counts from 0, the rule's t from 1
    low = torch.tensor([0.25, 0.25, 0.25, 0.25]).log()
    got = get_method("m3id").combine(low, {"text": SWAP.new_tensor([0.4, 0.2, 0.2, 0.2]).log()}, cfg, 0)
    want = m3id_scores(low, torch.tensor([0.4, 0.2, 0.2, 0.2]).log(), t=1, lamb=0.02, alpha=0.3, epsilon=0.1)
    assert torch.equal(got, want) and not torch.equal(got, low)


def test_pai_rule_on_log_probabilities():
    assert torch.allclose(pai_scores(HALF, SWAP, gamma=2.0, epsilon=0.1), 2 * HALF - SWAP)
    z = pai_scores(HALF * 3, SWAP - 7, gamma=1.1, epsilon=0.1)  # log-softmax removes the scale and the shift
    s, u = torch.log_softmax(HALF * 3, -1), torch.log_softmax(SWAP - 7, -1)
    keep = (HALF * 3) >= (HALF * 3).max() + math.log(0.1)
    assert torch.allclose(z[keep], (1.1 * s - 0.1 * u)[keep]) and (z[~keep] == -math.inf).all()
    cfg = CausalMMConfig(method="pai")
    assert (cfg.gamma, cfg.epsilon) == (1.1, 0.1)
    assert cfg.params == {"alpha": 0.2, "start_layer": 2, "edit_prefill": False}


def test_pai_boost_edits_the_last_querys_image_scores_before_the_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, q, k, d = 3, 2, 3, 5, 4
    query, key, value = (torch.randn(b, h, n, d, generator=g) for n in (q, k, k))
    module = torch.nn.Module()
    module.is_causal = True
    image = {0: torch.tensor([False, True, True, False]), 2: torch.tensor([True, False, False, True])}
    boost = Boost(0.5, frozenset({0}), image)
    assert boost.rows(0, b) == [0, 2] and boost.rows(1, b) == [] and boost.rows(0, 2) == [0]

    def base(module, query, key, value, mask, scaling=None, dropout=0.0, **kw):
        seen.append(query.shape[0])
        return torch.full((query.shape[0], q, h, d), 7.0), torch.full((query.shape[0], h, q, k), 9.0)

    seen = []
    out, weights = edited_attention(module, boost, [0, 2], base, query, key, value, None, None, 0.0, {})
    assert seen == [1] and (out[1] == 7.0).all() and (weights[1] == 9.0).all()  # the other row: the base's alone
    causal = torch.ones(q, k).tril(k - q).bool()
    for r in (0, 2):
        scores = query[r] @ key[r].transpose(-1, -2) * d**-0.5
        cols = torch.cat([image[r], torch.tensor([False])])  # a key past the prompt's layout is no image key
        scores[:, -1, cols] += 0.5 * scores[:, -1, cols].abs()  # only the last query, only the image keys
        probs = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)
        assert torch.allclose(out[r], (probs @ value[r]).transpose(0, 1), atol=1e-6)
        assert torch.allclose(weights[r], probs, atol=1e-6)
    # every row boosted: the base is not called
    alone, _ = edited_attention(module, boost, [0], base, query[:1], key[:1], value[:1], None, None, 0.0, {})
    assert seen == [1] and torch.equal(alone, out[:1])


def test_own_parameters_are_checked():
    with pytest.raises(ConfigError, match="alpha=1.5: must be in"):
        CausalMMConfig(method="m3id", params={"alpha": 1.5})
    with pytest.raises(ConfigError, match="'pai' has no parameter lamb; its parameters: alpha, start_layer"):
        CausalMMConfig(method="pai", params={"lamb": 0.1})
    assert CausalMMConfig(method="pai", params={"edit_prefill": "true"}).param("edit_prefill") is True
    assert instruction("4") == PREFIXES[3] and instruction(" my own words ") == "my own words"


# -- branch inputs -----------------------------------------------------------------------------------------------
def test_icd_branch_reads_the_instruction_as_its_system_prompt(loaded):
    cm = loaded("llava")
    eng = cm.with_config(CausalMMConfig(method="icd")).engine
    tok = cm.processor.tokenizer
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 30, 30))
    variant = eng.needs.encode_variants([img], [Q])["instruction"][0]
    factual = cm.adapter.encode(img, Q)
    text = tok.decode(variant["input_ids"][0])
    assert PREFIXES[3] in text and Q in text and PREFIXES[3] not in tok.decode(factual["input_ids"][0])
    image_id = cm.model.config.image_token_id
    assert int((variant["input_ids"] == image_id).sum()) == int((factual["input_ids"] == image_id).sum()) > 0
    assert torch.equal(variant["pixel_values"], factual["pixel_values"])  # the same image


def test_text_only_branch_is_the_prompt_without_its_image(loaded):
    cm = loaded("llava")
    tok = cm.processor.tokenizer
    enc = cm.adapter.encode_text(Q)
    assert "pixel_values" not in enc and not bool((enc["input_ids"] == cm.model.config.image_token_id).any())
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=False) == tok.decode(
        tok(cm.adapter.format_prompt(Q, image=False))["input_ids"], skip_special_tokens=False
    )
    assert Q in tok.decode(enc["input_ids"][0])


def test_branch_methods_need_the_prompt_text(loaded, images):
    cm = loaded("llava").with_config(CausalMMConfig(method="m3id"))
    enc = cm.adapter.encode(images[0], Q)
    with pytest.raises(ConfigError, match="give the text"):
        cm.engine.generate_encoded([enc])


# -- every family -------------------------------------------------------------------------------------------------
BRANCH = {
    "icd": "instruction", "m3id": "text", "pai": "text", "avisc": "blind", "sid": "sid", "ritual": "transformed",
}  # fmt: skip
#: each baseline's neutral setting, which must give regular decoding token for token
NEUTRAL = {
    "icd": {"gamma": 0.0},
    "m3id": {"params": {"lamb": 0.0}},
    "pai": {"gamma": 1.0, "params": {"alpha": 0.0}},
    "avisc": {"gamma": 0.0},
    "sid": {"gamma": 0.0},
    "ritual": {"params": {"alpha": 0.0}},
    "vista": {"params": {"lam": 0.0, "mix": 0.0}},
    "vaf": {"params": {"enhance": 1.0, "suppress": 1.0}},
    "memvr": {"params": {"ratio": 0.0}},
    "only": {"params": {"alpha_pos": 0.0, "alpha_neg": 0.0}},
    "dola": {"gamma": 0.0},
    "deco": {"params": {"alpha": 0.0}},
}
#: settings that make the tiny 4-layer models show each method's effect
TINY = {
    "pai": {"params": {"start_layer": 0}},
    "sid": {"params": {"keep": 2}},
    "vista": {"params": {"lam": 0.5, "logits_layers": "1-2"}},
    "vaf": {"params": {"layers": "1-2"}},
    "memvr": {"params": {"start": 0, "end": 3, "threshold": 0.0}},
    "dola": {"params": {"layers": "0-3"}},
}
#: what a family lacks for a method, and the message that says so
REFUSED = {
    ("icd", "paligemma"): "no chat template, so no place for a system instruction",
    # the tiny Gemma 3's window (8) is shorter than any prompt; Mistral 3's (4096) is never reached, so it runs
    ("pai", "gemma3"): "sliding-window layers keep only the last 7 tokens, while this run needs",
    ("sid", "gemma3"): "sliding-window layers keep only the last 7 tokens, while this run needs",
    ("vaf", "gemma3"): "sliding-window layers keep only the last 7 tokens, while this run needs",
    ("only", "gemma3"): "ONLY's last-layer step needs a LLaMA-style decoder layer",
}
CASES = [(f, m) for f in ALL_FAMILIES for m in NEUTRAL if (m, f) not in REFUSED]


def _exit_logits(cm, enc, index, norm):
    """The stock model's early-exit logits at ``hidden_states[index]``, last position."""
    with torch.no_grad():
        out = cm.model(**{k: v for k, v in enc.items() if k != "labels"}, output_hidden_states=True)
        h = out.hidden_states[index][0, -1]
        return cm.model.get_output_embeddings()(cm.adapter.lm.norm(h) if norm else h).float()


@pytest.mark.parametrize(("method", "family"), [(m, f) for (m, f) in REFUSED])
def test_what_a_family_lacks_is_said(method, family, any_family, images):
    with pytest.raises((ConfigError, UnsupportedModelError), match=REFUSED[(method, family)]):
        any_family(family).with_config(CausalMMConfig(method=method, **TINY.get(method, {}))).generate(
            images[0], Q, max_new_tokens=2
        )


@pytest.mark.parametrize(("family", "method"), CASES)
def test_baselines_on_every_family(family, method, any_family, images):
    """Per family and method: the engine applies the rule to what it computed, the branch's (or early layer's)
    first logits are the stock model's on the branch's own prompt, greedy and sampling run and are seeded, and the
    neutral setting is regular decoding token for token."""
    cm = any_family(family)
    prompts, imgs = [Q, "Describe the image."], [images[0], images[1]]
    cfg = CausalMMConfig(method=method, seed=3, **TINY.get(method, {}))
    res = cm.with_config(cfg).generate(imgs, prompts, max_new_tokens=4, return_branch_logits=True)
    rule = get_method(method)
    for r in res:
        logs = r.branch_logits
        for t in range(len(r.token_ids)):
            if method in BRANCH:
                want = rule.combine(logs["factual"][t], {BRANCH[method]: logs[BRANCH[method]][t]}, cfg, t)
            else:
                exits = {int(k[4:]): v[t] for k, v in logs.items() if k.startswith("exit")}
                exits.update({k: v[t] for k, v in logs.items() if k == "side"})  # ONLY's side logits
                want = rule.combine(logs["factual"][t], {}, cfg, t, **({"exits": exits} if exits else {}))
            assert torch.allclose(logs["combined"][t], want, atol=1e-5), t
        assert r.token_ids == logs["combined"].argmax(-1).tolist()
    first = res[0].branch_logits
    if method in ("icd", "m3id", "pai"):  # the branch's first logits are the stock model's on the branch's prompt
        if BRANCH[method] == "text":
            enc = cm.adapter.encode_text(prompts[0], imgs[0])
        else:
            enc = cm.adapter.encode(imgs[0], prompts[0], system=PREFIXES[3])
        assert torch.allclose(first[BRANCH[method]][0], _step_logits(cm, enc), atol=1e-4)
    elif method in ("dola", "deco"):  # the early layers' logits are the stock model's hidden states through the head
        enc = cm.adapter.encode(imgs[0], prompts[0])
        index = max(int(k[4:]) for k in first if k.startswith("exit"))
        want = _exit_logits(cm, enc, index, norm=rule.exit_norm)
        assert torch.allclose(first[f"exit{index}"][0], want, atol=1e-4)
    sampled = [cm.with_config(cfg).generate(imgs, prompts, max_new_tokens=4, do_sample=True, top_k=20)
               for _ in range(2)]  # fmt: skip
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]
    regular = [r.token_ids for r in cm.generate(imgs, prompts, max_new_tokens=4)]
    off = CausalMMConfig(method=method, **NEUTRAL[method])
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, max_new_tokens=4)] == regular
    # beam search reads the whole distribution: the neutral setting (no contrast, no cut) is regular beams too
    beams = {"max_new_tokens": 4, "num_beams": 3}
    regular_beams = [r.token_ids for r in cm.generate(imgs, prompts, **beams)]
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, **beams)] == regular_beams


def test_dola_candidates_divergence_and_rule():
    from causalmm.methods.dola import candidate_layers, dola_scores, jensen_shannon

    assert candidate_layers("low", 32, tied=False) == (0, 2, 4, 6, 8, 10, 12, 14)
    assert candidate_layers("high", 32, tied=False) == tuple(range(16, 32, 2))
    assert candidate_layers("low", 32, tied=True)[0] == 2  # an exit from tied embeddings is the identity
    assert candidate_layers("low", 48, tied=False) == tuple(range(0, 20, 2))
    assert candidate_layers("high", 48, tied=False) == tuple(range(28, 48, 2))
    assert candidate_layers("1,3", 4, tied=False) == (1, 3)
    f, p = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]])
    m = 0.5 * (f + p[0])
    kl = lambda a, b: (a * (a / b).log()).mean()  # noqa: E731 - KL(a || b), averaged over the vocabulary
    js = jensen_shannon(f.log(), p.log())
    assert torch.allclose(js[0], 0.5 * (kl(m, f) + kl(m, p[0]))) and js[1].abs() < 1e-7
    cfg = CausalMMConfig(method="dola")
    z = get_method("dola").combine(f.log(), {}, cfg, 0, exits={4: p[1].log(), 2: p[0].log()})
    assert torch.allclose(z, f.log() - p[0].log())  # the divergent layer, not the identical one
    far = torch.tensor([0.9, 0.095, 0.005]).log()
    assert dola_scores(far, p[0].log(), epsilon=0.1)[2] == -math.inf


def test_deco_candidates_anchor_and_mix():
    from causalmm.methods.deco import deco_layers, deco_scores

    assert deco_layers("auto", 32) == tuple(range(20, 29)) and deco_layers("auto", 40) == tuple(range(25, 36))
    final = torch.tensor([2.0, 1.0, 0.0, -5.0])
    early = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # probabilities 0.67, 0.24, 0.09: the cumulative mass reaches 0.9 at the 2nd token, so tokens 0 and 1
    z, anchor = deco_scores(final, early, alpha=0.6, top_k=2, top_p=0.9)
    held = torch.softmax(early[0], -1)[1]  # layer 0 gives token 1 the largest candidate probability
    assert anchor == 0
    assert torch.allclose(z[:2], final[:2] + 0.6 * held * early[0, :2]) and (z[2:] == -math.inf).all()
    # top_p 0.5: the top token alone is a candidate
    z, _ = deco_scores(final, early, alpha=0.6, top_k=20, top_p=0.5)
    assert torch.isfinite(z).sum() == 1 and z.argmax() == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_pai_edits_the_factual_run_from_the_first_decode_step(family, any_family, images):
    """With the official switch (``edit_prefill=False``) the first token's factual logits are the model's own,
    later ones are edited; ``edit_prefill=True`` edits the first as well. The text-only branch is never edited."""
    cm = any_family(family)
    plain = cm.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True).branch_logits
    cfg = CausalMMConfig(method="pai", gamma=1.0, params={"alpha": 2.0, "start_layer": 0})
    res = cm.with_config(cfg).generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    logs = res.branch_logits
    assert torch.allclose(logs["factual"][0], plain["factual"][0], atol=1e-5)  # batched with its text row
    assert (logs["factual"][1:] - plain["factual"][1:]).abs().max() > 1e-3
    assert torch.allclose(logs["text"][0], _step_logits(cm, cm.adapter.encode_text(Q, images[0])), atol=1e-4)
    first = CausalMMConfig(method="pai", gamma=1.0, params={"alpha": 2.0, "start_layer": 0, "edit_prefill": True})
    edited = cm.with_config(first).generate(images[0], Q, max_new_tokens=1, return_branch_logits=True)
    assert (edited.branch_logits["factual"][0] - plain["factual"][0]).abs().max() > 1e-3
    assert torch.allclose(edited.branch_logits["text"][0], logs["text"][0], atol=1e-5)
    with pytest.raises(ConfigError, match="start_layer=99 is out of range"):
        cm.with_config(CausalMMConfig(method="pai", params={"start_layer": 99}))


def test_pai_boost_is_the_only_edit_in_a_decode_step(loaded, images):
    """The boost reaches the LLM's attention through the registered hook: a forward with an empty boost is the
    stock forward, bit for bit."""
    cm = loaded("llava")
    enc = cm.adapter.encode(images[0], Q)
    stock = _step_logits(cm, enc)
    with intervene(Intervention(scores=Boost(0.5, frozenset(range(cm.adapter.n_language_layers)), {}))):
        same = _step_logits(cm, enc)
    assert torch.equal(stock, same)
    keys = (enc["input_ids"][0] == cm.model.config.image_token_id)
    with intervene(Intervention(scores=Boost(0.5, frozenset(range(cm.adapter.n_language_layers)), {0: keys}))):
        moved = _step_logits(cm, enc)
    assert (moved - stock).abs().max() > 1e-4
    assert isinstance(cm.adapter.lm_attn[0]._causalmm_site, Site)


def test_cli_takes_a_methods_own_parameters(model_dirs, image_file, causalmm_cli):
    import json

    out = causalmm_cli(
        "generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q, "--method", "pai",
        "--param", "alpha=0.5", "--param", "start_layer=1", "--max-new-tokens", "2", "--json",
    )  # fmt: skip
    cfg = json.loads(out.stdout)["config"]
    assert cfg["gamma"] == 1.1 and cfg["params"] == {"alpha": 0.5, "start_layer": 1, "edit_prefill": False}
    bad = causalmm_cli(
        "generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q, "--method", "pai",
        "--param", "lamb=1", check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "no parameter lamb" in bad.stderr and "Traceback" not in bad.stderr
    bad = causalmm_cli(
        "generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q, "--param", "alpha",
        check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "give NAME=VALUE" in bad.stderr


def test_avisc_zeroes_the_tokens_below_mean_plus_lamb_std_of_the_top_layers():
    from causalmm.methods.avisc import zeroed_tokens

    a = {
        0: torch.tensor([0.1, 0.1, 0.1, 0.7]),  # 1.0 of the 1.45 on the image: 69%
        1: torch.tensor([0.05, 0.05, 0.2, 0.05]),  # 0.35: 24%
        2: torch.tensor([0.1, 0.0, 0.0, 0.0]),  # 7%
    }
    # layer_gamma 0.5: the first layer alone (0.69 is not below 0.5); token 3 is above mean + std
    assert zeroed_tokens(a, layer_gamma=0.5, lamb=1.0).tolist() == [True, True, True, False]
    # layer_gamma 0.9: layers 0 and 1 averaged: [0.075, 0.075, 0.15, 0.375]; mean 0.169, std 0.142
    both = torch.stack([a[0], a[1]]).mean(0)
    want = both < both.mean() + 0.5 * both.std()
    assert torch.equal(zeroed_tokens(a, layer_gamma=0.9, lamb=0.5), want) and want.tolist() == [True, True, True, False]
    assert zeroed_tokens(a, layer_gamma=0.5, lamb=0.0).sum() == 3  # mean alone still keeps token 3
    cfg = CausalMMConfig(method="avisc")
    assert (cfg.gamma, cfg.epsilon, cfg.params) == (1.0, 0.1, {"layer_gamma": 0.5, "lamb": 1.0})


def test_avisc_branch_sees_its_image_with_the_chosen_tokens_zeroed(loaded, images):
    """The probe prefill's attention gives the zeroed set by the rule, and the branch's first logits are the model's
    on the image features with exactly those tokens zeroed."""
    from causalmm.sites.edits import Watch

    cm = loaded("llava")
    cfg = CausalMMConfig(method="avisc", params={"layer_gamma": 1.0, "lamb": 0.5})
    eng = cm.with_config(cfg).engine
    enc = cm.adapter.encode(images[0], Q)
    watch = Watch([0])
    with intervene(Intervention(watch=watch)):
        _step_logits(cm, enc)
    image = enc["input_ids"][0] == cm.model.config.image_token_id
    zero = get_method("avisc").blind_tokens({k: v[0][image] for k, v in watch.seen.items()}, cfg)
    assert 0 < int(zero.sum()) < int(image.sum())
    res = eng.generate([images[0]], [Q], return_branch_logits=True, options=None)[0]
    feats = cm.adapter.image_features(cm.adapter.collate_images([cm.adapter.image_inputs(enc)]))
    zeroed = [f.masked_fill(zero[:, None], 0.0) for f in feats]
    with torch.no_grad():
        want = cm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        **cm.adapter.features_input(zeroed)).logits[0, -1].float()  # fmt: skip
    assert torch.allclose(res.branch_logits["blind"][0], want, atol=1e-4)


def test_sid_hides_all_image_keys_but_the_least_attended_from_its_layer_on(loaded, images):
    from causalmm.interventions import least_attended
    from causalmm.sites.edits import Prune, Watch

    cm = loaded("llava")
    enc = cm.adapter.encode(images[0], Q)
    image = enc["input_ids"][0] == cm.model.config.image_token_id
    watch, prune = Watch([0]), Prune(select=1, keep=3, keys={0: image})
    with intervene(Intervention(watch=watch, prune=prune)):
        pruned = _step_logits(cm, enc)
    kept = least_attended(watch.seen[1][0], image, 3)
    assert torch.equal(prune.hidden[0], image & ~kept) and int(kept.sum()) == 3
    # the same as hiding those keys by hand from layer 2 on: a mask the stock layers read
    stock = _step_logits(cm, enc)
    assert (pruned - stock).abs().max() > 1e-4
    everything = Prune(select=1, keep=int(image.sum()), keys={0: image})
    with intervene(Intervention(prune=everything)):
        assert torch.allclose(_step_logits(cm, enc), stock, atol=1e-5)  # nothing hidden: the stock logits
    cfg = CausalMMConfig(method="sid")
    assert (cfg.gamma, cfg.epsilon, cfg.params) == (0.5, 0.1, {"layer": 2, "keep": 100})
    assert get_method("sid").prune_at(cfg) == (1, 100)
    with pytest.raises(ConfigError, match="layer=9 is out of range"):
        cm.with_config(CausalMMConfig(method="sid", params={"layer": 9}))
