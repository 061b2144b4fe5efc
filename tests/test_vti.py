"""VTI: its fit (masks, the official rank-1 PCA, the tower's and the LLM's directions against the model's own hidden
states), its shift against the official ``VTILayer`` formula on a real tiny model, every family (the neutral
setting is regular decoding token for token, greedy and beams; answers do not depend on the batch), the file that
names its model, and ``causalmm fit vti`` as a user runs it."""

import doctest
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import causalmm.fit.vti
from causalmm import CausalMMConfig, ConfigError
from causalmm.errors import InputError, UnsupportedModelError
from causalmm.fit.store import load_fitted, save_fitted
from causalmm.fit.vti import fit_vti, mask_patches, pca_direction, read_demos
from causalmm.interventions import shift
from causalmm.tiny import ALL_FAMILIES

Q = "Is there a cat in the image? Answer yes or no."


@pytest.fixture(scope="module")
def demo_file(vti_demos):
    """Three demos on textured images of the size of the test image (48 x 40), in the official format."""
    return vti_demos


def _official_layer(x: torch.Tensor, d: torch.Tensor, lam: float) -> torch.Tensor:
    """``VTILayer.forward`` of the official code for one direction (``vti_utils/llm_layers.py``)."""
    norm = torch.norm(x.float(), dim=-1).unsqueeze(-1)
    y = lam * F.normalize(d, dim=-1)
    return (F.normalize(F.normalize(x.float(), dim=-1) + 0.1 * y, dim=-1) * norm).to(x.dtype)


def _official_pca_direction(x: torch.Tensor) -> torch.Tensor:
    """``obtain_textual_vti``'s direction: its ``PCA(n_components=1)`` (``vti_utils/pca.py``, ``svd_flip``
    included), ``components_.sum(dim=1) + mean_``, averaged over the leading dimension."""
    x = x.unsqueeze(0)
    mean = x.mean(1, keepdim=True)
    u, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    cols = torch.argmax(torch.abs(u), 1).unsqueeze(-1)
    signs = torch.sign(torch.gather(u, 1, cols))
    vh = vh * signs.view(vh.shape[0], -1, 1)
    return (vh[:, :1].sum(dim=1, keepdim=True) + mean).mean(0).view(-1)


def test_docstring_examples_hold():
    assert doctest.testmod(causalmm.fit.vti).failed == 0


def test_shift_is_the_official_layer_and_keeps_norms():
    g = torch.Generator().manual_seed(0)
    m, d = torch.randn(2, 5, 16, generator=g), torch.randn(16, generator=g)
    for alpha in (0.3, 0.9, 4.0):
        out = shift(m, d, 0.1 * alpha)
        assert torch.allclose(out, _official_layer(m, d, alpha), atol=1e-6)
        assert torch.allclose(out.norm(dim=-1), m.norm(dim=-1), atol=1e-5)
        assert (F.cosine_similarity(out, d.expand_as(out), -1) > F.cosine_similarity(m, d.expand_as(m), -1)).all()
    assert shift(m, d, 0.0) is m
    per_token = torch.randn(5, 16, generator=g)  # the tower's: one direction per token
    assert torch.allclose(shift(m, per_token, 0.09), _official_layer(m, per_token, 0.9), atol=1e-6)


