"""Prefix reuse: questions sharing an image prefill the image prefix once, with outputs unchanged.

The reference is the same engine with ``reuse_prefix=False`` (every row prefilled in full), and each prompt run
alone (a batch of one shares nothing, so that is the reference path too).
"""

import pytest
import torch

from causalmm import CausalMMConfig
from causalmm.tiny import FAMILIES

PROMPTS = [
    "Is there a cat in the image?",
    "Describe the image.",
    "Is there a dog in the image?",
    "Is there a dog?",
    "What color is the object?",
    "Is there a cat in the image? Answer yes or no.",
]

CONFIGS = {
    "regular": CausalMMConfig(method="regular"),
    "vision": CausalMMConfig(mode="vision", vision_layers="all"),
    "language": CausalMMConfig(mode="language", language_layers="all"),
    "multimodal": CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all"),
    "vcd": CausalMMConfig(method="vcd"),
    "multimodal-k2": CausalMMConfig(mode="multimodal", vision_layers="all", language_layers="all", num_cf_samples=2),
    "legacy": CausalMMConfig(mode="multimodal", language_layers="all", legacy=True),
}


def _batch(images):
    """Three questions on image 0 (one through an equal-pixel copy), two on image 1, one on image 2, mixed."""
    copy0 = images[0].copy()
    return [images[0], images[1], copy0, images[0], images[2], images[1]], PROMPTS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reuse_gives_the_reference_tokens_and_logits(family, name, loaded, images):
    cm = loaded(family)
    cfg = CONFIGS[name]
    reuse, ref = cm.with_config(cfg, reuse_prefix=True), cm.with_config(cfg, reuse_prefix=False)
    assert reuse.engine.prefix_reuse and not ref.engine.prefix_reuse
    imgs, prompts = _batch(images)
    # one seed for all (vision/noise rows of one image share too) and per-sample seeds (as `causalmm eval` runs)
    for seeds in ([7] * 6, [11, 12, 13, 14, 15, 16]):
        kw = dict(max_new_tokens=5, seeds=seeds, return_branch_logits=True)
        got = reuse.generate(imgs, prompts, **kw)
        stats = reuse.engine.prefill_stats
        want = ref.generate(imgs, prompts, **kw)
        # factual rows of image 0 (3 prompts) and image 1 (2 prompts) reused a prefix
        assert stats["groups"] >= 2 and stats["shared_rows"] >= 5, stats
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids
            assert g.branch_logits.keys() == w.branch_logits.keys()
            for key in w.branch_logits:
                assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-4), key
        for img, prompt, seed, g in zip(imgs, prompts, seeds, got, strict=True):
            alone = reuse.generate([img], [prompt], max_new_tokens=5, seeds=[seed])[0]
            assert alone.token_ids == g.token_ids


def _count_llm_tokens(cm):
    """Tokens through the LLM's input embedding (every prefilled or decoded position, padding included)."""
    seen = []
    handle = cm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen, handle


def _common_prefix(seqs):
    n = 0
    while all(len(s) > n + 1 for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_prefix_is_prefilled_once(family, loaded, images):
    """Six questions on one image: the LLM prefills the image prefix (up to the last image token) once plus six
    suffixes, where the reference prefills six whole prompts."""
    cm = loaded(family)
    cfg = CausalMMConfig(method="regular")
    imgs, prompts = [images[1]] * 6, PROMPTS
    ids = [cm.adapter.encode(images[1], p)["input_ids"][0].tolist() for p in prompts]
    image_token = cm.model.config.image_token_id
    prefix = max(i for i, t in enumerate(ids[0]) if t == image_token) + 1
    assert prefix <= _common_prefix(ids)
    counts = {}
    for reuse in (False, True):
        seen, handle = _count_llm_tokens(cm)
        try:
            res = cm.with_config(cfg, reuse_prefix=reuse).generate(imgs, prompts, max_new_tokens=1)
        finally:
            handle.remove()
        counts[reuse] = (sum(seen), [r.token_ids for r in res])
    assert counts[False][0] == 6 * max(map(len, ids))
    assert counts[True][0] == prefix + 6 * max(len(s) - prefix for s in ids)
    assert counts[True][0] < counts[False][0] - 4 * prefix
    assert counts[True][1] == counts[False][1]


def test_the_vision_tower_runs_once_per_distinct_image(loaded, images):
    """LLaVA runs one tower row per image: equal images (same object or equal pixels) are encoded once."""
    cm = loaded("llava")
    rows = []
    hook = cm.adapter.tower.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True
    )
    imgs, prompts = _batch(images)
    try:
        for reuse in (False, True):
            rows.clear()
            cm.with_config(CausalMMConfig(method="regular"), reuse_prefix=reuse).generate(
                imgs, prompts, max_new_tokens=1
            )
            assert sum(rows) == (3 if reuse else 6)
    finally:
        hook.remove()


