"""The toy world's tokenizer, training encoding, training run, shipped model and demo."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from causalmm.api import CausalMM
from causalmm.config import CausalMMConfig
from causalmm.toyworld import WorldConfig, train_sample, vocabulary
from causalmm.toyworld.demo import LEADERBOARD, METHODS, trained_world
from causalmm.toyworld.model import ModelSize, build_config, build_processor, build_tokenizer, shipped_model_path
from causalmm.toyworld.study import answer, group_rates, questions
from causalmm.toyworld.train import IGNORE, TrainConfig, _Encoder, collate, train

WORLD = WorldConfig()
SIZE = ModelSize()


@pytest.fixture(scope="module")
def processor():
    return build_processor(WORLD, SIZE, build_tokenizer(WORLD))


def test_tokenizer_covers_every_world_text_without_unk(processor):
    tok = processor.tokenizer
    unk = tok.unk_token_id
    for i in range(40):
        for turn in train_sample(WORLD, i, render_image=False).turns:
            for text in (turn.prompt, turn.answer):
                ids = tok(text, add_special_tokens=False).input_ids
                assert unk not in ids, text
    words = vocabulary(WORLD)
    assert tok.convert_ids_to_tokens(list(range(len(words)))) == words
    # case and spacing do not matter; unknown words are <unk>, not an error
    assert tok("Is there A Kite?", add_special_tokens=False).input_ids == tok("is there a kite ?").input_ids[1:]
    assert tok("a zebra", add_special_tokens=False).input_ids[-1] == unk
    assert tok("yes").input_ids[0] == tok.bos_token_id


def test_training_encoding_equals_processor_and_chat_template(processor):
    """The fast training encoder builds exactly the ids the processor makes from the chat template, and puts
    the loss on the answers and their </s> only."""
    encoder = _Encoder(WORLD, SIZE, processor)
    for i in (0, 1, 7):
        sample = train_sample(WORLD, i)
        ids, labels, starts = encoder.encode(sample)
        text = processor.apply_chat_template(sample.messages(), tokenize=False)
        ref = processor(images=[sample.image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
        assert ids == ref
        eos = processor.tokenizer.eos_token_id
        labelled = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
        expected = []
        for turn in sample.turns:
            expected += [*processor.tokenizer(turn.answer, add_special_tokens=False).input_ids, eos]
        assert labelled == expected
        assert len(starts) == len(sample.turns)
        assert all(labels[a] == ids[a] and ids[b] == eos for a, b, _ in starts)
    # a one-turn inference prompt is the prefix the model was trained on
    first = train_sample(WORLD, 0)
    prompt = processor.apply_chat_template(first.messages()[:1], add_generation_prompt=True)
    prefix = processor(images=[first.image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    ids, _, starts = encoder.encode(first)
    assert ids[: starts[0][0]] == prefix


def test_collate_pads_right_and_masks(processor):
    encoder = _Encoder(WORLD, SIZE, processor)
    samples = [train_sample(WORLD, i) for i in range(3)]
    batch = collate(encoder, samples)
    lengths = [len(encoder.encode(s)[0]) for s in samples]
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.pixel_values.shape == (3, 3, WORLD.image_size, WORLD.image_size)
    pad = batch.attention_mask == 0
    assert (batch.labels[pad] == IGNORE).all() and (batch.input_ids[pad] == processor.tokenizer.pad_token_id).all()


SMOKE = dict(steps=3, batch_size=4, warmup=1, log_every=1, threads=1, vision_steps=2, vision_batch_size=4)


def test_training_smoke_is_reproducible_and_loads(tmp_path):
    cfg = TrainConfig(**SMOKE)
    a = train(tmp_path / "a", cfg=cfg)
    b = train(tmp_path / "b", cfg=cfg)
    c = train(tmp_path / "c", cfg=TrainConfig(**{**SMOKE, "seed": 1}))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    record = json.loads((a / "training.json").read_text())
    assert [h["step"] for h in record["history"]] == [1, 2, 3]
    assert record["history"][-1]["loss"] < record["history"][0]["loss"] + 1.0  # finite, logged
    cm = CausalMM.from_pretrained(str(a), CausalMMConfig(method="regular"))
    res = cm.generate(train_sample(WORLD, 5).image, "Is there a cup in the image?", max_new_tokens=2)
    assert len(res.token_ids) >= 1


def test_stage_two_freezes_the_vision_tower_unless_asked(tmp_path):
    """Stage 2 leaves the tower as stage 1 made it (here: its seeded initialisation, no stage 1), while the
    projector and LM train; with a tower learning rate the tower moves too."""
    base = {**SMOKE, "vision_steps": 0}
    frozen = load_file(train(tmp_path / "f", cfg=TrainConfig(**base)) / "model.safetensors")
    moving = load_file(train(tmp_path / "m", cfg=TrainConfig(**base, tower_lr_scale=0.5)) / "model.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = LlavaForConditionalGeneration(build_config(WORLD, SIZE, build_tokenizer(WORLD))).state_dict()
    tower = [k for k in frozen if "vision_tower" in k]
    others = [k for k in frozen if "multi_modal_projector" in k or "language_model.layers.0.self_attn.q_proj" in k]
    assert tower and others
    assert all(torch.equal(frozen[k], init[_init_key(k, init)]) for k in tower)
    assert all(not torch.equal(frozen[k], init[_init_key(k, init)]) for k in others)
    assert any(not torch.equal(moving[k], init[_init_key(k, init)]) for k in tower)


def _init_key(saved: str, init: dict) -> str:
    """The in-memory name of a saved weight (transformers may rename on save)."""
    if saved in init:
        return saved
    matches = [k for k in init if k.endswith(saved.split(".", 1)[1])]
    assert len(matches) == 1, (saved, matches)
    return matches[0]


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="tower_lr_scale"):
        TrainConfig(tower_lr_scale=2)


# -- the study and the demo ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory, causalmm_cli):
    """A toy-world model after a few training steps, with VTI's directions fitted beside it as a user fits them:
    the demo's plumbing, not its numbers."""
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, threads=1, vision_steps=2, vision_batch_size=4)
    path = train(tmp_path_factory.mktemp("toy") / "model", cfg=cfg)
    proc = causalmm_cli("toyworld", "fit-vti", "--model", path)
    assert f"wrote {path / 'vti.safetensors'}" in proc.stdout
    return path


