"""Beam search in the engine: ``transformers``' search token for token at the neutral setting on every family,
every method beaming with its branches, the beam bookkeeping on a hand-built example, and in-place reordering."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from causalmm import CausalMMConfig, GenerationOptions
from causalmm.config import ConfigError
from causalmm.decoding import Engine
from causalmm.decoding.beams import BeamState, reorder_cache_rows
from causalmm.decoding.cache import growing_cache
from causalmm.methods import method_names
from causalmm.tiny import ALL_FAMILIES, FAMILIES

# PaliGemma's processor builds its (unused) labels in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Q = ["Describe the image in detail.", "Is there a cat in the image? Answer yes or no."]
SEARCHES = [
    {"num_beams": 3},
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True, "no_repeat_ngram_size": 2},
    {"num_beams": 2, "length_penalty": -1.0, "early_stopping": "never"},
]


@pytest.fixture(scope="module")
def reference(model_dirs, generic_dirs):
    """The stock ``transformers`` model of a family (eager attention), loaded once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = model_dirs[family] if family in FAMILIES else generic_dirs[family]
            cache[family] = AutoModelForImageTextToText.from_pretrained(str(path), attn_implementation="eager").eval()
        return cache[family]

    return get


def _engine(cm, cfg: CausalMMConfig, eos: list[int]) -> Engine:
    """An engine whose answers stop at ``eos`` (tokens the tiny model does emit, so hypotheses finish early)."""
    eng = Engine(cm.adapter, cfg)
    eng.eos = set(eos)
    return eng


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_neutral_beams_equal_transformers_beam_search(family, any_family, reference, images):
    cm = any_family(family)
    first = _engine(cm, CausalMMConfig(method="regular"), []).generate(
        images[:2], Q, GenerationOptions(max_new_tokens=8, num_beams=3)
    )
    eos = sorted({r.token_ids[2] for r in first})  # tokens that end some hypotheses mid-answer
    neutral = [
        CausalMMConfig(method="regular"),
        CausalMMConfig(mode="multimodal", gamma=0.0, language_layers="all"),
        CausalMMConfig(method="vcd", gamma=0.0),
    ]
    ref = reference(family)
    for search in SEARCHES:
        expected = []
        for image, q in zip(images[:2], Q, strict=True):
            enc = cm.adapter.encode(image, q)
            stock = {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos[0]}
            out = ref.generate(**enc, max_new_tokens=8, **stock, **search)
            expected.append(out[0, enc["input_ids"].shape[1] :].tolist())
        for cfg in neutral if search is SEARCHES[0] else neutral[:2]:
            got = _engine(cm, cfg, eos).generate(images[:2], Q, GenerationOptions(max_new_tokens=8, **search))
            assert [r.token_ids for r in got] == expected, (cfg.method, cfg.mode, search)
            for r in got:
                assert r.finish_reason == ("eos" if r.token_ids[-1] in eos else "length")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_shared_prefix_and_layers_keep_beam_parity(family, loaded, reference, images):
    """Two questions about one image: the image prefix is prefilled once and the language rows share the lower
    layers, and the neutral beams are still the stock model's."""
    cm = loaded(family)
    eng = _engine(cm, CausalMMConfig(mode="language", gamma=0.0, language_layers="1"), [])
    opts = GenerationOptions(max_new_tokens=8, num_beams=3)
    got = eng.generate([images[0], images[0]], Q, opts)
    assert eng.prefill_stats["groups"] >= 1 and eng.share_low == 1
    for r, q in zip(got, Q, strict=True):
        enc = cm.adapter.encode(images[0], q)
        out = reference(family).generate(**enc, max_new_tokens=8, do_sample=False, num_beams=3)
        assert r.token_ids == out[0, enc["input_ids"].shape[1] :].tolist()


#: settings under which each method's rule moves the tiny models' beams (M3ID's default weight is ~0.02 at first)
STRONG = {
    "causalmm": {"mode": "multimodal"},
    "m3id": {"params": {"lamb": 1.0, "alpha": 1.0}},
    "pai": {"params": {"start_layer": 0}},
    "sid": {"gamma": 1.0, "params": {"keep": 2}},
    "dola": {"params": {"layers": "0-3"}},
    "deco": {"params": {"alpha": 3.0}},
    "vista": {"params": {"lam": 1.0, "mix": 0.5, "logits_layers": "1-2"}},
    "vaf": {"params": {"enhance": 3.0, "suppress": 0.2, "layers": "0-3"}},
    "memvr": {"params": {"ratio": 0.9, "threshold": 0.0, "start": 0, "end": 3}},
}