def test_rows_that_share_nothing_take_the_reference_path(loaded, images):
    """Different images only: nothing is shared, so the reference prefill runs (no split forward)."""
    cm = loaded("llava").with_config(CausalMMConfig(mode="multimodal", language_layers="all"), reuse_prefix=True)
    seen, handle = _count_llm_tokens(cm)
    try:
        cm.generate(images, PROMPTS[:3], max_new_tokens=1, seeds=[1, 2, 3])
    finally:
        handle.remove()
    assert cm.engine.prefill_stats["shared_rows"] == 0
    assert len(seen) == 1  # one prefill forward, as the reference path


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["vision", "language", "vcd", "multimodal-k2"])
def test_image_seeds_let_counterfactual_image_rows_share_the_prefix(family, name, loaded, images):
    """Per-sample seeds, one image seed per image (as `causalmm eval` runs): the vision/noise rows of the
    questions on one image share their features and their prefix, the language rows their prefix (its draws
    follow the image seed), and every output is the reference's and
    the one each sample gets alone."""
    cm = loaded(family)
    cfg = CONFIGS[name]
    reuse, ref = cm.with_config(cfg, reuse_prefix=True), cm.with_config(cfg, reuse_prefix=False)
    imgs, prompts = _batch(images)
    seeds = [11, 12, 13, 14, 15, 16]
    image_seeds = [100, 101, 100, 100, 102, 101]  # one per image (the copy of image 0 has equal pixels)
    kw = dict(max_new_tokens=4, seeds=seeds, image_seeds=image_seeds, return_branch_logits=True)
    got = reuse.generate(imgs, prompts, **kw)
    shared = reuse.engine.prefill_stats["shared_rows"]
    reuse.generate(imgs, prompts, max_new_tokens=4, seeds=seeds)  # image seeds = sample seeds
    assert shared > reuse.engine.prefill_stats["shared_rows"]  # the counterfactual image rows joined groups
    want = ref.generate(imgs, prompts, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for key in w.branch_logits:
            assert torch.allclose(g.branch_logits[key], w.branch_logits[key], atol=1e-4), key
    for i in (0, 4):
        one = dict(max_new_tokens=4, seeds=seeds[i : i + 1], image_seeds=image_seeds[i : i + 1])
        assert reuse.generate([imgs[i]], [prompts[i]], **one)[0].token_ids == got[i].token_ids
    # the image seed is what the image-side draws follow: another one changes the counterfactual branch
    one = dict(max_new_tokens=4, seeds=seeds[:1], image_seeds=[999], return_branch_logits=True)
    other = reuse.generate(imgs[:1], prompts[:1], **one)[0].branch_logits
    branch = next(k for k in got[0].branch_logits if k not in ("factual", "combined"))
    assert not torch.allclose(other[branch], got[0].branch_logits[branch])


@pytest.mark.parametrize("family", FAMILIES)
def test_language_rows_prefill_the_image_prefix_once_per_image_seed(family, loaded, images):
    """Six questions on one image, one image seed, six sample seeds: the intervened layers see the image prefix
    twice (the factual group and the language group) plus twelve suffixes, where the reference sees twelve
    whole prompts; with six image seeds the language rows cannot share it."""
    cm = loaded(family)
    cfg = CausalMMConfig(mode="language", language_layers="all")
    imgs, prompts = [images[1]] * 6, PROMPTS
    ids = [cm.adapter.encode(images[1], p)["input_ids"][0].tolist() for p in prompts]
    image_token = cm.model.config.image_token_id
    prefix = max(i for i, t in enumerate(ids[0]) if t == image_token) + 1
    suffix = max(len(s) - prefix for s in ids)
    seeds = [11, 12, 13, 14, 15, 16]
    seen = []
    handle = cm.adapter.lm_layers[-1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args or (kwargs["hidden_states"],))[0].shape[:2].numel()),
        with_kwargs=True,
    )
    counts, outs = {}, {}
    try:
        for reuse, image_seeds in ((False, [100] * 6), (True, [100] * 6), (True, seeds)):
            seen.clear()
            run = cm.with_config(cfg, reuse_prefix=reuse)
            res = run.generate(imgs, prompts, max_new_tokens=1, seeds=seeds, image_seeds=image_seeds)
            counts[reuse, image_seeds[0]] = sum(seen)
            outs[reuse, image_seeds[0]] = [r.token_ids for r in res]
    finally:
        handle.remove()
    assert counts[False, 100] == 12 * max(map(len, ids))
    assert counts[True, 100] == 2 * prefix + 12 * suffix
    assert counts[True, 11] > prefix + 6 * suffix + 6 * max(map(len, ids)) - 1  # language rows: whole prompts
    assert outs[True, 100] == outs[False, 100]
