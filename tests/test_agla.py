"""AGLA: the matcher's steps against their official definitions (LAVIS's GradCAM, ITC, getAttMap's blur, the keep
ratio, the local image) on a tiny BLIP ITM model, its rule by hand, and the method in the engine on every family
(the neutral setting is regular decoding, the local branch's first logits are the stock model's on the local image,
answers do not depend on the batch), with its refusals and the command line."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from causalmm import CausalMMConfig, ConfigError
from causalmm.matcher import att_map, gaussian_blur, keep_mask, load_matcher, local_image, pre_caption
from causalmm.methods.ritual import ritual_scores
from causalmm.tiny import ALL_FAMILIES

Q = "Is there a cat in the image? Answer yes or no."


def _textured(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _scipy_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` (mode ``reflect``, truncate 4) written out: each axis convolved with the
    normalised kernel of radius ``int(4 sigma + 0.5)``, the border mirrored with the edge repeated."""
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = x.astype(np.float64)
    for axis in (1, 0):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return out


def test_text_cleaning_blur_and_keep_rule():
    assert pre_caption("A  Dog!! (running)") == "a dog running"
    assert pre_caption("one two three", max_words=2) == "one two"
    x = torch.rand(30, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.7, 2.0, 7.68):  # 7.68: a radius wider than the image, mirrored more than once
        assert np.allclose(gaussian_blur(x, sigma).numpy(), _scipy_gaussian(x.numpy(), sigma), atol=1e-12)
    sal = torch.tensor([[0.9, 0.1], [0.5, 0.7]])
    # the official rule keeps values >= the int(n * ratio)-th largest (0-based): ratio 0.5 keeps the top 3 of 4
    assert keep_mask(sal, 0.5).tolist() == [[True, False], [True, True]]
    assert keep_mask(sal, 0.0).tolist() == [[True, False], [False, False]]
    assert keep_mask(sal, 1 - 1e-5).all()
    m = att_map(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), 16)
    assert m.shape == (16, 16) and float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)
    assert m[0, 0] < m[-1, -1]  # the larger grid values stay larger after resize and blur


def test_local_image_keeps_only_the_kept_pixels():
    image = _textured(30, 50, 1)
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[2:5, 1:7] = True
    out = np.asarray(local_image(image, keep))
    ref = np.asarray(image.resize((8, 8)))
    assert out.shape == (8, 8, 3)
    assert (out[~keep.numpy()] == 0).all() and (out[keep.numpy()] == ref[keep.numpy()]).all()


def test_gradcam_and_itc_are_the_official_ones(tiny_matcher):
    """The map is LAVIS's ``compute_gradcam`` (attention x positive gradient of the ITM "match" logit at the
    cross-attention of the chosen block, mean over heads, then over the prompt's tokens without [CLS] and [SEP]),
    computed here with the model's own recorded cross-attentions and autograd; the ITC score is the cosine of the
    projected [CLS] features."""
    from causalmm.matcher import ITMMatcher

    matcher = load_matcher(tiny_matcher, 6, "cpu")
    image, text = _textured(40, 60, 2), "Is there a cat in the image?"
    cam, itc = matcher.saliency(image, text)
    model = matcher.model
    enc = matcher.processor(images=image, text=pre_caption(text), return_tensors="pt")
    with torch.enable_grad():
        out = model(**enc, use_itm_head=True, output_attentions=True)
    # the recorded cross-attentions are not exposed on the retrieval output: read them with a hook instead
    seen = []
    handle = model.text_encoder.encoder.layer[6].crossattention.self.register_forward_hook(
        lambda m, a, o: seen.append(o[1])
    )
    try:
        with torch.enable_grad():
            score = model(**enc, use_itm_head=True).itm_score[:, 1].sum()
            (grad,) = torch.autograd.grad(score, seen[-1])
    finally:
        handle.remove()
    probs = seen[-1].detach()
    n = int(enc["attention_mask"].sum()) - 2
    want = (probs[..., 1:] * grad.clamp(min=0)[..., 1:]).mean(1)[0, 1 : n + 1].mean(0)
    assert torch.allclose(cam.flatten(), want.float(), atol=1e-7) and cam.shape == (matcher.grid, matcher.grid)
    assert float(cam.abs().sum()) > 0
    with torch.no_grad():
        vis = model.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state[:, 0]
        txt = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(model.vision_proj(vis), model.text_proj(txt[:, 0]))
    assert itc == pytest.approx(float(cos), abs=1e-5)
    assert out.itm_score.shape == (1, 2)
    local = matcher.local(image, text)
    kept = (np.asarray(local).sum(-1) > 0).mean()
    ratio = min(1 - itc / 2, 1 - 1e-5)
    assert local.size == (matcher.size, matcher.size) and abs(kept - ratio) < 0.02  # the share the ITC rule keeps
    with pytest.raises(ConfigError, match="GradCAM block 9 does not exist"):
        ITMMatcher(model, matcher.processor, 9)


