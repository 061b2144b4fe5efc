"""The single-pass methods that act beside the attention map (VAF's score scaling, MemVR's FFN memory read): each
rule against the official code's formula on fixed tensors, the sites they act at on a real tiny model, per-row
state that makes an answer independent of its batch, and bad settings refused in one line. Their neutral settings
against regular decoding on every family are in ``test_baselines.py``."""

import math

import pytest
import torch

from causalmm import CausalMMConfig, ConfigError
from causalmm.interventions import memory_read, top_entropy
from causalmm.sites import Intervention, intervene
from causalmm.sites.edits import Scale, edited_attention
from causalmm.sites.mlp import MemoryRead

Q = "Is there a cat in the image? Answer yes or no."


# -- VAF ----------------------------------------------------------------------------------------------------------
def _official_vaf(scores: torch.Tensor, sys_len: int, img_len: int, enh: float, sup: float) -> torch.Tensor:
    """ClearSight's AttnAdapter on scores ``(heads, q, k)`` of one unpadded row: its fixed spans, its two cases."""
    s = scores.clone()
    end = sys_len + img_len
    if s.shape[-2] > end:  # the prefill: the queries after the image
        s[:, end:, sys_len:end] = enh * s[:, end:, sys_len:end]
        s[:, end:, :sys_len] = sup * s[:, end:, :sys_len]
    else:  # a decode step
        s[:, :, sys_len:end] = enh * s[:, :, sys_len:end]
        s[:, :, :sys_len] = sup * s[:, :, :sys_len]
    return s


def test_vaf_scaling_is_the_official_one_on_each_rows_own_spans():
    """Rows with their spans at different places (and left padding) get what the official code gives a row of
    those spans alone, at the prefill (every query) and at a decode step (the last query)."""
    g = torch.Generator().manual_seed(0)
    heads, k = 2, 12
    layouts = [(0, 3, 4), (2, 2, 5), (4, 1, 3)]  # (left padding, system tokens, image tokens)
    keys = {}
    for r, (pad, sys_len, img_len) in enumerate(layouts):
        cols = torch.zeros(k, dtype=torch.bool)
        cols[pad + sys_len : pad + sys_len + img_len] = True
        keys[r] = cols
    scale = Scale(1.5, 0.5, frozenset({3}), keys)
    assert scale.rows(3, 3) == [0, 1, 2] and scale.rows(2, 3) == [] and scale.rows(3, 2) == [0, 1]
    for q in (k, 1):  # the prefill, then one decode query
        scores = torch.randn(3, heads, q, k, generator=g)
        edited = scores.clone()
        scale.apply(edited, [0, 1, 2])
        for r, (pad, sys_len, img_len) in enumerate(layouts):
            real = scores[r][:, -(k - pad) :, pad:] if q == k else scores[r][:, :, pad:]
            want = _official_vaf(real, sys_len, img_len, 1.5, 0.5)
            got = edited[r][:, -(k - pad) :, pad:] if q == k else edited[r][:, :, pad:]
            assert torch.equal(got, want), (r, q)


def test_vaf_edited_rows_are_eager_attention_on_the_scaled_scores():
    g = torch.Generator().manual_seed(1)
    b, h, q, k, d = 2, 2, 6, 6, 4
    query, key, value = (torch.randn(b, h, n, d, generator=g) for n in (q, k, k))
    module = torch.nn.Module()
    module.is_causal = True
    cols = torch.tensor([False, True, True, False, False, False])
    scale = Scale(2.0, 0.25, frozenset({0}), {1: cols})

    def base(module, query, key, value, mask, scaling=None, dropout=0.0, **kw):
        return torch.zeros(query.shape[0], q, h, d), None

    out, _ = edited_attention(module, scale, [1], base, query, key, value, None, None, 0.0, {})
    assert (out[0] == 0).all()  # the row without the edit: the base's alone
    scores = _official_vaf(query[1] @ key[1].transpose(-1, -2) * d**-0.5, 1, 2, 2.0, 0.25)
    probs = torch.softmax(scores.masked_fill(~torch.ones(q, k).tril().bool(), -math.inf), -1)
    assert torch.allclose(out[1], (probs @ value[1]).transpose(0, 1), atol=1e-6)


