"""The toy world: determinism, the priors measured on generated data, POPE's split construction, and the
written splits loading through the real benchmark loaders."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from causalmm.benchmarks import get_benchmark
from causalmm.benchmarks.base import check_images
from causalmm.benchmarks.coco_objects import caption_objects
from causalmm.toyworld import (
    SPECIAL_TOKENS,
    WorldConfig,
    ask_probabilities,
    caption,
    chair_categories,
    eval_scenes,
    pope_questions,
    render,
    sample_scene,
    split_words,
    train_sample,
    train_statistics,
    vlind_instances,
    vocabulary,
    write_splits,
)

CFG = WorldConfig()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def text_samples():
    return [train_sample(CFG, i, render_image=False) for i in range(1200)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    paths = write_splits(root / "a", CFG, n_images_val=10, n_images_test=8, vlind_per_prior=1, vlind_images=2)
    again = write_splits(root / "b", CFG, n_images_val=10, n_images_test=8, vlind_per_prior=1, vlind_images=2)
    return root, paths, again


# -- config and determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"favoured": ("dragon",)},
        {"cooccurrence": (("cup", "cup"),)},
        {"colour_prior": (("apple", "orange"),)},
        {"language_prior": 1.0},
        {"object_size": (20, 30)},
        {"objects": ("Apple", "b", "c", "d", "e", "f")},
    ],
)
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="invalid WorldConfig"):
        WorldConfig(**bad)


def test_same_seed_same_images_and_texts_other_seed_differs():
    other = WorldConfig(seed=1)
    for i in range(12):
        a, b = train_sample(CFG, i), train_sample(CFG, i)
        assert a.scene == b.scene and a.turns == b.turns
        assert png(a.image) == png(b.image)
        assert a.image.size == (CFG.image_size, CFG.image_size) and a.image.mode == "RGB"
    differ = sum(png(train_sample(CFG, i).image) != png(train_sample(other, i).image) for i in range(12))
    assert differ == 12
    texts = sum(train_sample(CFG, i).turns != train_sample(other, i).turns for i in range(12))
    assert texts >= 10
    # text options do not move pixels; eval streams are separate from training
    chatty = WorldConfig(statement_rate=0.9, caption_p=0.01)
    assert png(train_sample(chatty, 3).image) == png(train_sample(CFG, 3).image)
    assert sum(train_sample(chatty, i).turns != train_sample(CFG, i).turns for i in range(12)) >= 8
    assert eval_scenes(CFG, "val", 5) == eval_scenes(CFG, "val", 5) != eval_scenes(CFG, "test", 5)


def test_render_draws_every_glyph_without_overlap():
    for i in range(50):
        scene = sample_scene(CFG, "train", i)
        assert len(scene.items) == sum(c for _, c in scene.objects.values())
        for k, a in enumerate(scene.items):
            assert 0 < a.x and a.x + a.size < CFG.image_size and 0 < a.y and a.y + a.size < CFG.image_size
            for b in scene.items[k + 1 :]:
                assert a.x + a.size < b.x or b.x + b.size < a.x or a.y + a.size < b.y or b.y + b.size < a.y
    pixels = np.asarray(render(CFG, sample_scene(CFG, "train", 0)), dtype=int)
    assert pixels.std() > 20  # glyphs on a background, not a blank


# -- the priors, measured ---------------------------------------------------------------------------------
def test_language_prior_and_answer_balance_in_training_text(text_samples):
    turns = [t for s in text_samples for t in s.turns]
    exist = [t for t in turns if t.kind in ("exist", "exist_statement")]
    fav = [t.truth for t in exist if t.object in CFG.favoured]
    rest = [t.truth for t in exist if t.object not in CFG.favoured]
    assert abs(np.mean(fav) - CFG.language_prior) < 0.03  # favoured objects: "yes" 90% of the time
    assert np.mean(rest) < 0.45
    assert abs(np.mean([t.truth for t in exist]) - CFG.yes_rate) < 0.03  # balanced overall
    questions = [t.answer for t in turns if t.kind == "exist"]
    assert abs(questions.count("yes") / len(questions) - 0.5) < 0.03
    statements = [t.answer for t in turns if t.kind.endswith("statement")]
    assert abs(statements.count("true") / len(statements) - 0.5) < 0.05
    # dense supervision: every present object is asked, several existence turns per image
    qa = [s for s in text_samples if s.turns[0].kind != "caption"]
    assert abs(1 - len(qa) / len(text_samples) - CFG.caption_p) < 0.03
    assert len(exist) / len(qa) > 4
    for s in text_samples[:200]:
        kinds = [t.kind for t in s.turns]
        if kinds == ["caption"]:  # caption-only samples; no caption beside questions (it gives answers away)
            continue
        assert "caption" not in kinds
        asked = {t.object for t in s.turns if t.kind.startswith("exist")}
        assert s.scene.present <= asked
        last_exist = max((k for k, t in enumerate(kinds) if t.startswith("exist")), default=-1)
        assert all(not t.startswith("exist") for t in kinds[last_exist + 1 :])


def test_ask_probabilities_follow_the_config():
    ask = ask_probabilities(CFG)
    assert all(p == 1.0 for p, _ in ask.values())
    assert all(ask[f][1] < 0.15 for f in CFG.favoured)
    assert all(ask[o][1] > 0.3 for o in CFG.objects if o not in CFG.favoured)
    with pytest.raises(ValueError, match="out of reach"):
        ask_probabilities(WorldConfig(yes_rate=0.05, language_prior=0.99))


def test_cooccurrence_colour_and_frequency_priors():
    stats = train_statistics(CFG)
    for a, b in CFG.cooccurrence:
        assert abs(stats.cooccurrence[(a, b)] / stats.frequency[a] - CFG.cooccurrence_p) < 0.03
    # the favoured objects are the most frequent ones (POPE's popular negatives)
    assert set(stats.popular()[: len(CFG.favoured)]) == set(CFG.favoured)
    scenes = [sample_scene(CFG, "val", i, layout=False, evaluation=True) for i in range(3000)]
    for a, b in CFG.cooccurrence:
        with_a = [s for s in scenes if a in s.objects]
        assert abs(np.mean([b in s.objects for s in with_a]) - CFG.eval_cooccurrence_p) < 0.06
    train = [sample_scene(CFG, "train", i, layout=False) for i in range(3000)]
    for name, colour in CFG.colour_prior:
        colours = [s.colour(name) for s in train if name in s.objects]
        assert abs(colours.count(colour) / len(colours) - CFG.colour_prior_p) < 0.04
    free = [s.colour("apple") for s in train if "apple" in s.objects]
    assert max(Counter(free).values()) / len(free) < 0.25  # no colour prior on the others


# -- POPE -----------------------------------------------------------------------------------------------
def test_pope_construction():
    scenes = eval_scenes(CFG, "val", 400)
    names = [f"{i}.png" for i in range(len(scenes))]
    q = pope_questions(CFG, "val", scenes, names)
    stats = train_statistics(CFG)
    k = CFG.pope_positives
    assert all(len(s.objects) >= k for s in scenes)
    for variant in ("random", "popular", "adversarial"):
        lines = q[variant]
        assert [x["question_id"] for x in lines] == list(range(1, len(lines) + 1))
        assert len(lines) == 2 * k * len(scenes)
        assert [x["label"] for x in lines] == ["yes", "no"] * (k * len(scenes))
        for i, scene in enumerate(scenes):
            part = lines[2 * k * i : 2 * k * (i + 1)]
            assert {x["image"] for x in part} == {names[i]}
            objects = [x["object"] for x in part]
            assert len(set(objects)) == 2 * k
            assert all((x["object"] in scene.objects) == (x["label"] == "yes") for x in part)
            assert all(x["text"] == f"Is there {'an' if x['object'][0] in 'aeiou' else 'a'} {x['object']} in the image?"
                       for x in part)  # fmt: skip
            positives, negatives = objects[0::2], objects[1::2]
            assert positives == [x["object"] for x in q["random"][2 * k * i : 2 * k * (i + 1) : 2]]
            absent = [o for o in stats.popular() if o not in scene.objects]
            if variant == "popular":
                assert negatives == absent[:k]
            if variant == "adversarial":
                for pos, neg in zip(positives, negatives, strict=True):
                    left = [o for o in absent if o not in negatives[: negatives.index(neg)]]
                    best = max(stats.cooccurrence[(pos, o)] for o in left)
                    assert stats.cooccurrence[(pos, neg)] == best
            for x in part:
                assert x["favoured"] == (x["object"] in CFG.favoured)
                assert x["partner"] == (x["object"] in CFG.partners(scene.present))
    # random negatives: uniform over each image's absent objects
    observed = Counter(x["object"] for x in q["random"] if x["label"] == "no")
    expected = Counter()
    for scene in scenes:
        absent = [o for o in CFG.objects if o not in scene.objects]
        for o in absent:
            expected[o] += k / len(absent)
    for o in CFG.objects:
        assert abs(observed[o] - expected[o]) < 4 * np.sqrt(expected[o]), (o, observed[o], expected[o])
    # popular and adversarial negatives lean on the prior-favoured objects far more than random ones
    share = {v: np.mean([x["favoured"] for x in q[v] if x["label"] == "no"]) for v in ("random", "popular")}
    assert share["popular"] > share["random"] + 0.15
    assert len(q["all"]) == len(CFG.objects) * len(scenes)


# -- written splits ---------------------------------------------------------------------------------------
def test_written_splits_load_with_the_benchmark_loaders(written):
    root, paths, _ = written
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["config"]["seed"] == CFG.seed and set(manifest["splits"]) == {"val", "test"}
    pope = get_benchmark("pope")
    for split, n in (("val", 10), ("test", 8)):
        for variant in ("random", "popular", "adversarial", "all"):
            samples = pope.load(paths[f"{split}/pope_{variant}"], paths[f"{split}/images"])
            check_images(samples, paths[f"{split}/images"], paths[f"{split}/pope_{variant}"])
            assert len(samples) == (10 if variant == "all" else 6) * n
            st = manifest["splits"][split]["pope"][variant]
            assert st["n_questions"] == len(samples)
            if variant != "all":
                assert st["yes_fraction"] == 0.5
            assert sum(st["negatives"].values()) == sum(s.meta["label"] == "no" for s in samples)
        vl = get_benchmark("vlind").load(paths[f"{split}/vlind"], None)
        check_images(vl, None, paths[f"{split}/vlind"])
        n_inst = len(CFG.favoured) + len(CFG.cooccurrence) + len(CFG.colour_prior)
        assert len(vl) == n_inst * (6 + 2 * 2)
        chair = get_benchmark("chair", annotations=str(paths[f"{split}/chair_annotations"]))
        cs = chair.load(paths[f"{split}/chair_images"], paths[f"{split}/images"])
        check_images(cs, paths[f"{split}/images"], paths[f"{split}/chair_images"])
        assert len(cs) == n
        scenes = eval_scenes(CFG, split, n)
        for sample, scene in zip(cs, scenes, strict=True):
            gt = chair.parse({"id": sample.id, "text": caption(CFG, scene), **sample.meta})
            assert gt["hallucinated"] == [] and set(gt["gt_objects"]) == set(scene.objects)
            wrong = next(o for o in CFG.objects if o not in scene.objects)
            bad = chair.parse({"id": sample.id, "text": f"There is a {wrong}.", **sample.meta})
            assert bad["hallucinated"] == [wrong]
    assert "val/chair_images" in paths and manifest["splits"]["val"]["chair"]["categories"]["tv"] == "tv"


def test_written_splits_are_deterministic(written):
    root, paths, again = written
    files = sorted(p.relative_to(root / "a") for p in (root / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root / "b") for p in (root / "b").rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "splits.json":  # the manifest names its own folder
            assert (root / "a" / rel).read_bytes() == (root / "b" / rel).read_bytes(), rel
    other = write_splits(root / "c", WorldConfig(seed=7), n_images_val=2, n_images_test=1, vlind_per_prior=1)
    first = sorted(paths["val/images"].iterdir())[0]
    assert (other["val/images"] / first.name).read_bytes() != first.read_bytes()


def test_vlind_counterfactual_images_break_the_priors():
    for inst, fact, cfs in vlind_instances(CFG, "test", per_prior=2, n_images=3):
        name, kind = inst["concept"], inst["toyworld_prior"]
        noun_of = {f"{'an' if o[0] in 'aeiou' else 'a'} {o}": o for o in CFG.objects}
        assert noun_of[inst["existent_noun"]] in cfs[0].objects
        assert noun_of[inst["non-existent_noun"]] not in cfs[0].objects
        if kind == "language":
            assert name in CFG.favoured and name in fact.objects
            assert all(name not in cf.objects for cf in cfs)
        elif kind == "cooccurrence":
            anchor = dict((b, a) for a, b in CFG.cooccurrence)[name]
            assert {anchor, name} <= fact.present
            assert all(anchor in cf.objects and name not in cf.objects for cf in cfs)
        else:
            prior = dict(CFG.colour_prior)[name]
            assert fact.colour(name) == prior and inst["false_statement"] == f"The {name} is {prior}."
            assert all(cf.colour(name) != prior for cf in cfs)
            assert inst["true_statement"] == f"The {name} is {cfs[0].colour(name)}."


# -- vocabulary and CHAIR's reading -------------------------------------------------------------------------
def test_vocabulary_covers_every_text(text_samples, written):
    _, paths, _ = written
    vocab = vocabulary(CFG)
    assert vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and len(set(vocab)) == len(vocab)
    known = set(vocab)
    texts = [t.prompt + " " + t.answer for s in text_samples for t in s.turns]
    texts += [s.prompt for s in get_benchmark("pope").load(paths["val/pope_random"], None)]
    texts += [s.prompt for s in get_benchmark("vlind").load(paths["val/vlind"], None)]
    texts += [s.prompt for s in get_benchmark("vlind", prompts="instructblip").load(paths["val/vlind"], None)]
    texts += ["USER: <image>\nIs there a cup? ASSISTANT: yes"]
    missing = {w for t in texts for w in split_words(t)} - known
    assert not missing
    assert split_words("Is there an apple?") == ["is", "there", "an", "apple", "?"]


def test_chair_reads_the_default_vocabulary_and_refuses_a_custom_one(tmp_path):
    cats, why = chair_categories(CFG)
    assert why is None and set(cats) == set(CFG.objects)
    for i in range(30):
        scene = sample_scene(CFG, "train", i)
        assert set(caption_objects(caption(CFG, scene)).objects) == {cats[o] for o in scene.objects}
    shapes = WorldConfig(
        objects=("circle", "ring", "square", "frame", "triangle", "diamond"),
        favoured=("circle",),
        cooccurrence=(("ring", "square"),),
        colour_prior=(),
        max_objects=3,
        stats_images=400,
    )
    cats, why = chair_categories(shapes)
    assert cats == {} and "circle" in why
    paths = write_splits(tmp_path, shapes, n_images_val=2, n_images_test=2, vlind_per_prior=1, vlind_images=1)
    assert "val/chair_images" not in paths and "val/pope_random" in paths
    manifest = json.loads(Path(paths["manifest"]).read_text())
    assert "skipped" in manifest["splits"]["val"]["chair"]