def test_rule_by_hand():
    f, local = torch.tensor([2.0, 1.9, -3.0]), torch.tensor([0.0, 1.0, 9.0])
    # alpha 2, beta 0.5: the third token is more than log 2 below the top: cut
    z = ritual_scores(f, local, alpha=2.0, epsilon=0.5)
    assert z[:2].tolist() == pytest.approx([2.0, 3.9]) and z[2] == -math.inf
    cfg = CausalMMConfig(method="agla")
    assert (cfg.epsilon, cfg.param("alpha"), cfg.param("gradcam_layer")) == (0.5, 2.0, 6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_agla_on_every_family(family, any_family, images, tiny_matcher):
    cm = any_family(family)
    imgs, prompts = [images[0], images[1]], [Q, "Describe the image."]
    on = CausalMMConfig(method="agla", params={"matcher": tiny_matcher, "alpha": 2.0})
    res = cm.with_config(on).generate(imgs, prompts, max_new_tokens=4, return_branch_logits=True)
    for r in res:
        logs = r.branch_logits
        for t in range(len(r.token_ids)):
            want = ritual_scores(logs["factual"][t], logs["local"][t], alpha=2.0, epsilon=0.5)
            assert torch.allclose(logs["combined"][t], want, atol=1e-5)
    # the local branch's first logits: the stock model on the prompt with the local image
    matcher = load_matcher(tiny_matcher, 6, str(cm.adapter.device))
    enc = cm.adapter.encode(matcher.local(imgs[0], prompts[0]), prompts[0])
    with torch.no_grad():
        stock = cm.model(**{k: v for k, v in enc.items() if k != "labels"}).logits[0, -1].float()
    assert torch.allclose(res[0].branch_logits["local"][0], stock, atol=1e-4)
    alone = cm.with_config(on).generate(imgs[1], prompts[1], max_new_tokens=4)
    assert alone.token_ids == res[1].token_ids
    off = CausalMMConfig(method="agla", params={"matcher": tiny_matcher, "alpha": 0.0})
    regular = [r.token_ids for r in cm.generate(imgs, prompts, max_new_tokens=4)]
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, max_new_tokens=4)] == regular
    beams = {"max_new_tokens": 4, "num_beams": 3}
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, **beams)] == [
        r.token_ids for r in cm.generate(imgs, prompts, **beams)
    ]


def test_refusals_and_the_command_line(loaded, tiny_matcher, tmp_path, model_dirs, image_file, causalmm_cli):
    cm = loaded("llava")
    with pytest.raises(ConfigError, match="cannot load the matcher 'Salesforce/blip-itm-large-coco'"):
        cm.with_config(CausalMMConfig(method="agla"))
    with pytest.raises(ConfigError, match="cannot load the matcher .*give --param matcher=DIR"):
        cm.with_config(CausalMMConfig(method="agla", params={"matcher": str(tmp_path)}))
    with pytest.raises(ConfigError, match="GradCAM block 20 does not exist"):
        cm.with_config(CausalMMConfig(method="agla", params={"matcher": tiny_matcher, "gradcam_layer": 20}))
    with pytest.raises(ConfigError, match="alpha=-1"):
        CausalMMConfig(method="agla", params={"alpha": -1})
    out = causalmm_cli("generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q, "--method",
                       "agla", "--param", f"matcher={tiny_matcher}", "--max-new-tokens", "3", "--json")  # fmt: skip
    assert '"method": "agla"' in out.stdout
    proc = causalmm_cli("generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q,
                        "--method", "agla", check=False)  # fmt: skip
    assert proc.returncode == 2 and "cannot load the matcher" in proc.stderr and "Traceback" not in proc.stderr


def test_matcher_self_reads_the_models_own_attention(loaded, images, any_family):
    """``matcher=self``: the map is the last prompt token's attention on the image tokens (mean over heads and
    layers, the model's own recorded attentions) on their square grid; a family whose image tokens form no square
    grid is refused; a setting of the other matcher is refused."""
    from causalmm.errors import UnsupportedModelError
    from causalmm.matcher import SIDE, self_saliency

    cm = loaded("llava")  # eager underneath: the model records its attentions
    enc = cm.adapter.encode(images[0], Q)
    with torch.no_grad():
        att = cm.model(**enc, output_attentions=True).attentions
    cols = torch.isin(enc["input_ids"][0], cm.adapter.image_token_ids)
    want = torch.stack([a[0, :, -1][:, cols].float().mean(0) for a in att]).mean(0)
    got = self_saliency(cm.adapter, images[0], Q)
    n = int(cols.sum())
    assert got.shape == (math.isqrt(n), math.isqrt(n)) and torch.allclose(got.flatten(), want, atol=1e-6)
    cfg = CausalMMConfig(method="agla", params={"matcher": "self", "keep": 0.5})
    res = cm.with_config(cfg).generate(images[0], Q, max_new_tokens=2, return_branch_logits=True)
    local = local_image(images[0], keep_mask(att_map(got, SIDE), 0.5))
    assert (np.asarray(local).sum(-1) > 0).mean() == pytest.approx(0.5, abs=0.01)
    enc_local = cm.adapter.encode(local, Q)
    with torch.no_grad():
        stock = cm.model(**enc_local).logits[0, -1].float()
    assert torch.allclose(res.branch_logits["local"][0], stock, atol=1e-4)
    with pytest.raises(ConfigError, match="keep is matcher=self's setting and does not apply"):
        cm.with_config(CausalMMConfig(method="agla", params={"matcher": "some/blip-folder", "keep": 0.5}))
    with pytest.raises(ConfigError, match="gradcam_layer is the BLIP matcher's setting"):
        cm.with_config(CausalMMConfig(method="agla", params={"matcher": "self", "gradcam_layer": 3}))
    for family in ALL_FAMILIES:  # the first family whose image tokens are no square grid is refused
        other = any_family(family)
        count = int(torch.isin(other.adapter.encode(images[1], Q)["input_ids"][0], other.adapter.image_token_ids).sum())
        if math.isqrt(count) ** 2 != count:
            with pytest.raises(UnsupportedModelError, match="as one square grid"):
                other.with_config(CausalMMConfig(method="agla", params={"matcher": "self"})).generate(
                    images[1], Q, max_new_tokens=1
                )
            break
    else:
        pytest.fail("every tiny family gives a square number of image tokens")