def test_vaf_on_a_model_edits_its_layers_and_keeps_answers_independent_of_the_batch(loaded, images):
    cm = loaded("llava")
    plain = cm.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True).branch_logits
    cfg = CausalMMConfig(method="vaf", params={"enhance": 3.0, "suppress": 0.2, "layers": "1-2"})
    vaf = cm.with_config(cfg)
    alone = vaf.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    assert (alone.branch_logits["factual"][0] - plain["factual"][0]).abs().max() > 1e-3  # the prefill is edited
    batch = vaf.generate([images[1], images[0]], ["Describe the image.", Q], max_new_tokens=3,
                         return_branch_logits=True)  # fmt: skip
    assert batch[1].token_ids == alone.token_ids
    assert torch.allclose(batch[1].branch_logits["factual"], alone.branch_logits["factual"], atol=1e-4)
    with pytest.raises(ConfigError, match="out of range.*give --param layers="):
        cm.with_config(CausalMMConfig(method="vaf", params={"layers": "9-14"}))  # the default needs 15 layers


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"enhance": 0.0}, r"enhance=0.0: must be in \(0, 10\]"),
        ({"suppress": -1.0}, r"suppress=-1.0: must be in \[0, 10\]"),
        ({"layers": "a-b"}, "cannot read layers 'a-b'"),
        ({"ratio": 1.5}, r"ratio=1.5: must be in \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold=-0.1: must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_in_one_line(params, match):
    method = "vaf" if {"enhance", "suppress", "layers"} & set(params) else "memvr"
    with pytest.raises(ConfigError, match=match):
        CausalMMConfig(method=method, params=params)


# -- MemVR --------------------------------------------------------------------------------------------------------
def _official_adapter(x, ffn, visual, up_w, down_w, ratio):
    """memvr.py's LlamaMLP with ``adpt_sign == 1``: the adapter weights built from the visual tokens and the MLP's
    weights as ``forward`` builds them, the read rescaled to the FFN output's mean size, over the whole tensor."""
    w1 = torch.zeros_like(visual) + (up_w.abs().mean() / visual.abs().mean()) * visual
    w2 = torch.zeros_like(visual.T) + (down_w.abs().mean() / visual.abs().mean()) * visual.T
    adapter = (x @ w1.T) @ w2.T
    return ffn * (1 - ratio) + (ffn.abs().mean() / adapter.abs().mean()) * adapter * ratio


def test_memory_read_and_entropy_are_the_official_formulas():
    g = torch.Generator().manual_seed(2)
    x, ffn = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    visual = torch.randn(7, 8, generator=g)
    up, down = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    want = _official_adapter(x, ffn, visual, up, down, 0.3)
    assert torch.allclose(memory_read(x, ffn, visual, 0.3), want, atol=1e-5)
    assert torch.equal(memory_read(x, ffn, torch.zeros(7, 8), 0.3), 0.7 * ffn)  # an all-zero read adds nothing
    logits = torch.randn(3, 50, generator=g)
    for row in logits:
        top = torch.softmax(torch.topk(row, 10).values, -1)
        official = torch.sum(-top * torch.log(top)) / math.log(10)
        assert torch.isclose(top_entropy(row[None])[0], official, atol=1e-6)


def _stock_entropies(cm, enc) -> list[float]:
    """The stock model's early-exit entropy after each LLM layer, newest position (as memvr.py computes it)."""
    with torch.no_grad():
        hs = cm.model(**{k: v for k, v in enc.items() if k != "labels"}, output_hidden_states=True).hidden_states
    head, norm = cm.model.get_output_embeddings(), cm.adapter.lm.norm
    return [top_entropy(head(norm(h[:, -1])).float())[0].item() for h in hs[1:]]


def test_memvr_triggers_at_the_first_uncertain_layer_and_reads_in_the_next_only(loaded, images):
    """On a real tiny model: the row's trigger is the first layer of the window whose stock early-exit entropy is
    above the threshold, the layers up to it compute what the stock model computes, the next layer's FFN output is
    the official mix, and a row without memory in the same batch is untouched."""
    cm = loaded("llava")
    enc = cm.adapter.encode(images[0], Q)
    inputs = {k: v for k, v in enc.items() if k != "labels"}
    entropy = _stock_entropies(cm, enc)
    threshold = sorted(entropy[1:3])[0] - 1e-4  # some layer of the window 0 < l < 3 is above it
    first = next(layer for layer in (1, 2) if entropy[layer] > threshold)
    memory = torch.randn(6, cm.model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    head = cm.model.get_output_embeddings()
    mlps = cm.adapter.sites.lm_mlps
    seen = {}

    def keep(i):
        def hook(module, args, output):
            seen[i] = (args[0].detach().clone(), output.detach().clone())

        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(mlps)]
    try:
        with torch.no_grad():
            stock = cm.model(**inputs, output_hidden_states=True).hidden_states
            plain = dict(seen)
            read = MemoryRead(0.4, threshold, 0, 3, {0: memory}, cm.adapter.lm.norm, head)
            with intervene(Intervention(mlp=read, layers=read.layers)):
                moved = cm.model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert read.read_at == {0: first + 1}
    for i in range(first + 2):  # hidden_states[i] is the input of layer i: equal up to the reading layer's input
        assert torch.equal(moved[i], stock[i]), i
    x, ffn = seen[first + 1]
    assert torch.allclose(ffn, memory_read(x, plain[first + 1][1], memory, 0.4), atol=1e-5)
    assert not torch.allclose(moved[first + 2], stock[first + 2])


def test_memvr_answers_do_not_depend_on_the_batch_and_ratio_zero_is_regular(loaded, images):
    cm = loaded("llava")
    cfg = CausalMMConfig(method="memvr", params={"ratio": 0.9, "threshold": 0.0, "start": 0, "end": 3})
    mem = cm.with_config(cfg)
    alone = mem.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    plain = cm.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    assert (alone.branch_logits["factual"][0] - plain.branch_logits["factual"][0]).abs().max() > 1e-3
    batch = mem.generate([images[1], images[0]], ["Describe the image in detail.", Q], max_new_tokens=3,
                         return_branch_logits=True)  # fmt: skip
    assert batch[1].token_ids == alone.token_ids
    assert torch.allclose(batch[1].branch_logits["factual"], alone.branch_logits["factual"], atol=1e-4)
    off = cm.with_config(CausalMMConfig(method="memvr", params={"ratio": 0.0}))
    assert off.generate(images[0], Q, max_new_tokens=3).token_ids == plain.token_ids


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, r"start=5, end=16 does not fit the LLM's 4 layers"),
        ({"start": 2, "end": 2}, r"start=2, end=2 does not fit"),
        ({"start": 0, "end": 4}, r"give 0 <= start < end <= 3"),
    ],
)
def test_memvr_window_must_fit_the_model(params, match, loaded):
    with pytest.raises(ConfigError, match=match):
        loaded("llava").with_config(CausalMMConfig(method="memvr", params=params))


