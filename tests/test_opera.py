"""OPERA: the over-trust penalty and the rollback rule on hand-built patterns, the candidates' attention and the
rollback's re-encoding against the stock model, and the search end to end on every family that can run it."""

import math

import pytest
import torch

from causalmm import CausalMMConfig
from causalmm.config import ConfigError
from causalmm.decoding.forward import cache_kwargs
from causalmm.decoding.opera import candidate_attention
from causalmm.methods import get_method
from causalmm.methods.opera import opera_penalty, over_trust, rollback_position
from causalmm.tiny import ALL_FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Q = ["Describe the image in detail.", "Is there a cat in the image? Answer yes or no."]
#: OPERA finds the image keys by their column in the cache, which a sliding window drops once the context outgrows
#: it: the tiny Gemma 3's window (8) is shorter than any prompt (Mistral 3's, 4096, is never reached: it runs)
SLIDING = {"gemma3"}
#: a setting that rolls back within a few dozen tokens of a tiny random model
EAGER_ROLLBACK = {"threshold": 1, "candidates": 2}


def test_defaults_are_the_official_ones():
    cfg = CausalMMConfig(method="opera")
    assert [cfg.param(k) for k in ("beams", "scale", "threshold", "candidates", "penalty")] == [5, 50.0, 15, 5, 1.0]
    assert "shikiw/OPERA" in get_method("opera").reference
    with pytest.raises(ConfigError, match="beams=1"):
        CausalMMConfig(method="opera", params={"beams": 1})


def test_over_trust_is_the_column_product_below_the_diagonal():
    # a three-token answer whose later tokens keep looking at the first one
    w = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.7, 0.1, 0.2]])
    got = over_trust(w, 50.0)
    want = [1e-7 * 50 * 40 * 35, 1e-7 * 10 * 5, 1e-7 * 10]
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), torch.tensor(want), rtol=2e-2)  # float16 (subnormal below 6e-5)
    # float16, as the official code keeps the scores: a long enough stare saturates to inf (the candidate is out)
    stare = torch.ones(12, 12).tril() * 0.9
    assert math.isinf(float(over_trust(stare, 50.0)[0]))


def test_penalty_reads_the_image_first_then_the_over_trust():
    n = 12
    stare = torch.eye(n) * 0.5
    stare[:, 3] = 0.5  # every later token attends to answer token 3
    stare = stare.tril()
    window = torch.stack([stare, torch.eye(n)])  # candidate 0 stares, candidate 1 does not
    penalty, peak = opera_penalty(window, torch.tensor([0.2, 0.6]), 50.0)
    assert peak[0] == 3
    assert penalty[0] > penalty[1]  # the staring candidate is penalised more
    assert torch.allclose(penalty[1], torch.tensor(1e-7 * 50.0), rtol=1e-3)  # a single diagonal factor at most
    short = window[:, :10, :10]  # at 10 tokens or fewer: minus the attention on the image
    penalty, _ = opera_penalty(short, torch.tensor([0.2, 0.6]), 50.0)
    assert torch.equal(penalty, torch.tensor([-0.2, -0.6]))


def test_rollback_rule_counts_retries_and_shifts():
    used: dict[int, int] = {}
    beams = [[11] * 16, [11] * 17]
    assert rollback_position(beams, 11, 15, used, 2, 30) == 12
    assert rollback_position(beams, 11, 15, used, 2, 30) == 12
    assert rollback_position(beams, 11, 15, used, 2, 30) == 11  # position 12 tried twice (2 candidates): one back
    assert rollback_position(beams, 11, 15, used, 2, 30) == 11
    assert rollback_position(beams, 11, 15, used, 2, 30) is None  # both spent
    assert rollback_position([[9] * 20, [9] * 20], 9, 15, {}, 5, 30) is None  # no rollback before token 10
    assert rollback_position([[12] * 20, [12] * 15], 12, 15, {}, 5, 30) is None  # a beam at 15, not more