def test_study_groups_are_a_partition_of_absent_questions():
    _, qs = questions(WORLD, "test", 6)
    assert len(qs) == 6 * len(WORLD.objects)
    for q in qs:
        absent_groups = {"prior_conflict", "partner_absent", "other_absent"} & set(q.groups)
        assert (q.label == "no") == (len(absent_groups) == 1) and (q.label == "yes") == ("present" in q.groups)
        if "prior_conflict" in q.groups:
            assert q.object in WORLD.favoured and "prior_consistent" not in q.groups


def test_group_rates_hand_example():
    from causalmm.toyworld.study import Question

    qs = [
        Question(0, "apple", "no", ("prior_conflict",)),
        Question(0, "book", "no", ("prior_conflict",)),
        Question(0, "cup", "yes", ("present",)),
        Question(0, "tv", "no", ("other_absent", "prior_consistent")),
    ]
    answers = np.array([["yes", "no", "yes", "no"], ["yes", "yes", "no", "yes"]], dtype=object)
    rates = group_rates(answers, qs, n_boot=200)
    assert rates["prior_conflict"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert rates["present"]["mean"] == pytest.approx(0.5)
    assert rates["other_absent"]["mean"] == pytest.approx(0.5)
    assert rates["prior_consistent"]["mean"] == pytest.approx(0.5)
    assert rates["accuracy"]["mean"] == pytest.approx((0.75 + 0.0) / 2)  # seed 0: 3 of 4 right
    lo, hi = rates["prior_conflict"]["ci95"]
    assert 0 <= lo <= 0.75 <= hi <= 1


def test_demo_cli_on_a_few_samples(tmp_path, causalmm_cli, smoke_model):
    out = tmp_path / "demo"
    proc = causalmm_cli("demo", "--model", str(smoke_model), "--images", "2", "--seeds", "0,1", "--out", str(out))
    for name in ("regular", "vcd", "causalmm/vision", "causalmm/language", "causalmm/multimodal"):
        assert name in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_questions"] == 20 and metrics["seeds"] == [0, 1]
    assert metrics["settings_source"].startswith("defaults")
    for method, rates in metrics["rates"].items():
        assert 0 <= rates["prior_conflict"]["ci95"][0] <= rates["prior_conflict"]["mean"] <= 1, method
    assert set(metrics["rates"]) == {"regular", "vcd", "causalmm/vision", "causalmm/language", "causalmm/multimodal"}
    with Image.open(out / "demo.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
    # regular is its own reference: a cost ratio of exactly one; every other method's interval brackets its mean
    assert metrics["rates"]["regular"]["cost_per_token"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1}
    for method, rates in metrics["rates"].items():
        cost = rates["cost_per_token"]
        assert 0 < cost["ci95"][0] <= cost["mean"] <= cost["ci95"][1], method
    # the seeded methods ran both seeds, the others once (regular decoding draws nothing)
    assert metrics["seeds_run"]["regular"] == [0] and metrics["seeds_run"]["vcd"] == [0, 1]
    board = (out / "leaderboard.md").read_text()
    assert metrics["date"] in board and metrics["machine"] in board and "causalmm demo --model" in board
    assert [line.split(" | ")[0].strip("| *") for line in board.splitlines() if line.startswith("| ")][1:] == list(
        METHODS
    )


def test_demo_cli_all_runs_the_leaderboard(tmp_path, causalmm_cli, smoke_model):
    out = tmp_path / "demo"
    proc = causalmm_cli("demo", "--all", "--model", str(smoke_model), "--images", "1", "--seeds", "0,1", "--out",
                        str(out))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["rates"]) == list(LEADERBOARD)
    for name in LEADERBOARD:
        assert name in proc.stdout
    # deterministic methods (no noise, no random attention) run once; VCD and the random-attention gate twice
    once = {m for m, seeds in metrics["seeds_run"].items() if seeds == [0]}
    assert once == {"regular", "icd", "m3id", "pai", "avisc", "sid", "agla", "vista", "vti", "vaf", "memvr", "only",
                    "dola", "deco", "regular/beams", "opera"}  # fmt: skip
    assert metrics["seeds_run"]["ritual"] == [0, 1]  # a random transform per seed
    assert metrics["seeds_run"]["causalmm/language/beams"] == [0, 1]  # random attention, with beams
    assert metrics["seeds_run"]["causalmm/gate"] == [0, 1]


def test_cost_ratio_hand_example():
    from causalmm.toyworld.study import Answers, cost_ratio

    words = np.empty((1, 1), dtype=object)
    reference = Answers(words, seconds=np.array([[1.0, 2.0, 1.0]]), tokens=np.array([[10, 10, 10]]))
    # two seeds: the batches' times and tokens add up over seeds before the ratio
    method = Answers(words, seconds=np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]), tokens=np.array([[10, 10, 10]] * 2))
    cost = cost_ratio(method, reference, n_boot=500)
    assert cost["mean"] == pytest.approx((12 / 60) / (4 / 30))
    assert cost["n"] == 3
    lo, hi = cost["ci95"]
    per_batch = [(2 / 20) / (1 / 10), (6 / 20) / (2 / 10), (4 / 20) / (1 / 10)]  # a resample of one batch repeated
    assert min(per_batch) - 1e-9 <= lo <= cost["mean"] <= hi <= max(per_batch) + 1e-9
    # fewer tokens for the same time cost more per token
    fewer = Answers(words, seconds=reference.seconds, tokens=np.array([[5, 5, 5]]))
    assert cost_ratio(fewer, reference, n_boot=0)["mean"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same batches"):
        cost_ratio(Answers(words, np.ones((1, 2)), np.ones((1, 2))), reference, n_boot=0)


def test_leaderboard_grid_holds_every_default_and_only_valid_settings():
    """``tune`` tries each method's official default (scaled to the toy model) among its settings, and every
    setting of the grid is a configuration the method accepts."""
    from causalmm.toyworld.grid import BEAMS, DEFAULTS, grid, seeded, split

    settings = grid(3, 4)
    assert list(settings) == list(LEADERBOARD) == list(DEFAULTS)
    for method, rows in settings.items():
        configs = [(CausalMMConfig(**split(s)[0]).to_dict(), split(s)[1]) for s in rows]
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(rows), f"{method}: repeated settings"
        assert all(g == ({"num_beams": BEAMS} if method.endswith("beams") else {}) for _, g in configs), method
        default = (CausalMMConfig(**split(DEFAULTS[method])[0]).to_dict(), split(DEFAULTS[method])[1])
        # the paper's middle-third default is not a layer choice of a 4-layer LLM
        if method not in ("causalmm/language", "causalmm/multimodal", "causalmm/language/beams"):
            assert default in configs, method
    assert seeded({"method": "vcd"}) and seeded({"method": "causalmm", "mode": "language"})
    assert seeded({"method": "ritual"})  # its random transform is drawn from the counterfactual seed
    assert not seeded({"method": "agla", "params": {"matcher": "self"}})  # its local image is the sample's alone
    assert not seeded({"method": "causalmm", "mode": "language", "language_cf": "uniform"})
    assert not seeded({"method": "icd"}) and not seeded({"method": "regular"})


def test_tune_keeps_earlier_choices_and_refuses_unknown_methods(smoke_model, tmp_path, causalmm_cli):
    import shutil

    from causalmm.config import ConfigError
    from causalmm.toyworld.demo import tune

    model = shutil.copytree(smoke_model, tmp_path / "model")
    first = tune(model, n_images=1, methods=("dola",), log=lambda _: None)
    assert list(first["chosen"]) == ["regular", "dola"]
    second = tune(model, n_images=1, methods=("deco",), log=lambda _: None)
    assert list(second["chosen"]) == ["regular", "dola", "deco"]
    assert second["chosen"]["dola"] == json.loads(json.dumps(first["chosen"]["dola"]))
    assert set(second["wall_time_s_by_method"]) == {"regular", "dola", "deco"}
    # other images: the earlier choices no longer hold, the file is replaced whole
    third = tune(model, n_images=2, methods=("deco",), log=lambda _: None)
    assert list(third["chosen"]) == ["regular", "deco"]
    with pytest.raises(ConfigError, match="unknown toy-world method"):
        tune(model, n_images=1, methods=("causalmm/nope",), log=lambda _: None)
    proc = causalmm_cli("toyworld", "tune", "--model", str(model), "--methods", "nope", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_cli_bad_input(tmp_path, causalmm_cli):
    proc = causalmm_cli("demo", "--seeds", "a,b", check=False)
    assert proc.returncode == 2 and "--seeds" in proc.stderr
    # its own --out: a runs/demo left by `make demo` in the checkout must not answer first
    proc = causalmm_cli("demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


# -- the shipped model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return CausalMM.from_pretrained(str(shipped_model_path()), CausalMMConfig(method="regular"))


def test_shipped_model_is_small_documented_and_reproducible_by_the_default_command(shipped):
    path = shipped_model_path()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    record = json.loads((path / "training.json").read_text())
    assert record["wall_time_s"] <= 20 * 60
    # `causalmm toyworld train --seed 0` (all defaults) is the command that made it
    as_json = lambda obj: json.loads(json.dumps(asdict(obj)))  # noqa: E731  (tuples read back as lists)
    assert record["train"] == as_json(TrainConfig())
    # the world it records, read as the loader reads it (a field added since takes its default)
    assert set(record["world"]) <= set(as_json(WORLD)) and trained_world(path) == WORLD
    assert shipped.model.config.model_type == "llava"
    tuning = json.loads((path / "tuning.json").read_text())
    assert tuning["split"] == "val" and list(tuning["chosen"]) == list(LEADERBOARD)


def test_shipped_model_is_grounded_and_shows_the_prior(shipped):
    """Trained, not random: on unseen val images it sees present objects and rejects most absent ones, yet a
    favoured absent object still draws a "yes" far more often than another absent one (the prior at work)."""
    images, qs = questions(WORLD, "val", 20)
    rates = group_rates(answer(shipped, CausalMMConfig(method="regular"), images, qs, [0]).words, qs, n_boot=0)
    assert rates["present"]["mean"] >= 0.6
    assert rates["other_absent"]["mean"] <= 0.4
    assert rates["prior_conflict"]["mean"] >= rates["other_absent"]["mean"] + 0.3


def test_shipped_model_answers_in_the_worlds_words(shipped):
    image = train_sample(WORLD, 123).image
    yes_no = shipped.generate(image, "Is there a cup in the image? Please answer this question with one word.")
    assert yes_no.text.strip().lower().rstrip(".") in ("yes", "no")
    colour = shipped.generate(image, "What color is the apple? Please answer this question with one word.")
    assert colour.text.strip().lower().rstrip(".") in WORLD.colours


def test_demo_cli_defaults_to_the_shipped_model(tmp_path, causalmm_cli):
    out = tmp_path / "demo"
    causalmm_cli("demo", "--images", "2", "--seeds", "0", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings_source"].startswith("chosen on the val split")
    assert metrics["model"] == str(shipped_model_path())


def test_tune_applies_its_rule(smoke_model, tmp_path):
    """Per method: the lowest prior-conflict rate among settings within ``max_drop`` of regular's
    prior-consistent accuracy; if none qualifies, the most accurate one, flagged."""
    import shutil

    from causalmm.toyworld.demo import tune

    model = shutil.copytree(smoke_model, tmp_path / "model")
    out = tune(model, n_images=2, methods=("regular", "causalmm/language"), write=True, log=lambda _: None)
    written = json.loads((model / "tuning.json").read_text())
    assert written["chosen"] == json.loads(json.dumps(out["chosen"])) and written["split"] == "val"
    floor = out["grid"]["regular"][0]["rates"]["prior_consistent"] - 0.02
    rows = out["grid"]["causalmm/language"]
    best = out["chosen"]["causalmm/language"]
    ok = [r for r in rows if r["rates"]["prior_consistent"] >= floor - 1e-12]
    assert best["admissible"] == bool(ok)
    if ok:
        assert best["rates"]["prior_consistent"] >= floor - 1e-12
        assert best["rates"]["prior_conflict"] == min(r["rates"]["prior_conflict"] for r in ok)
    else:
        assert best["rates"]["prior_consistent"] == max(r["rates"]["prior_consistent"] for r in rows)


def test_readme_figure_example_on_the_shipped_model(tmp_path, causalmm_cli):
    """The README's visualize/explain example, as a user runs it: the factual branch answers the prior's
    "yes" for an absent kite, the language contrast turns it into "no"; the figure is written."""
    causalmm_cli("toyworld", "splits", "--out", tmp_path / "tw", "--val-images", "1", "--test-images", "11")
    image = tmp_path / "tw" / "test" / "images" / "000000400011.png"
    rows = [json.loads(line) for line in (tmp_path / "tw" / "test" / "pope_all.jsonl").read_text().splitlines()]
    assert {"image": image.name, "object": "kite", "label": "no"}.items() <= next(
        r for r in rows if r["image"] == image.name and r["object"] == "kite"
    ).items()
    prompt = "Is there a kite in the image? Please answer this question with one word."
    model = str(shipped_model_path())
    png = tmp_path / "maps.png"
    causalmm_cli("visualize", "--model", model, "--image", image, "--prompt", prompt, "--language-layers", "all",
                 "--out", png)  # fmt: skip
    with Image.open(png) as im:
        assert im.size == (1800, 600)  # 2 rows x (image + factual + 4 methods) panels of 300 px
    proc = causalmm_cli("explain", "--model", model, "--image", image, "--prompt", prompt, "--mode", "language",
                        "--language-layers", "all", "--gamma", "4", "--epsilon", "0.01", "--json")  # fmt: skip
    step = json.loads(proc.stdout)["steps"][0]
    assert step["top"]["factual"][0]["text"] == "yes" and step["token"] == "no" and step["flipped"]


def test_demo_cli_runs_chosen_rows_and_refuses_bad_choices(tmp_path, causalmm_cli, smoke_model):
    out = tmp_path / "rows"
    causalmm_cli("demo", "--model", smoke_model, "--images", "1", "--seeds", "0", "--methods", "agla,vti", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["rates"]) == ["regular", "agla", "vti"]  # regular first: the reference of every row
    for args, message in (
        (["--methods", "agla", "--all"], "--methods and --all both choose the rows"),
        (["--methods", ","], "--methods is empty"),
        (["--methods", "nope"], "unknown toy-world method(s) nope"),
    ):
        proc = causalmm_cli("demo", "--model", smoke_model, "--out", tmp_path / "x", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