# -- VISTA --------------------------------------------------------------------------------------------------------
def _official_vsv(x: torch.Tensor, vsv: torch.Tensor, lam: float) -> torch.Tensor:
    """VISTA's VSVLayer.forward (llm_layers.py) with one vector: x ``(1, q, hidden)``, vsv ``(hidden,)``."""
    x = x.float()
    original_norm = torch.norm(x, p=2, dim=-1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(x, -vsv[None, None, :], dim=-1)
    lambda_sim = 1.0 + torch.max(torch.tensor([0.0]), cos).unsqueeze(-1)
    y = lam * lambda_sim * torch.nn.functional.normalize(vsv, dim=-1).repeat(1, x.shape[1], 1)
    return torch.nn.functional.normalize(torch.nn.functional.normalize(x, p=2, dim=-1) + y, p=2, dim=-1) * original_norm


def test_vista_steering_and_augmentation_are_the_official_formulas():
    from causalmm.interventions import steer
    from causalmm.methods.vista import vista_scores
    from causalmm.sites import Site
    from causalmm.sites.mlp import Steer

    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 5, 8, generator=g)
    vectors = {0: torch.randn(2, 8, generator=g), 2: torch.randn(2, 8, generator=g)}
    for lam in (0.01, 0.17, 2.0):
        for r in (0, 2):
            want = _official_vsv(out[r : r + 1], vectors[r][1], lam)
            assert torch.allclose(steer(out[r : r + 1], vectors[r][1], lam), want, atol=1e-6)
        steered = Steer(lam, vectors)(Site("language", 1), out, out)
        assert torch.equal(steered[1], out[1])  # the row without a vector is untouched
        for r in (0, 2):
            assert torch.allclose(steered[r], _official_vsv(out[r : r + 1], vectors[r][1], lam)[0], atol=1e-6)
            assert torch.allclose(steered[r].norm(dim=-1), out[r].norm(dim=-1), atol=1e-5)  # the norm is kept
    assert Steer(1.0, vectors)(Site("vision", 1), out, out) is None  # the tower's MLPs are not steered
    late, final = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)
    assert torch.allclose(vista_scores(final, late, 0.3), 0.3 * torch.stack(list(late)).mean(0) + 0.7 * final)