def test_masks_cover_the_official_share_with_the_images_channel_means():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 30, 28, generator=g)  # two crops; 28 / 14 = 2 columns, 30 // 14 = 2 rows
    out = mask_patches(pixels, 14, 0.75, torch.Generator().manual_seed(1))
    assert out.shape == pixels.shape and torch.equal(out[:, :, 28:], pixels[:, :, 28:])  # beyond the last patch
    for c in range(2):
        mean = pixels[c].mean(dim=(1, 2))
        masked = [(i, j) for i in range(2) for j in range(2)
                  if torch.allclose(out[c, :, 14 * i : 14 * i + 14, 14 * j : 14 * j + 14],
                                    mean[:, None, None].expand(3, 14, 14))]  # fmt: skip
        assert len(masked) == int(0.75 * 4)
        kept = {(i, j) for i in range(2) for j in range(2)} - set(masked)
        for i, j in kept:
            block = (slice(None), slice(14 * i, 14 * i + 14), slice(14 * j, 14 * j + 14))
            assert torch.equal(out[c][block], pixels[c][block])
    again = mask_patches(pixels, 14, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded


def test_pca_direction_is_the_official_one():
    g = torch.Generator().manual_seed(2)
    for n, f in ((2, 5), (5, 7), (9, 3)):
        x = torch.randn(n, f, generator=g) + torch.randn(f, generator=g)
        assert torch.allclose(pca_direction(x), _official_pca_direction(x), atol=1e-5)
    one = torch.randn(1, 4, generator=g)
    assert torch.equal(pca_direction(one), one[0])


def test_the_fit_is_the_models_own_states(loaded, demo_file):
    """One demo, one trial: the vision direction is the stock tower's hidden states on the masked image minus the
    clean one's (the same mask drawn), and the text direction the model's own last-token hidden states with the
    caption minus with the hallucinated one (two demos: their mean plus the official PCA axis)."""
    cm = loaded("llava")
    demos = read_demos(demo_file)
    fit = fit_vti(cm.adapter, demos, n_demos=1, trials=1, alpha_image=0.0, seed=7)
    demo = random.Random(7).sample(demos, 1)[0]
    clean = cm.adapter.image_inputs(cm.adapter.encode(Image.open(demo.image), demo.question))["pixel_values"]
    patch = cm.model.config.vision_config.patch_size
    masked = mask_patches(clean, patch, 0.99, torch.Generator().manual_seed(7))
    tower = cm.model.model.vision_tower
    with torch.no_grad():
        h_clean = tower(clean, output_hidden_states=True).hidden_states[1:]
        h_masked = tower(masked, output_hidden_states=True).hidden_states[1:]
    want = torch.stack([(a - b)[0] for a, b in zip(h_masked, h_clean, strict=True)])
    got = fit.tensors["vision"]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert fit.meta["tokens"] == str(want.shape[1]) and fit.meta["alpha_image_at_fit"] == "0.0"

    two = fit_vti(cm.adapter, demos, n_demos=2, trials=1, vision=False, seed=3)
    diffs = []
    for d in random.Random(3).sample(demos, 2):
        states = []
        for caption in (d.value, d.h_value):
            enc = cm.adapter.encode(Image.open(d.image), d.question, answer=caption)
            with torch.no_grad():
                out = cm.model(**enc, output_hidden_states=True)
            states.append(torch.stack([h[0, -1] for h in out.hidden_states]))
        diffs.append((states[0] - states[1]).flatten())
    want = _official_pca_direction(torch.stack(diffs)).view(cm.adapter.n_language_layers + 1, -1)[1:]
    assert "vision" not in two.tensors and torch.allclose(two.tensors["text"], want, atol=1e-4)


def test_the_text_fit_sees_the_shifted_tower(loaded, demo_file):
    cm = loaded("llava")
    demos = read_demos(demo_file)
    plain = fit_vti(cm.adapter, demos, n_demos=2, trials=2, alpha_image=0.0)
    shifted = fit_vti(cm.adapter, demos, n_demos=2, trials=2, alpha_image=5.0)
    assert torch.equal(plain.tensors["vision"], shifted.tensors["vision"])
    assert (plain.tensors["text"] - shifted.tensors["text"]).abs().max() > 1e-4


def _fitted(cm, demo_file, tmp_path, vision=True):
    fit = fit_vti(cm.adapter, read_demos(demo_file), n_demos=2, trials=2, vision=vision)
    return str(save_fitted(fit, tmp_path / "vti.safetensors"))


def test_the_shift_is_the_official_one_on_a_model(loaded, images, demo_file, tmp_path):
    """The factual first-token logits under VTI equal the stock model's with the official ``VTILayer`` wrapped
    around every MLP of the LLM (the text direction) and of the tower (the per-token direction)."""
    cm = loaded("llava")
    path = _fitted(cm, demo_file, tmp_path)
    fit = load_fitted(path)
    cfg = CausalMMConfig(method="vti", params={"vectors": path, "alpha_text": 2.0, "alpha_image": 3.0})
    got = cm.with_config(cfg).generate(images[0], Q, max_new_tokens=2, return_branch_logits=True)
    handles = []

    def wrap(d, lam):
        return lambda module, args, out: _official_layer(out, d, lam)

    for layer, mlp in enumerate(cm.adapter.sites.lm_mlps):
        handles.append(mlp.register_forward_hook(wrap(fit.tensors["text"][layer], 2.0)))
    for layer, mlp in enumerate(cm.adapter.sites.vision_mlps):
        handles.append(mlp.register_forward_hook(wrap(fit.tensors["vision"][layer], 3.0)))
    try:
        enc = cm.adapter.encode(images[0], Q)
        with torch.no_grad():
            want = cm.model(**enc).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got.branch_logits["factual"][0], want, atol=1e-4)
    plain = cm.generate(images[0], Q, max_new_tokens=2, return_branch_logits=True)
    assert (plain.branch_logits["factual"][0] - want).abs().max() > 1e-3  # the shift moved the logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_vti_on_every_family(family, any_family, images, demo_file, tmp_path):
    """Fitted on the family's tiny model (the tower's directions too, where the tower is not one packed sequence):
    the neutral setting is regular decoding token for token (greedy and beams), a shift changes the answer's
    logits, and an answer does not depend on the batch it ran in."""
    cm = any_family(family)
    vision = not cm.adapter.packed
    try:
        path = _fitted(cm, demo_file, tmp_path, vision=vision)
    except UnsupportedModelError as err:  # a tower that packs a batch's images into one sequence (Pixtral's)
        assert "packs a batch's images into one sequence" in str(err), err
        vision = False
        path = _fitted(cm, demo_file, tmp_path, vision=False)
    same_size = images[0].copy()
    imgs, prompts = [images[0], same_size], [Q, "Describe the image."]
    on = CausalMMConfig(method="vti", params={"vectors": path, "alpha_text": 3.0, "alpha_image": 3.0 if vision else 0})
    off = CausalMMConfig(method="vti", params={"vectors": path, "alpha_text": 0.0, "alpha_image": 0.0})
    regular = cm.generate(imgs, prompts, max_new_tokens=4, return_branch_logits=True)
    shifted = cm.with_config(on).generate(imgs, prompts, max_new_tokens=4, return_branch_logits=True)
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, max_new_tokens=4)] == [
        r.token_ids for r in regular
    ]
    assert (shifted[0].branch_logits["factual"][0] - regular[0].branch_logits["factual"][0]).abs().max() > 1e-4
    alone = cm.with_config(on).generate(imgs[1], prompts[1], max_new_tokens=4, return_branch_logits=True)
    assert alone.token_ids == shifted[1].token_ids
    assert torch.allclose(alone.branch_logits["factual"], shifted[1].branch_logits["factual"], atol=1e-4)
    beams = {"max_new_tokens": 4, "num_beams": 3}
    assert [r.token_ids for r in cm.with_config(off).generate(imgs, prompts, **beams)] == [
        r.token_ids for r in cm.generate(imgs, prompts, **beams)
    ]