def _methods():
    return [m for m in method_names() if m != "regular"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_method_beams_with_its_branches(family, loaded, images, vti_vectors, tiny_matcher):
    """Each method decodes with beams; its answers differ from regular beams somewhere (the rule acts), and a
    prompt's answer does not depend on the others in its batch."""
    cm = loaded(family)
    opts = {"max_new_tokens": 6, "num_beams": 3}
    regular = [r.token_ids for r in cm.generate(images[:2], Q, **opts)]
    vti = {"vectors": vti_vectors(family), "alpha_text": 5.0, "alpha_image": 0.0 if cm.adapter.packed else 5.0}
    files = {"vti": {"params": vti}, "agla": {"params": {"matcher": tiny_matcher, "alpha": 3.0}}}
    for name in _methods():
        cfg = CausalMMConfig(method=name, **files.get(name, STRONG.get(name, {})))
        m = cm.with_config(cfg)
        both = m.generate(images[:2], Q, seeds=[1, 2], **opts)
        alone = m.generate([images[1]], [Q[1]], seeds=[2], **opts)
        assert both[1].token_ids == alone[0].token_ids, name
        assert [r.token_ids for r in both] != regular, name
        assert all(len(r.token_ids) == 6 or r.finish_reason == "eos" for r in both)


def test_beam_state_follows_the_hand_computed_search():
    """Two beams over a 4-token vocabulary (token 3 ends a hypothesis), length penalty 1."""
    st = BeamState(num_beams=2, n_eos=1, max_new_tokens=5)

    def stops(seq, last):
        return "eos" if last == 3 else None

    lp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # step 1: only beam 0 counts; candidates 0 (log .5), 1 (log .3); nothing stops among the top two
    parents = st.step(torch.stack([lp, lp]), stops)
    assert parents.tolist() == [0, 0] and st.running == [[0], [1]]
    assert torch.allclose(st.scores, torch.tensor([0.5, 0.3]).log())
    # step 2: beam 0 puts its mass on the end token, beam 1 on token 2
    lp0 = torch.tensor([0.1, 0.1, 0.1, 0.7]).log()
    lp1 = torch.tensor([0.05, 0.05, 0.85, 0.05]).log()
    parents = st.step(torch.stack([lp0, lp1]), stops)
    # best continuations: [0,3] (.35, ends), [1,2] (.255), [0,0] (.05), [0,1] (.05): the ended one is finished
    # with score log(.35) / 2, the two best that go on become the beams
    assert st.finished[0] == [0, 3] and st.finished_how[0] == "eos"
    assert torch.isclose(st.finished_scores[0], torch.tensor(0.35).log() / 2)
    assert st.running[0] == [1, 2] and parents.tolist()[0] == 1
    assert not st.done  # a live beam (log .255 / 2 > worst finished -1e9) may still win
    # step 3: every continuation is far below the finished one's score: the search stops
    low = torch.full((4,), 1e-4).log()
    st.step(torch.stack([low, low]), stops)
    st.step(torch.stack([low, low]), stops)
    assert st.best() == ([0, 3], "eos")


def test_reorder_moves_rows_in_place_like_index_select():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=8)
    keys = [torch.randn(4, 2, 5, 4) for _ in range(2)]
    cache = growing_cache(cfg, 8, [(k, k + 1) for k in keys])
    buffers = [layer._buffers[0].data_ptr() for layer in cache.layers]
    src = torch.tensor([1, 1, 3, 0])
    reorder_cache_rows(cache, 1, src, torch.tensor([0, 0, 2, 2]))
    assert torch.equal(cache.layers[1].keys, keys[1][src]) and torch.equal(cache.layers[1].values, keys[1][src] + 1)
    assert torch.equal(cache.layers[0].keys, keys[0][[0, 0, 2, 2]])
    assert [layer._buffers[0].data_ptr() for layer in cache.layers] == buffers  # no new buffer


@pytest.mark.parametrize(
    ("options", "config", "match"),
    [
        ({"num_beams": 3, "do_sample": True}, {}, "deterministic"),
        ({"num_beams": 0}, {}, "num_beams"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, {}, "early_stopping"),
        ({"no_repeat_ngram_size": -1}, {}, "no_repeat_ngram_size"),
        ({"num_beams": 2}, {"legacy": True}, "legacy"),
    ],
)
def test_bad_beam_settings_are_refused(options, config, match, loaded, images):
    cm = loaded("llava")
    with pytest.raises(ConfigError, match=match):
        cm.with_config(CausalMMConfig(**config)).generate(images[0], Q[0], max_new_tokens=2, **options)


def test_branch_logits_ask_for_one_sequence(loaded, images):
    with pytest.raises(ConfigError, match="num_beams=1"):
        loaded("llava").generate(images[0], Q[0], max_new_tokens=2, num_beams=2, return_branch_logits=True)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_no_repeat_ngram_greedy_equals_transformers(family, any_family, reference, images):
    cm = any_family(family)
    got = cm.generate(images[0], Q[0], max_new_tokens=10, no_repeat_ngram_size=1)
    enc = cm.adapter.encode(images[0], Q[0])
    out = reference(family).generate(**enc, max_new_tokens=10, do_sample=False, no_repeat_ngram_size=1)
    assert got.token_ids == out[0, enc["input_ids"].shape[1] :].tolist()
    assert len(set(got.token_ids)) == len(got.token_ids)