def test_vista_vectors_are_the_stock_last_token_differences(loaded, images):
    """The probe's vectors: each layer's last-token output with the image minus without it, as the stock model
    computes them (its ``hidden_states``; the last one is after the final norm, so the layers before it)."""
    cm = loaded("llava")
    vista = cm.with_config(CausalMMConfig(method="vista", params={"lam": 0.5, "logits_layers": "1-2"}))
    engine = vista.engine
    seen = {}
    real = engine.needs.steering_vectors

    def keep(fw, layout, row_feature):
        seen.update(real(fw, layout, row_feature))
        return seen

    engine.needs.steering_vectors = keep
    try:
        vista.generate([images[0], images[1]], [Q, "Describe the image."], max_new_tokens=1)
    finally:
        del engine.needs.steering_vectors
    for p, (img, prompt) in enumerate([(images[0], Q), (images[1], "Describe the image.")]):
        def states(enc):
            with torch.no_grad():
                hs = cm.model(**{k: v for k, v in enc.items() if k != "labels"}, output_hidden_states=True)
            return torch.stack([h[0, -1].float() for h in hs.hidden_states[1:-1]])

        want = states(cm.adapter.encode(img, prompt)) - states(cm.adapter.encode_text(prompt, img))
        assert torch.allclose(seen[p][:-1], want, atol=1e-4), p


def test_vista_steers_and_mixes_and_keeps_answers_independent_of_the_batch(loaded, images):
    cm = loaded("llava")
    plain = cm.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True).branch_logits
    vista = cm.with_config(CausalMMConfig(method="vista", params={"lam": 0.5, "logits_layers": "1-2"}))
    alone = vista.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    logs = alone.branch_logits
    assert (logs["factual"][0] - plain["factual"][0]).abs().max() > 1e-3  # the prefill is steered
    for t in range(len(alone.token_ids)):
        want = 0.7 * logs["factual"][t] + 0.3 * (logs["exit2"][t] + logs["exit3"][t]) / 2
        assert torch.allclose(logs["combined"][t], want, atol=1e-5)
    batch = vista.generate([images[1], images[0]], ["Describe the image.", Q], max_new_tokens=3,
                           return_branch_logits=True)  # fmt: skip
    assert batch[1].token_ids == alone.token_ids
    assert torch.allclose(batch[1].branch_logits["combined"], logs["combined"], atol=1e-4)
    with pytest.raises(ConfigError, match="includes the last layer"):
        cm.with_config(CausalMMConfig(method="vista", params={"logits_layers": "2-3"}))
    with pytest.raises(ConfigError, match="out of range.*give --param logits_layers="):
        cm.with_config(CausalMMConfig(method="vista"))  # the official 25-30 needs 31 layers


