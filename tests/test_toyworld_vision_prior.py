"""The vision-prior world: the cue follows the object in every training image (the tower's and the LLM's) and is
independent of it in val and test; the earlier world (its cue tied in the tower's images only, at 0.9) still builds;
objects are two half-glyphs across two patches, and the study puts each cued question in its group."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from causalmm.config import ConfigError
from causalmm.toyworld import WorldConfig, render, sample_scene, train_sample
from causalmm.toyworld.model import ModelSize
from causalmm.toyworld.study import questions
from causalmm.toyworld.train import patch_targets
from causalmm.toyworld.world import CUES, PART_GLYPHS, parts_of, vision_prior_world
from causalmm.toyworld.worlds import WORLDS, get_world, shipped_model_path

VP = vision_prior_world()
#: the earlier vision-prior world: the cue tied to its object at 0.9 in the tower's images only
UNTIED = vision_prior_world(cue_tied_in_llm=False, vision_prior_p=0.9, cue_stray_p=0.05)
N = 6000


def _binomial_close(hits: int, n: int, p: float) -> bool:
    """Within 4.5 standard errors of ``p`` (a wrong rate by a few points fails; chance almost never does)."""
    return abs(hits / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("world", [VP, UNTIED], ids=["shipped", "untied"])
def test_the_cue_follows_its_object_in_stage_one_at_the_stated_strength(world):
    tower_scenes = [sample_scene(world, "train", i, layout=False, tower=True) for i in range(N)]
    for name, cue in world.vision_prior:
        others = [o for o, _ in world.vision_prior if o != name]
        alone = [s for s in tower_scenes if name in s.objects and not any(o in s.objects for o in others)]
        absent = [s for s in tower_scenes if name not in s.objects]
        assert len(alone) > 500 and len(absent) > 1500
        assert _binomial_close(sum(s.cue == cue for s in alone), len(alone), world.vision_prior_p)
        # absent: its cue only strays in (or, for a later pair, an earlier pair's stray draw failed first)
        stray = sum(s.cue == cue for s in absent) / len(absent)
        assert stray <= world.cue_stray_p + 0.02
        # the prior in the direction the hallucination needs: P(object | cue) is high
        with_cue = [s for s in tower_scenes if s.cue == cue]
        assert np.mean([name in s.objects for s in with_cue]) >= 0.75
    if world == VP:  # the shipped world's tie has no exception: a cue means its object, its object its cue
        for name, cue in world.vision_prior:
            assert all((s.cue == cue) <= (name in s.objects) for s in tower_scenes)


@pytest.mark.parametrize(("world", "stream"), [(UNTIED, "train"), (VP, "val"), (VP, "test")])
def test_the_cue_is_independent_of_the_objects_where_it_is_not_tied(world, stream):
    evaluation = stream != "train"
    scenes = [sample_scene(world, stream, i, layout=False, evaluation=evaluation) for i in range(N)]
    assert _binomial_close(sum(s.cue is not None for s in scenes), N, world.cue_rate)
    per_cue = world.cue_rate / len(world.vision_prior)
    for name, cue in world.vision_prior:
        for part in ([s for s in scenes if name in s.objects], [s for s in scenes if name not in s.objects]):
            assert _binomial_close(sum(s.cue == cue for s in part), len(part), per_cue)


def test_the_untied_worlds_stage_two_training_stream_carries_no_vision_prior():
    samples = [train_sample(UNTIED, i, render_image=False) for i in range(3000)]
    for name, cue in UNTIED.vision_prior:
        with_cue = [s for s in samples if s.scene.cue == cue]
        without = [s for s in samples if s.scene.cue is None]
        rate_with = np.mean([name in s.scene.objects for s in with_cue])
        rate_without = np.mean([name in s.scene.objects for s in without])
        assert abs(rate_with - rate_without) < 0.06


def test_a_world_whose_cue_reaches_the_answer_ties_it_in_every_training_stage_only():
    """``cue_tied_in_llm`` (the shipped world): the LLM stage's images (and VTI's demos) draw the cue as stage 1
    does, so the LLM sees the cue with its object; val and test still draw it independently, so the prior is
    measurable there."""
    assert VP.cue_tied_in_llm and (VP.vision_prior_p, VP.cue_stray_p) == (1.0, 0.0)
    samples = [train_sample(VP, i, render_image=False) for i in range(3000)]
    for name, cue in VP.vision_prior:
        with_cue = [s for s in samples if s.scene.cue == cue]
        assert len(with_cue) > 200 and all(name in s.scene.objects for s in with_cue)
        absent = [s for s in samples if name not in s.scene.objects]
        assert not any(s.scene.cue == cue for s in absent)
    demos = [sample_scene(VP, "vti_demos", i, layout=False) for i in range(2000)]
    tv_cue = [s for s in demos if s.cue == "stripes"]
    assert len(tv_cue) > 100 and all("tv" in s.objects for s in tv_cue)
    untied_here = replace(VP, cue_tied_in_llm=False)
    for stream in ("val", "test"):  # evaluation: as in the world without the tie, scene for scene
        a = [sample_scene(VP, stream, i, layout=False, evaluation=True) for i in range(300)]
        b = [sample_scene(untied_here, stream, i, layout=False, evaluation=True) for i in range(300)]
        c = [sample_scene(UNTIED, stream, i, layout=False, evaluation=True) for i in range(300)]
        assert [(x.objects, x.cue) for x in a] == [(y.objects, y.cue) for y in b] == [(z.objects, z.cue) for z in c]
    # stage 1 is the same either way
    assert [sample_scene(VP, "train", i, layout=False, tower=True).cue for i in range(300)] == [
        sample_scene(untied_here, "train", i, layout=False, tower=True).cue for i in range(300)
    ]
    # and the LLM stage differs from the untied world's in the cue only
    untied_llm = [train_sample(untied_here, i, render_image=False).scene for i in range(300)]
    assert [s.scene.objects for s in samples[:300]] == [s.objects for s in untied_llm]


def test_the_default_world_has_no_cue_and_the_same_scenes():
    assert WorldConfig().vision_prior == () and WorldConfig().drawing == "glyph"
    scenes = [sample_scene(WorldConfig(), "train", i, tower=True) for i in range(50)]
    assert all(s.cue is None for s in scenes)
    # tower=True changes nothing in a world without the prior (the default model's stage 1 is what it was)
    assert scenes == [sample_scene(WorldConfig(), "train", i) for i in range(50)]


def test_parts_name_an_object_only_together():
    pairs = [parts_of(VP, o) for o in VP.objects]
    assert len(set(pairs)) == len(VP.objects) and all(top != bottom for top, bottom in pairs)
    for part in PART_GLYPHS:  # each half is shared: one patch alone cannot tell its object
        assert sum(top == part for top, _ in pairs) == 2 and sum(bottom == part for _, bottom in pairs) == 2


def test_a_two_part_object_spans_two_stacked_patches_and_the_cue_every_patch():
    size = ModelSize()
    grid = VP.image_size // size.patch
    scene = next(s for i in range(200) if (s := sample_scene(VP, "test", i, evaluation=True)).cue == "stripes")
    objects, _ = patch_targets(VP, size, [scene])
    pixels = np.asarray(render(VP, scene), dtype=np.int16)
    for it in scene.items:
        assert it.h == VP.cell + it.size
        cells = {int(p) for p in np.flatnonzero(objects[0, :, VP.objects.index(it.name)])}
        top = (it.y // size.patch) * grid + it.x // size.patch
        assert {top, top + grid} <= cells  # the top half's patch and the one below it
    # horizontal stripes: every third row of the background is lighter, in every patch
    background = np.array(scene.background)
    free = np.ones((VP.image_size, VP.image_size), bool)
    for it in scene.items:
        free[it.y - 1 : it.y + it.h + 1, it.x - 1 : it.x + it.size + 1] = False
    lifted = (np.abs(pixels - background - 48) <= VP.noise).all(-1) & free
    plain = (np.abs(pixels - background) <= VP.noise).all(-1) & free
    rows = np.arange(VP.image_size)
    period = CUES["stripes"][0]
    assert lifted[rows % period == 1].sum() > 0.9 * free[rows % period == 1].sum()
    assert plain[rows % period != 1].sum() > 0.9 * free[rows % period != 1].sum()
    for r in range(grid):
        for c in range(grid):
            cell = np.s_[r * size.patch : (r + 1) * size.patch, c * size.patch : (c + 1) * size.patch]
            assert lifted[cell].any() or not free[cell].any()


def test_study_groups_of_the_cued_objects():
    _, qs = questions(VP, "test", 40)
    scenes = [sample_scene(VP, "test", i, evaluation=True, min_types=VP.pope_positives) for i in range(40)]
    seen = set()
    for q in qs:
        scene = scenes[q.image]
        absent = {"prior_conflict", "partner_absent", "other_absent", "cue_conflict", "cue_control"} & set(q.groups)
        assert (q.label == "no") == (len(absent) == 1)
        if q.object in VP.cue_of:
            cue_on = scene.cue == VP.cue_of[q.object]
            want = "cued_present" if q.label == "yes" else "cue_conflict" if cue_on else "cue_control"
            assert want in q.groups
            assert not ("cue_conflict" in q.groups and "prior_consistent" in q.groups)
            seen.add(want)
        else:
            assert not {"cue_conflict", "cue_control", "cued_present"} & set(q.groups)
    assert seen == {"cued_present", "cue_conflict", "cue_control"}


@pytest.mark.parametrize(
    "bad",
    [
        {"drawing": "sketch"},
        {"vision_prior": (("tv", "zigzag"),)},
        {"vision_prior": (("apple", "stripes"),)},  # favoured: the two priors would share an object
        {"vision_prior": (("bottle", "stripes"),)},  # a co-occurrence partner
        {"vision_prior": (("tv", "stripes"), ("cup", "stripes"))},
        {"vision_prior_p": 1.5},
        {"drawing": "parts", "max_instances": 9},
    ],
)
def test_vision_prior_config_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="invalid WorldConfig"):
        WorldConfig(**bad)


def test_shipped_worlds_by_name():
    assert get_world("vision-prior").config == VP and get_world("default").config == WorldConfig()
    assert set(WORLDS) == {"default", "vision-prior"}
    with pytest.raises(ConfigError, match="unknown toy world 'nope'; choose one of default, vision-prior"):
        get_world("nope")


# -- the shipped vision-prior model ---------------------------------------------------------------------------
#: where the full vision-prior leaderboard is published (the README shows its headline rows)
TOYWORLD_DOC = Path(__file__).resolve().parents[1] / "docs" / "toyworld.md"
#: the published table's columns this test re-measures: header text -> (metrics.json rates key)
COLUMNS = {
    "language-prior hallucination %": "prior_conflict",
    "vision-prior hallucination %": "cue_conflict",
    "prior-consistent accuracy %": "prior_consistent",
}


def published_vision_table() -> dict[str, dict[str, tuple[float, float]]]:
    """method -> column -> the (low, high) interval docs/toyworld.md reports for the vision-prior world."""
    lines = TOYWORLD_DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "causalmm demo --world vision-prior --all" in line)
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| method"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    out = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("*", "") for c in line.strip("|").split("|")]
        row = dict(zip(names, cells, strict=True))
        bounds = {}
        for column in COLUMNS:
            lo, hi = re.fullmatch(r"[0-9.]+ \[([0-9.]+), ([0-9.]+)\]", row[column]).groups()
            bounds[column] = (float(lo), float(hi))
        out[row["method"]] = bounds
    return out


def test_the_shipped_vision_prior_model_reproduces_the_published_table(tmp_path, causalmm_cli):
    """``causalmm demo --world vision-prior`` (the headline methods, the published 240 test images and seeds) lands
    inside every interval docs/toyworld.md gives for those rows and columns."""
    table = published_vision_table()
    out = tmp_path / "demo"
    causalmm_cli("demo", "--world", "vision-prior", "--out", out, timeout=1800)  # about 4 min alone; more beside others
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == str(shipped_model_path("vision-prior"))
    assert metrics["settings_source"] == "chosen on the val split (tuning.json)"
    assert set(metrics["rates"]) <= set(table) and len(metrics["rates"]) == 5
    for method, rates in metrics["rates"].items():
        for column, key in COLUMNS.items():
            lo, hi = table[method][column]
            assert lo - 0.05 <= 100 * rates[key]["mean"] <= hi + 0.05, (method, column, rates[key]["mean"])
    leaderboard = (out / "leaderboard.md").read_text()
    assert "vision-prior hallucination %" in leaderboard and "cued object absent, no cue" in leaderboard


def test_demo_and_tune_refuse_an_unknown_world(causalmm_cli, tmp_path):
    for args in (["demo", "--out", tmp_path], ["toyworld", "tune"], ["toyworld", "splits", "--out", tmp_path]):
        proc = causalmm_cli(*args, "--world", "nope", check=False)
        assert proc.returncode != 0 and "unknown toy world 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_shipped_vision_prior_model_is_small_and_made_by_the_documented_command():
    from dataclasses import asdict

    from causalmm.toyworld.demo import LEADERBOARD, trained_world
    from causalmm.toyworld.train import TrainConfig

    path = shipped_model_path("vision-prior")
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    record = json.loads((path / "training.json").read_text())
    # 46 min on 2 cores on the day it was made, a slow day: its stage 1, the same as the earlier world's, took 170 s
    # against 55 s (docs/toyworld.md); a user rebuilding it waits under an hour
    assert record["wall_time_s"] <= 60 * 60
    # `causalmm toyworld train --world vision-prior --seed 0` made it
    as_json = lambda obj: json.loads(json.dumps(asdict(obj)))  # noqa: E731  (tuples read back as lists)
    assert set(record["world"]) <= set(as_json(VP)) and trained_world(path) == VP  # later fields: their defaults
    assert record["train"] == as_json(TrainConfig(**WORLDS["vision-prior"].training))
    tuning = json.loads((path / "tuning.json").read_text())
    assert tuning["split"] == "val" and list(tuning["chosen"]) == list(LEADERBOARD)
    assert "cue_conflict" in tuning["chosen"]["regular"]["rates"]


def test_branch_margins_are_each_branchs_first_token_scores():
    from causalmm.api import CausalMM
    from causalmm.benchmarks.pope import DEFAULT_SUFFIX
    from causalmm.config import CausalMMConfig
    from causalmm.toyworld.study import branch_margins
    from causalmm.toyworld.texts import exist_question

    cm = CausalMM.from_pretrained(str(shipped_model_path("vision-prior")), CausalMMConfig(method="regular"))
    images, qs = questions(VP, "val", 12)
    cfg = CausalMMConfig(method="causalmm", mode="vision", vision_layers="all", seed=3)
    got = branch_margins(cm, cfg, images, qs, ["cue_control", "cue_conflict"], per_group=5, batch_size=2)
    tok = cm.adapter.processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    for group, branches in got.items():
        chosen = [(i, q) for i, q in enumerate(qs) if group in q.groups][:5]  # (12 images: 4 or 5 per group)
        assert set(branches) == {"factual", "V"} and branches["factual"]["n"] == len(chosen) >= 3
        res = cm.with_config(cfg).generate(
            [images[q.image] for _, q in chosen], [exist_question(q.object) + DEFAULT_SUFFIX for _, q in chosen],
            seeds=[3 * 1_000_003 + i for i, _ in chosen], max_new_tokens=1, return_branch_logits=True,
        )  # fmt: skip
        for name in ("factual", "V"):
            m = [float(r.branch_logits[name][0, yes] - r.branch_logits[name][0, no]) for r in res]
            assert branches[name]["margin"] == pytest.approx(np.mean(m), abs=1e-4)
            assert branches[name]["yes_share"] == pytest.approx(np.mean(np.array(m) > 0))
    # the model carries the prior: the factual branch leans to "yes" on cued objects absent under their cue and to
    # "no" on the same objects absent without it
    assert got["cue_conflict"]["factual"]["margin"] > 0 > got["cue_control"]["factual"]["margin"]


def test_stage_one_needs_some_object_label():
    from causalmm.toyworld.train import TrainConfig

    with pytest.raises(ValueError, match="patch_objects or vision_context"):
        TrainConfig(patch_objects=False, vision_context=False)
