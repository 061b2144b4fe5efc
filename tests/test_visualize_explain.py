"""Seeing the causality: attention-map figures (visualize.py) and token-by-token explanations (explain.py)."""

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from rich.table import Table

from causalmm import CausalMMConfig
from causalmm.config import ConfigError
from causalmm.decoding import contrast
from causalmm.explain import explain
from causalmm.inputs import InputError
from causalmm.tiny import FAMILIES
from causalmm.visualize import DEFAULT_METHODS, attention_maps, figure_size, render, visualize

Q = "Describe the image in detail."
#: images[0] is 48 high x 40 wide: Qwen resizes it to 112 x 84, an 8 x 6 patch grid, 4 x 3 merged tokens.
GRIDS = {
    "llava": ((4, 4), (4, 4)),
    "llava_next": ((4, 4), (4, 4)),
    "qwen2_vl": ((8, 6), (4, 3)),
    "qwen2_5_vl": ((8, 6), (4, 3)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: with 2 threads on a loaded 2-core machine each op waits on the other thread (x1000)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def maps(loaded, images):
    """attention_maps of images[0] for every family, computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = attention_maps(loaded(family), images[0], Q)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_figure_and_maps_every_family(family, maps, loaded, images, tmp_path):
    cm = loaded(family)
    res = maps(family)
    vgrid, lgrid = GRIDS[family]
    assert res.vision_grid == vgrid and res.language_grid == lgrid
    assert res.vision_layers == cm.adapter.default_vision_layers()
    assert res.language_layers == [1]  # "middle" of the 4 LLM layers
    assert res.methods == DEFAULT_METHODS
    for kind, grid in (("vision", vgrid), ("language", lgrid)):
        factual = res.maps[f"{kind}/factual"]
        assert factual.shape == grid and np.isfinite(factual).all() and factual.min() >= 0
        assert np.ptp(factual) > 1e-4, (kind, "the factual map of a textured image is not flat")
        for method in DEFAULT_METHODS:
            cf = res.maps[f"{kind}/{method}"]
            assert cf.shape == grid and np.isfinite(cf).all()
            assert np.abs(cf - factual).max() > 1e-4, (kind, method, "counterfactual panel equals the factual one")
        # uniform: every allowed key has the same weight, so the map is exactly constant
        uniform = res.maps[f"{kind}/uniform"]
        assert np.ptp(uniform) == 0.0, (kind, uniform)
    # the first token under the map is the engine's first greedy token
    assert res.first_token_id == cm.generate(images[0], Q, max_new_tokens=1).token_ids[0]
    if family == "llava_next":  # the panels say which crop / which tokens they show
        assert "base crop 1/5" in res.titles["vision/random"] and "base crop (1 of 5" in res.notes[0]
        assert "base-image tokens" in res.titles["language/factual"]
    if family.startswith("qwen"):
        assert "2x2-merged" in res.titles["language/uniform"]

    out = render(res, tmp_path / "sub" / "fig.png")
    assert out == tmp_path / "sub" / "fig.png" and res.path == out
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == figure_size(res) == (300 * (2 + len(DEFAULT_METHODS)), 600)
        im.load()


@pytest.mark.parametrize("family", FAMILIES)
def test_factual_language_map_is_stock_attention(family, maps, loaded, images):
    """Independent check: the stock forward (pixel inputs, eager weights) gives the same first-token row."""
    cm = loaded(family)
    res = maps(family)
    enc = cm.adapter.encode(images[0], Q)
    with torch.no_grad():
        out = cm.model(**enc, output_attentions=True)
    layer = res.language_layers[0]
    row = out.attentions[layer][0, :, -1].double().mean(0)
    ids = enc["input_ids"][0]
    cfg = cm.model.config
    img_id = getattr(cfg, "image_token_id", None)
    img_id = img_id if isinstance(img_id, int) else cfg.image_token_index
    pos = (ids == img_id).nonzero().flatten()
    n = int(np.prod(res.language_grid))
    expected = row[pos[:n]].numpy().reshape(res.language_grid)  # LLaVA-NeXT: the base-image tokens come first
    np.testing.assert_allclose(res.maps["language/factual"], expected, rtol=1e-4, atol=1e-6)


def test_factual_vision_map_is_stock_clip_attention(maps, loaded, images):
    cm = loaded("llava")
    res = maps("llava")
    enc = cm.adapter.encode(images[0], Q)
    with torch.no_grad():
        out = cm.model.model.vision_tower(enc["pixel_values"], output_attentions=True)
    layer = res.vision_layers[0]
    cls = out.attentions[layer][0, :, 0, 1:].double().mean(0).numpy().reshape(4, 4)
    np.testing.assert_allclose(res.maps["vision/factual"], cls, rtol=1e-4, atol=1e-6)
    # the CLS row is a distribution over CLS + 16 patches: the uniform panel is 1/17 everywhere
    np.testing.assert_allclose(res.maps["vision/uniform"], np.full((4, 4), 1 / 17), rtol=1e-6)


def test_qwen25_window_layer_and_model_view(loaded, images):
    """A windowed Qwen2.5-VL layer under `uniform`: each patch gets 1/(its window's size), which is only a
    block pattern on the grid if the tower's window permutation was undone correctly."""
    cm = loaded("qwen2_5_vl")
    res = attention_maps(cm, images[0], Q, layers="0", methods="uniform")
    # 4 x 3 merged tokens, windows of 2 x 2 merged tokens: 16-patch windows (cols 0-3) and 8-patch ones (4-5)
    expected = np.tile(np.array([1 / 16] * 4 + [1 / 8] * 2), (8, 1))
    np.testing.assert_allclose(res.maps["vision/uniform"], expected, rtol=1e-6)
    # the background is the processor's input, put back together from its flat patches
    view = np.asarray(images[0].resize((84, 112), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    assert res.vision_view.shape == (112, 84, 3)
    np.testing.assert_allclose(res.vision_view, view, atol=1e-4)


def test_visualize_returns_the_png(loaded, images, tmp_path):
    cm = loaded("llava")
    out = visualize(cm, images[1], Q, layers=[0, 1], methods="random,reversed", out=tmp_path / "v.png")
    assert out == tmp_path / "v.png"
    with Image.open(out) as im:
        assert im.size == (300 * 4, 600)
    res = attention_maps(cm, images[1], Q, layers=[0, 1], methods="random,reversed")
    assert sorted(res.maps) == sorted(
        f"{k}/{m}" for k in ("vision", "language") for m in ("factual", "random", "reversed")
    )
    # the same seed draws the same maps; another seed other random draws
    again = attention_maps(cm, images[1], Q, layers=[0, 1], methods="random,reversed")
    np.testing.assert_array_equal(again.maps["vision/random"], res.maps["vision/random"])
    other = attention_maps(cm, images[1], Q, layers=[0, 1], methods="random", seed=7)
    assert not np.array_equal(other.maps["vision/random"], res.maps["vision/random"])
    np.testing.assert_array_equal(other.maps["vision/factual"], res.maps["vision/factual"])


@pytest.mark.parametrize(
    "family,extra",
    [
        ("llava", {}),
        ("llava_next", {"mode": "joint"}),
        ("qwen2_vl", {}),
        ("qwen2_5_vl", {"gamma": 0.7, "epsilon": 0.05}),
        ("llava", {"method": "vcd", "gamma": 0.5}),
    ],
)
def test_explain_follows_the_decoding_rule(family, extra, loaded, images, tmp_path):
    layers = {} if extra.get("method") == "vcd" else {"vision_layers": "all", "language_layers": "all"}
    cfg = CausalMMConfig(**{"mode": "multimodal", **layers, **extra})
    cm = loaded(family).with_config(cfg)
    ex = explain(cm, images[0], Q, max_new_tokens=4, top_k=3)
    logs = ex.branch_logits
    names = [b.name for b in cm.engine.branches]
    assert ex.branches == names and set(logs) == {"factual", *names, "combined"}
    assert len(ex.steps) == len(ex.token_ids) == logs["combined"].shape[0] >= 1
    # the same answer as a plain generate call
    assert ex.token_ids == cm.generate(images[0], Q, max_new_tokens=4).token_ids
    z = contrast(logs["factual"], [logs[n] for n in names], gamma=cfg.gamma, epsilon=cfg.epsilon)
    assert torch.equal(z, logs["combined"])
    assert logs["combined"].argmax(-1).tolist() == ex.token_ids  # greedy
    for t, step in enumerate(ex.steps):
        assert step.token_id == ex.token_ids[t]
        assert step.top["combined"][0].token_id == step.token_id
        assert step.factual_choice == int(logs["factual"][t].argmax())
        assert step.flipped == (step.token_id != step.factual_choice)
        for name in ("factual", *names, "combined"):
            cands = step.top[name]
            probs = torch.softmax(logs[name][t], -1)
            assert [c.rank for c in cands] == list(range(1, len(cands) + 1)) and 1 <= len(cands) <= 3
            for c in cands:
                assert c.prob == pytest.approx(float(probs[c.token_id]), abs=1e-7)
            assert [c.prob for c in cands] == sorted((c.prob for c in cands), reverse=True)
        for ch in step.promoted:
            assert ch.combined_rank is not None and ch.combined_rank < ch.factual_rank
        for ch in step.suppressed:
            assert ch.combined_rank is None or ch.combined_rank > ch.factual_rank
        cut = torch.isinf(logs["combined"][t])
        for ch in step.suppressed:
            assert (ch.combined_rank is None) == bool(cut[ch.token_id])
        if step.flipped:
            assert step.token_id in {c.token_id for c in step.promoted}

    data = ex.to_json()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["token_ids"] == ex.token_ids
    assert data["branches"] == ["factual", *names, "combined"] and len(data["steps"]) == len(ex.steps)
    table = ex.table()
    assert isinstance(table, Table) and table.row_count == len(ex.steps)
    assert [c.header for c in table.columns][2:-2] == ["factual", *names, "combined"]


def test_explain_html_embeds_the_figure(loaded, images, tmp_path):
    cm = loaded("llava").with_config(CausalMMConfig(mode="multimodal"))
    fig = visualize(cm, images[0], Q, methods=["uniform"], out=tmp_path / "f.png")
    ex = explain(cm, images[0], "Is there a <cat> & a dog?", max_new_tokens=2, top_k=2)
    out = ex.to_html(tmp_path / "r" / "report.html", figure=fig)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert "Is there a &lt;cat&gt; &amp; a dog?" in page
    b64 = re.search(r'src="data:image/png;base64,([^"]+)"', page)[1]
    assert base64.b64decode(b64) == fig.read_bytes()
    plain = ex.to_html(tmp_path / "plain.html")
    assert "data:image/png" not in plain.read_text(encoding="utf-8")
    with pytest.raises(InputError, match="figure not found"):
        ex.to_html(tmp_path / "x.html", figure=tmp_path / "missing.png")


def test_bad_input_errors_clearly(loaded, images, tmp_path):
    cm = loaded("llava")
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="image not found"):
        visualize(cm, missing, Q, out=tmp_path / "a.png")
    with pytest.raises(InputError, match="image not found"):
        explain(cm, missing, Q)
    with pytest.raises(InputError, match="prompt"):
        attention_maps(cm, images[0], "  ")
    with pytest.raises(ValueError) as err:
        visualize(cm, images[0], Q, methods=["random", "blur"], out=tmp_path / "b.png")
    assert isinstance(err.value, ConfigError)
    assert "'blur'" in str(err.value) and all(m in str(err.value) for m in ("random", "uniform", "reversed", "shuffle"))
    # LLaVA's tower has 3 layers, but only layers 0-1 feed the LLM (vision_feature_layer=-2)
    for bad in ([99], "2", "0-5"):
        with pytest.raises(ConfigError, match="out of range"):
            attention_maps(cm, images[0], Q, layers=bad)
    with pytest.raises(ConfigError, match="language layer index 4 is out of range"):
        attention_maps(cm, images[0], Q, language_layers=[4])
    with pytest.raises(ConfigError, match="top_k"):
        explain(cm, images[0], Q, top_k=0)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_cli_visualize_and_explain_as_a_user_runs_them(model_dirs, image_file, tmp_path, causalmm_cli):
    png = tmp_path / "maps.png"
    causalmm_cli("visualize", "--model", model_dirs["qwen2_vl"], "--image", image_file, "--prompt", "Is there a cat?",
                 "--methods", "random,uniform", "--out", png)  # fmt: skip
    with Image.open(png) as im:
        assert im.size == (1200, 600)  # 2 rows x (image + factual + 2 methods) panels of 300 px
    html = tmp_path / "report.html"
    proc = causalmm_cli("explain", "--model", model_dirs["llava"], "--image", image_file, "--prompt", "Is there a cat?",
                        "--max-new-tokens", "3", "--json", "--html", html)  # fmt: skip
    payload = json.loads(proc.stdout)
    assert len(payload["steps"]) == 3 and "data:image/png;base64," in html.read_text()
    bad = causalmm_cli("visualize", "--model", model_dirs["llava"], "--image", tmp_path / "nope.png", "--prompt", "x",
                       "--out", png, check=False)  # fmt: skip
    assert bad.returncode == 2 and "image not found" in bad.stderr and "Traceback" not in bad.stderr