# -- RITUAL -------------------------------------------------------------------------------------------------------
def _picture(h: int = 40, w: int = 48, seed: int = 5):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_ritual_draws_each_transform_uniformly_and_reproducibly():
    from causalmm import seeds as streams
    from causalmm.transforms import TRANSFORMS, random_transform

    img = _picture()
    names = [random_transform(img, streams.generator("cpu", s, streams.TRANSFORM))[0] for s in range(600)]
    counts = {n: names.count(n) for n in TRANSFORMS}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # about 100 each
    one = random_transform(img, streams.generator("cpu", 7, streams.TRANSFORM))
    two = random_transform(img, streams.generator("cpu", 7, streams.TRANSFORM))
    assert one[0] == two[0] and one[1].tobytes() == two[1].tobytes()


def test_ritual_transforms_do_what_torchvision_does_to_a_pil_image():
    import numpy as np

    from causalmm.transforms import TRANSFORMS, _crop_box, gaussian_blur

    img, g = _picture(), torch.Generator().manual_seed(0)
    arr = np.asarray(img)
    assert np.array_equal(np.asarray(TRANSFORMS["horizontal flip"](img, g, 336)), arr[:, ::-1])
    assert np.array_equal(np.asarray(TRANSFORMS["vertical flip"](img, g, 336)), arr[::-1])
    # rotation: the angle is drawn uniformly in [-180, 180] (torch's uniform_ on the generator), nearest, same size
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    angle = float(torch.empty(1).uniform_(-180.0, 180.0, generator=g2))
    from PIL import Image

    want = img.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
    assert TRANSFORMS["rotation"](img, g1, 336).tobytes() == want.tobytes()
    # blur: a 13-tap normalised Gaussian, reflected borders; an impulse spreads as the kernel's outer product
    impulse = np.zeros((31, 31, 3), np.uint8)
    impulse[15, 15] = 255
    out = np.asarray(gaussian_blur(Image.fromarray(impulse), 13, 1.5)).astype(float)
    x = np.arange(-6, 7)
    k = np.exp(-0.5 * (x / 1.5) ** 2)
    k /= k.sum()
    assert np.abs(out[9:22, 9:22, 0] - np.round(255 * np.outer(k, k))).max() <= 1
    flat = Image.new("RGB", (20, 20), (90, 30, 200))
    assert gaussian_blur(flat, 13, 2.0).tobytes() == flat.tobytes()  # a constant image stays as it is
    # crop: 8% to 100% of the area, aspect 3/4 to 4/3, inside the image; output size x size
    for s in range(200):
        top, left, h, w = _crop_box(48, 40, torch.Generator().manual_seed(s))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
        assert 0.08 * 48 * 40 * 0.8 <= h * w <= 48 * 40 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert TRANSFORMS["crop"](img, g, 336).size == (336, 336)
    assert _crop_box(1000, 10, torch.Generator().manual_seed(0)) == (0, 493, 10, 13)  # no try fits: the centre
    jittered = TRANSFORMS["color jitter"](img, torch.Generator().manual_seed(1), 336)
    assert jittered.size == img.size and jittered.tobytes() != img.tobytes()


def test_ritual_rule_is_the_official_one():
    from causalmm.methods.ritual import ritual_scores

    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        lg, lp = torch.randn(30, generator=g) * 3, torch.randn(30, generator=g) * 3
        cutoff = math.log(0.1) + lg.max()
        want = (lg + 3 * lp).masked_fill(lg < cutoff, -math.inf)  # ritual_sample.py
        assert torch.equal(ritual_scores(lg, lp, alpha=3.0, epsilon=0.1), want)
    assert torch.equal(ritual_scores(lg, lp, alpha=0.0, epsilon=0.1), lg)  # neutral: the factual logits whole


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_ritual_branch_sees_the_transformed_image_and_answers_do_not_depend_on_the_batch(family, loaded, images):
    """The branch's first logits are the stock model's on the prompt with the image transformed by the sample's
    seed (a crop changes Qwen2-VL's image-token count: the branch has its own encoding), and a prompt's answer is
    the same alone or in a batch."""
    from causalmm import seeds as streams
    from causalmm.transforms import random_transform

    cm = loaded(family).with_config(CausalMMConfig(method="ritual"))
    res = cm.generate([images[1], images[0]], ["Describe the image.", Q], seeds=[11, 12], max_new_tokens=3,
                      return_branch_logits=True)  # fmt: skip
    for seed in (12, 11, 2, 3):  # whichever transform these seeds draw, the branch sees it
        img = images[0]
        made = random_transform(img, streams.generator("cpu", seed, streams.TRANSFORM))[1]
        enc = cm.adapter.encode(made, Q)
        with torch.no_grad():
            want = cm.model(**{k: v for k, v in enc.items() if k != "labels"}).logits[0, -1].float()
        got = cm.generate(img, Q, seeds=[seed], max_new_tokens=1, return_branch_logits=True)
        assert torch.allclose(got.branch_logits["transformed"][0], want, atol=1e-4), seed
    alone = cm.generate(images[0], Q, seeds=[12], max_new_tokens=3, return_branch_logits=True)
    assert res[1].token_ids == alone.token_ids
    assert torch.allclose(res[1].branch_logits["combined"], alone.branch_logits["combined"], atol=1e-4)