def _stock_inputs(enc, extra: list[int]) -> dict:
    """The stock model's inputs for prompt + answer tokens ``extra`` (answer tokens are text: causal suffix)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([extra])], 1)
    e = {k: v for k, v in enc.items() if k != "labels"}
    e["input_ids"], e["attention_mask"] = ids, torch.ones_like(ids)
    for key, fill in (("token_type_ids", 1), ("mm_token_type_ids", 0)):
        if key in e:
            e[key] = torch.cat([e[key], torch.full((1, len(extra)), fill, dtype=torch.long)], 1)
    return e


def _stock_attention(cm, enc, extra: list[int]) -> torch.Tensor:
    """The stock model's last-layer attention of the last token of prompt + ``extra``, max over heads,
    renormalised."""
    with torch.no_grad():
        out = cm.model(**_stock_inputs(enc, extra), output_attentions=True)
    a = out.attentions[-1][0, :, -1].float().amax(0)
    return a / a.sum()


def _stock_logits(cm, enc, extra: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return cm.model(**_stock_inputs(enc, extra)).logits[0, -1].float()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_candidate_block_attention_equals_feeding_each_alone(family, loaded, images):
    from transformers import DynamicCache

    cm = loaded(family)
    eng = cm.with_config(CausalMMConfig(method="opera")).engine
    enc = cm.adapter.encode(images[0], Q[0])
    meta = {k: v for k, v in cm.adapter.image_inputs(enc).items() if k != "pixel_values"}
    positions = cm.adapter.prefill_positions(enc, meta)
    cache = DynamicCache(config=cm.model.config.get_text_config())
    with torch.no_grad():
        inputs = {k: v for k, v in enc.items() if k != "labels"}
        out = cm.model(**inputs, position_ids=positions, use_cache=True, **cache_kwargs(cm.model, cache))
        length = cache.get_seq_length()
        cand = out.logits[:, -1].topk(3).indices  # tokens the model would propose (no image placeholder)
        got = candidate_attention(eng.forward, cand, enc["attention_mask"], positions[..., -1:], cache)
    assert cache.get_seq_length() == length  # the block left the cache
    for c, token in enumerate(cand[0].tolist()):
        want = _stock_attention(cm, enc, [token])
        seen = torch.cat([got[0, c, :length], got[0, c, length + c : length + c + 1]])
        assert torch.allclose(seen, want, atol=1e-5), c
        others = [length + d for d in range(3) if d != c]
        assert got[0, c, others].abs().max() == 0  # no candidate sees another


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in SLIDING])
def test_opera_end_to_end_with_rollbacks(family, any_family, images):
    """OPERA runs batched on the family; every rollback re-encodes the kept answer so its logits are the stock
    model's on prompt + kept tokens, bans what was chosen there, and a prompt's answer does not depend on its
    batch."""
    cm = any_family(family)
    m = cm.with_config(CausalMMConfig(method="opera", params=EAGER_ROLLBACK))
    both = m.generate(images[:2], Q, max_new_tokens=40)
    stats = m.engine.search_stats
    alone = m.generate([images[1]], [Q[1]], max_new_tokens=40)
    assert alone[0].token_ids == both[1].token_ids
    assert all(len(r.token_ids) == 40 or r.finish_reason == "eos" for r in both)
    for rb in stats["rollbacks"][:2]:
        p = rb["prompt"]
        enc = cm.adapter.encode(images[p], Q[p])
        assert rb["pos"] >= 10 and all(len(t) == rb["pos"] for t in rb["tokens"])
        assert rb["banned"]  # the continuations chosen at that position
        for b, tokens in enumerate(rb["tokens"][:2]):
            assert torch.allclose(rb["logits"][b], _stock_logits(cm, enc, tokens), atol=1e-4), (p, b)


def test_rollbacks_happen_on_the_tiny_models(any_family, images):
    """The end-to-end check above is not vacuous: some family rolls back under the eager setting."""
    rolled = 0
    for family in ("qwen2_vl", "idefics3", "paligemma"):
        m = any_family(family).with_config(CausalMMConfig(method="opera", params=EAGER_ROLLBACK))
        m.generate(images[:2], Q, max_new_tokens=40)
        rolled += len(m.engine.search_stats["rollbacks"])
    assert rolled >= 2


def test_opera_penalty_changes_the_beams(loaded, images):
    cm = loaded("llava")
    regular = [r.token_ids for r in cm.generate(images[:2], Q, max_new_tokens=12, num_beams=5)]
    opera = [r.token_ids for r in cm.with_config(CausalMMConfig(method="opera")).generate(images[:2], Q,
                                                                                       max_new_tokens=12)]  # fmt: skip
    assert opera != regular
    fast = CausalMMConfig(method="opera", params={"threshold": 25, "candidates": 1})
    assert len(cm.with_config(fast).generate(images[0], Q[0], max_new_tokens=12).token_ids) == 12


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_a_run_longer_than_the_sliding_window_is_refused(family, any_family, images):
    with pytest.raises(ConfigError, match=r"keep only the last 7 tokens, while this run needs \d+"):
        any_family(family).with_config(CausalMMConfig(method="opera")).generate(images[0], Q[0], max_new_tokens=2)


@pytest.mark.parametrize("method", ["opera", "pai", "sid"])
def test_the_window_is_checked_at_every_forward(method, any_family, images):
    """What the up-front check cannot bound (OPERA's rollbacks re-encode answer tokens) is caught before the forward
    whose cache would drop a key: here a window, as the forward sees it, that the answer outgrows at its 4th token."""
    m = any_family("mistral3").with_config(CausalMMConfig(method=method, params=EAGER_ROLLBACK if method == "opera"
                                                                              else {}))  # fmt: skip
    enc = m.adapter.encode(images[0], Q[0])
    length = enc["input_ids"].shape[1]
    assert m.engine.needs.window == 4096 and m.engine.forward.window == 4096
    m.generate(images[0], Q[0], max_new_tokens=6)  # inside the window: runs
    m.engine.forward.window = length + 4
    with pytest.raises(ConfigError, match=f"the last {length + 3} tokens, while this run needs {length + 4}"):
        m.generate(images[0], Q[0], max_new_tokens=6)


def test_opera_refuses_sampling_and_branch_logits(loaded, images):
    m = loaded("llava").with_config(CausalMMConfig(method="opera"))
    with pytest.raises(ConfigError, match="deterministic"):
        m.generate(images[0], Q[0], max_new_tokens=2, do_sample=True)
    with pytest.raises(ConfigError, match="per-token rule"):
        m.generate(images[0], Q[0], max_new_tokens=2, return_branch_logits=True)


def test_sdpa_base_takes_the_candidate_mask(loaded, images):
    """The candidates' 4-D mask is additive, which eager and sdpa both read: same answers, same rollbacks."""
    cfg = CausalMMConfig(method="opera", params=EAGER_ROLLBACK)
    got = {}
    for base in ("eager", "sdpa"):
        m = loaded("qwen2_vl", base).with_config(cfg)
        got[base] = ([r.token_ids for r in m.generate(images[:2], Q, max_new_tokens=40)],
                     [(r["prompt"], r["pos"]) for r in m.engine.search_stats["rollbacks"]])  # fmt: skip
    assert got["eager"] == got["sdpa"] and got["eager"][1]


def test_image_key_methods_inside_a_sliding_window_equal_full_attention(generic_dirs, images, tmp_path):
    """Gemma 3 with a window its runs stay below (64): PAI, SID and OPERA find the image keys in its sliding
    layers' cache as in full ones, so they give what the same weights give with every layer full-attention (one
    rope theta for both kinds, so that the layer kind is the only difference)."""
    import json
    import shutil

    from causalmm import CausalMM

    def variant(name: str, layer_types: list[str]) -> CausalMM:
        folder = tmp_path / name
        shutil.copytree(generic_dirs["gemma3"], folder)
        config = json.loads((folder / "config.json").read_text())
        text = config["text_config"]
        theta = {"rope_theta": 10000.0, "rope_type": "default"}
        text.update(sliding_window=64, layer_types=layer_types,
                    rope_parameters={"full_attention": theta, "sliding_attention": dict(theta)})  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config))
        return CausalMM.from_pretrained(str(folder), CausalMMConfig(method="regular"), base="eager")

    kinds = ["sliding_attention", "full_attention"] * 2
    sliding, full = variant("sliding", kinds), variant("full", ["full_attention"] * 4)
    configs = (
        CausalMMConfig(method="pai", params={"start_layer": 0}),
        CausalMMConfig(method="sid", params={"keep": 2}),
        CausalMMConfig(method="opera", params=EAGER_ROLLBACK),
    )
    for cfg in configs:
        a, b = sliding.with_config(cfg), full.with_config(cfg)
        assert a.engine.needs.window == 64 and b.engine.needs.window is None
        kw = {"max_new_tokens": 6, "return_branch_logits": cfg.method != "opera"}  # (OPERA records none)
        got, want = a.generate(images[:2], Q, **kw), b.generate(images[:2], Q, **kw)
        assert [r.token_ids for r in got] == [r.token_ids for r in want], cfg.method
        if cfg.method != "opera":
            for g, w in zip(got, want, strict=True):
                for key in w.branch_logits:
                    assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-4), (cfg.method, key)
        with pytest.raises(ConfigError, match="keep only the last 63 tokens"):
            a.generate(images[:2], Q, max_new_tokens=64)