def test_bad_fits_and_settings_are_refused_in_one_line(loaded, images, demo_file, tmp_path, model_dirs):
    cm = loaded("llava")
    with pytest.raises(ConfigError, match="vti needs its fitted directions: write them with `causalmm fit vti"):
        cm.with_config(CausalMMConfig(method="vti"))
    with pytest.raises(ConfigError, match="does not exist"):
        cm.with_config(CausalMMConfig(method="vti", params={"vectors": str(tmp_path / "none.safetensors")}))
    text_only = _fitted(cm, demo_file, tmp_path, vision=False)
    with pytest.raises(ConfigError, match="holds no vision directions"):
        cm.with_config(CausalMMConfig(method="vti", params={"vectors": text_only}))
    cm.with_config(CausalMMConfig(method="vti", params={"vectors": text_only, "alpha_image": 0.0}))  # accepted
    other = loaded("qwen2_vl")
    with pytest.raises(ConfigError, match="was fitted on the model .* not on this one"):
        other.with_config(CausalMMConfig(method="vti", params={"vectors": text_only, "alpha_image": 0.0}))
    with pytest.raises(UnsupportedModelError, match="packs every image's tokens"):
        fit_vti(other.adapter, read_demos(demo_file), n_demos=1, trials=1)
    with pytest.raises(ConfigError, match="alpha_text=11.0"):
        CausalMMConfig(method="vti", params={"alpha_text": 11.0})
    with pytest.raises(ConfigError, match="mask_ratio=1"):
        fit_vti(cm.adapter, read_demos(demo_file), mask_ratio=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "d0.png", "value": "x"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1 has no h_value"):
        read_demos(bad, demo_file.parent)
    bad.write_text('{"image": "missing.png", "value": "x", "h_value": "y"}\n')
    with pytest.raises(InputError, match="missing.png does not exist; give the folder of the demo images"):
        read_demos(bad, demo_file.parent)
    not_fit = tmp_path / "plain.safetensors"
    not_fit.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be read as safetensors"):
        cm.with_config(CausalMMConfig(method="vti", params={"vectors": str(not_fit)}))
    # a fit whose tower directions were made for another token count: said when the tower runs
    path = _fitted(cm, demo_file, tmp_path)
    fit = load_fitted(path)
    fit.tensors["vision"] = fit.tensors["vision"][:, :-1]
    short = str(save_fitted(fit, tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match="fitted for .* tokens"):
        cm.with_config(CausalMMConfig(method="vti", params={"vectors": short})).generate(images[0], Q, max_new_tokens=1)


def test_cli_fits_and_decodes(model_dirs, image_file, demo_file, tmp_path, causalmm_cli):
    out = tmp_path / "vti.safetensors"
    proc = causalmm_cli("fit", "vti", "--model", model_dirs["llava"], "--demos", demo_file, "--out", out,
                        "--n-demos", "2", "--trials", "2")  # fmt: skip
    assert f"wrote {out}" in " ".join(proc.stdout.split()) and out.is_file()
    assert load_fitted(out).meta["model"] == str(model_dirs["llava"])
    gen = causalmm_cli("generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q,
                       "--method", "vti", "--param", f"vectors={out}", "--max-new-tokens", "3")  # fmt: skip
    assert gen.stdout.strip()
    for args, message in (
        (["--out", demo_file], "must end in .safetensors"),
        (["--out", tmp_path / "x.safetensors", "--mask-ratio", "1.5"], "--mask-ratio 1.5 is out of range"),
        (["--out", tmp_path / "x.safetensors", "--trials", "0"], "--trials 0 is out of range"),
    ):
        proc = causalmm_cli("fit", "vti", "--model", model_dirs["llava"], "--demos", demo_file, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = causalmm_cli("generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q,
                        "--method", "vti", check=False)  # fmt: skip
    assert proc.returncode == 2 and "causalmm fit vti" in proc.stderr and "Traceback" not in proc.stderr