@pytest.mark.parametrize(
    ("params", "match"),
    [({"alpha": -1.0}, r"alpha=-1.0: must be in \[0, 100\]"), ({"size": 0}, r"size=0: must be in \[1, 4096\]")],
)
def test_ritual_bad_settings_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        CausalMMConfig(method="ritual", params=params)


# -- ONLY ---------------------------------------------------------------------------------------------------------
def _official_only_map(p: torch.Tensor, sys_len: int, img_len: int) -> torch.Tensor:
    """modeling_llama.py's side map for one unpadded row: ``p`` ``(1, heads, q, k)`` float32, its fixed spans (text
    ``[1:sys]`` and ``[sys+img:]``, image ``[sys:sys+img]``), outliers zeroed on every query, heads chosen on the
    last one."""
    w = p.clone()
    end = sys_len + img_len
    text = torch.cat([w[:, :, :, 1:sys_len], w[:, :, :, end:]], dim=-1)
    text = torch.where(text > text.mean(-1, keepdim=True) + text.std(-1, keepdim=True), 0, text)
    w[:, :, :, 1:sys_len], w[:, :, :, end:] = text[..., : sys_len - 1], text[..., sys_len - 1 :]
    text = text / text.sum(-1, keepdim=True)
    text = text[:, :, -1, :].unsqueeze(-2)
    img = w[:, :, :, sys_len:end]
    img = torch.where(img > img.mean(-1, keepdim=True) + img.std(-1, keepdim=True), 0, img)
    w[:, :, :, sys_len:end] = img
    img = img / img.sum(-1, keepdim=True)
    img = img[:, :, -1, :].unsqueeze(-2)
    entropy_text = torch.nan_to_num(-torch.sum(text * torch.log(text + 1e-6), dim=-1), nan=0.0)
    entropy_img = torch.nan_to_num(-torch.sum(img * torch.log(img + 1e-6), dim=-1), nan=float("inf"))
    ratio = (entropy_text.sum(-1) / entropy_img.sum(-1)).squeeze()
    removed = torch.where(ratio < ratio.mean())
    w[:, removed[0], :, :] = 0
    return w


def test_only_side_map_is_the_official_one_on_each_rows_own_spans():
    from causalmm.interventions import only_heads

    g = torch.Generator().manual_seed(8)
    heads, k = 6, 14
    for pad, sys_len, img_len in ((0, 3, 6), (2, 2, 5)):
        real = k - pad
        p = torch.softmax(torch.randn(1, heads, real, real, generator=g) * 2, -1)
        want = _official_only_map(p, sys_len, img_len)[0, :, -1]  # the last query's row
        last = torch.zeros(1, heads, k)
        last[0, :, pad:] = p[0, :, -1]
        image = torch.zeros(1, k, dtype=torch.bool)
        image[0, pad + sys_len : pad + sys_len + img_len] = True
        text = torch.zeros(1, k, dtype=torch.bool)
        text[0, pad + 1 :] = True  # the real keys but the first
        text &= ~image
        got = only_heads(last, text, image)[0]
        assert torch.allclose(got[:, pad:], want, atol=1e-6) and (got[:, :pad] == 0).all()


def test_only_fusion_is_the_official_one():
    from causalmm.methods.only import only_scores

    g = torch.Generator().manual_seed(9)
    for gamma in (0.05, 0.2, 1.9):
        lg, lc = torch.randn(40, generator=g) * 2, torch.randn(40, generator=g) * 2
        tvd = torch.sum(torch.abs(torch.softmax(lg, -1) - torch.softmax(lc, -1)))  # only_sample.py
        diffs = lg + 3.0 * lc if tvd < gamma else 2.0 * lg - 1.0 * lc
        want = diffs.masked_fill(lg < math.log(0.1) + lg.max(), -math.inf)
        assert torch.equal(only_scores(lg, lc, gamma=gamma, alpha_pos=3.0, alpha_neg=1.0, epsilon=0.1), want)


def test_only_side_logits_follow_the_official_path_on_a_model(loaded, images):
    """The side logits of the first step equal the official computation on the stock model: layer 0's own
    query, keys and values (captured from its attention call), the official fixed spans of this unpadded prompt,
    ``o_proj``, then the last layer's norms and MLP with its input and the final normed state."""
    from transformers import AttentionInterface

    from causalmm.sites.attention import causalmm_attention

    cm = loaded("llava")
    enc = cm.adapter.encode(images[0], Q)
    ids = enc["input_ids"][0]
    image = (ids == cm.model.config.image_token_id).nonzero().squeeze(-1)
    sys_len, img_len = int(image[0]), len(image)
    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        if getattr(module, "layer_idx", None) == 0 and "q" not in seen:
            seen.update(q=query, k=key, v=value, module=module, scaling=kw.get("scaling"))
        return causalmm_attention(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("causalmm_eager", capture)
    try:
        with torch.no_grad():
            hs = cm.model(**{k: v for k, v in enc.items() if k != "labels"}, output_hidden_states=True).hidden_states
    finally:
        AttentionInterface.register("causalmm_eager", causalmm_attention)
    q, k, v, module = seen["q"].float(), seen["k"].float(), seen["v"].float(), seen["module"]
    scale = seen["scaling"] if seen["scaling"] is not None else q.shape[-1] ** -0.5
    n, groups = q.shape[2], q.shape[1] // k.shape[1]  # grouped-query heads: repeat_kv, as the official code
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale + torch.full((n, n), -math.inf).triu(1)
    w = _official_only_map(torch.softmax(scores, -1), sys_len, img_len)
    a = module.o_proj((w @ v)[0, :, -1].reshape(-1))
    last, norm, head = cm.adapter.lm_layers[-1], cm.adapter.lm.norm, cm.model.get_output_embeddings()
    with torch.no_grad():
        x = last.input_layernorm(a) + 0.2 * hs[-2][0, -1]
        x = x + last.mlp(last.post_attention_layernorm(x))
        want = head(norm(x) + 0.5 * hs[-1][0, -1]).float()  # hidden_states[-1] is after the final norm
    got = cm.with_config(CausalMMConfig(method="only")).generate(images[0], Q, max_new_tokens=1,
                                                                  return_branch_logits=True)  # fmt: skip
    assert torch.allclose(got.branch_logits["side"][0], want, atol=1e-4)


def test_only_answers_do_not_depend_on_the_batch(loaded, images):
    cm = loaded("qwen2_vl").with_config(CausalMMConfig(method="only", gamma=0.5))
    alone = cm.generate(images[0], Q, max_new_tokens=3, return_branch_logits=True)
    batch = cm.generate([images[1], images[0]], ["Describe the image.", Q], max_new_tokens=3,
                        return_branch_logits=True)  # fmt: skip
    assert batch[1].token_ids == alone.token_ids
    assert torch.allclose(batch[1].branch_logits["side"], alone.branch_logits["side"], atol=1e-4)
    with pytest.raises(ConfigError, match="layer=4 is out of range"):
        cm.with_config(CausalMMConfig(method="only", params={"layer": 4}))
