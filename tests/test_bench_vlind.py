"""VLind-Bench: loader, official answer parsing, the six indicators, the native data.json round trip, errors."""

import json
import random

import pytest
from PIL import Image

from causalmm.benchmarks.base import BenchmarkError
from causalmm.benchmarks.evaluate import load_run_samples
from causalmm.benchmarks.vlind import VLind, infer_true_or_false

# Four instances. Good images (votes >= 2, ids "0".."11" only):
#   landmark/1: "0" (3), "1" (2); "2" (1) is not good                   -> 2 good images
#   color/2:    "0" (2), "4" (3)                                         -> 2 good images
#   diet/3:     "0" (1), "1" (0)                                         -> none: skipped entirely
#   time/4:     "3" (2); "12" (3) is outside the considered ids "0".."11" -> 1 good image
INSTANCES = [
    {
        "concept": "landmark",
        "context_id": 1,
        "context": "The Statue of Liberty holds a sword",
        "factual_context": "The Statue of Liberty holds a torch",
        "true_statement": "The Statue of Liberty is holding a sword.",
        "false_statement": "The Statue of Liberty is holding a torch.",
        "existent_noun": "a statue",
        "non-existent_noun": "a lighthouse",
        "best_img_id": 0,
        "aggregated_human_label_good_images": {"0": 3, "1": 2, "2": 1},
    },
    {
        "concept": "color",
        "context_id": 2,
        "context": "Bananas are blue",
        "factual_context": "Bananas are yellow",
        "true_statement": "The bananas are blue.",
        "false_statement": "The bananas are yellow.",
        "existent_noun": "a banana",
        "non-existent_noun": "a car",
        "best_img_id": 4,
        "aggregated_human_label_good_images": {"0": 2, "4": 3},
    },
    {
        "concept": "diet",
        "context_id": 3,
        "context": "Pandas eat rocks",
        "factual_context": "Pandas eat bamboo",
        "true_statement": "The panda eats rocks.",
        "false_statement": "The panda eats bamboo.",
        "existent_noun": "a panda",
        "non-existent_noun": "a boat",
        "best_img_id": 0,
        "aggregated_human_label_good_images": {"0": 1, "1": 0},
    },
    {
        "concept": "time",
        "context_id": 4,
        "context": "Romans used smartphones",
        "factual_context": "Romans used scrolls",
        "true_statement": "The Roman holds a smartphone.",
        "false_statement": "The Roman holds a scroll.",
        "existent_noun": "a man",
        "non-existent_noun": "a dog",
        "best_img_id": 3,
        "aggregated_human_label_good_images": {"3": 2, "12": 3},
    },
]


def _write_images(root, instances):
    img = Image.new("RGB", (4, 4), (200, 10, 10))
    for inst in instances:
        f = root / "factual" / inst["concept"] / f"{inst['context_id']}_{inst['factual_context']}"
        f.mkdir(parents=True, exist_ok=True)
        img.save(f / "0.jpg")
        cf = root / "counterfactual" / inst["concept"] / f"{inst['context_id']}_{inst['context']}"
        cf.mkdir(parents=True, exist_ok=True)
        for image_id in [*inst["aggregated_human_label_good_images"], str(inst["best_img_id"])]:
            img.save(cf / f"{image_id}.jpg")


@pytest.fixture
def bench_dir(tmp_path):
    """The official layout: data.json with images/ beside it."""
    root = tmp_path / "VLind-Bench Dataset"
    root.mkdir()
    (root / "data.json").write_text(json.dumps(INSTANCES, indent=4))
    _write_images(root / "images", INSTANCES)
    return root


# The scenario scored by hand below (P = both statements right):
#   landmark/1: CK P, VP P, CB P; LP image "0" P, image "1" fails (says True to the false statement) -> d = 1/2
#   color/2:    CK fails (False to statement 1, unparseable statement 2), VP P, CB P; LP "0" P, "4" P -> d = 2/2
#   time/4:     CK P, VP P, CB fails (False to statement 1); LP "3" P                                -> d = 1/1
WRONG = {
    "landmark/1/lp/1/2": "True",
    "color/2/ck/factual/1": "False.",
    "color/2/ck/factual/2": "I cannot tell from this picture",
    "time/4/cb/3/1": "false, the context says otherwise",
}
# N = 3 instances; CK pass: landmark, time (2); VP pass: all 3; CB pass: landmark, color (2).
#   S_CK = 2/3 = 66.67   S_VP = 3/3 = 100   CB = 2/3 = 66.67
#   S_CB = #(CK and CB) / #CK = 1 (landmark) / 2 = 50
#   LP   = (1/2 + 1 + 1) / 3 = 83.33   (every instance counts)
#   S_LP = only landmark passes CK, VP and CB -> (1/2) / 1 = 50 (color fails CK and time fails CB, so their
#          perfect LP is excluded; conditioning on CK and VP alone would give (1/2 + 1) / 2 = 75)
#   S_LP_micro = 1 good image passing / 2 good images of landmark = 50
HAND = {
    "S_CK": 200 / 3,
    "S_VP": 100.0,
    "S_CB": 50.0,
    "S_LP": 50.0,
    "CB": 200 / 3,
    "LP": 250 / 3,
    "S_LP_micro": 50.0,
    "n_instances": 3.0,
    "n_images": 5.0,
    "n_CB": 2.0,
    "n_LP": 1.0,
    "unparseable": 1.0,
    "n": 28.0,
}


def _records(bench, samples, wrong=WRONG, seed=0):
    records = []
    for s in samples:
        text = wrong.get(s.id, f"{s.meta['expected']}.")
        r = {"id": s.id, "text": text, "seed": seed, **s.meta}
        r.update(bench.parse(r))
        records.append(r)
    return records


def _approx(metrics, expected):
    assert set(expected) <= set(metrics)
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v), k


# -- loader ------------------------------------------------------------------------------------------
def test_load_samples_ids_images_and_prompts(bench_dir):
    bench = VLind()
    samples = bench.load(bench_dir / "data.json", None)  # images default to the folder beside data.json
    # landmark 6 + 2*2, color 6 + 2*2, diet skipped, time 6 + 2*1
    assert len(samples) == 28
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids)
    assert ids[:10] == [
        "landmark/1/ck/factual/1",
        "landmark/1/ck/factual/2",
        "landmark/1/vp/0/1",
        "landmark/1/vp/0/2",
        "landmark/1/cb/0/1",
        "landmark/1/cb/0/2",
        "landmark/1/lp/0/1",
        "landmark/1/lp/0/2",
        "landmark/1/lp/1/1",
        "landmark/1/lp/1/2",
    ]
    assert not any(i.startswith("diet/") for i in ids)
    assert not any("/12/" in i for i in ids) and "time/4/lp/3/1" in ids
    by_id = {s.id: s for s in samples}
    ck1 = by_id["landmark/1/ck/factual/1"]
    assert ck1.prompt == (
        "Statement: The Statue of Liberty is holding a torch.\n"
        "Based on the common sense, is the given statement true or false? Only respond in True or False."
    )
    assert ck1.meta["expected"] == "True" and by_id["landmark/1/ck/factual/2"].meta["expected"] == "False"
    assert ck1.image == bench_dir / "images/factual/landmark/1_The Statue of Liberty holds a torch/0.jpg"
    vp2 = by_id["color/2/vp/4/2"]
    assert vp2.prompt == (
        "Statement: There is a car in the given image.\n"
        "Based on the image, is the given statement true or false? Only respond in True or False."
    )
    assert vp2.image == bench_dir / "images/counterfactual/color/2_Bananas are blue/4.jpg"
    assert by_id["color/2/cb/4/1"].prompt == (
        "Context: Bananas are blue\nStatement: The bananas are blue.\n"
        "Based on the context, is the given statement true or false? Forget real-world common sense and just "
        "follow the information provided in the context. Only respond in True or False."
    )
    lp = by_id["color/2/lp/0/2"]
    assert lp.prompt == (
        "Statement: The bananas are yellow.\n"
        "Based on the image, is the given statement true or false? Forget real-world common sense and just "
        "follow the information provided in the image. Only respond in True or False."
    )
    assert lp.image == bench_dir / "images/counterfactual/color/2_Bananas are blue/0.jpg"
    assert lp.meta["instance"] == "color/2" and lp.meta["test"] == "lp" and lp.meta["expected"] == "False"
    assert lp.meta["source"]["aggregated_human_label_good_images"] == {"0": 2, "4": 3}
    assert all(s.image is not None for s in samples)  # every test has an image (CK: the factual one)


def test_load_folder_instructblip_prompts_style_and_threshold(bench_dir):
    ib = VLind(prompts="instructblip").load(bench_dir, bench_dir / "images")
    assert {s.id: s for s in ib}["landmark/1/ck/factual/2"].prompt == (
        "Only respond in True or False.\nStatement: The Statue of Liberty is holding a sword.\n"
        "Based on common sense, is the given statement true or false?"
    )
    # photorealistic considers ids 0-3 only: color keeps "0" (its best image "4" still serves VP and CB)
    photo = VLind(style="photorealistic").load(bench_dir, None)
    assert len(photo) == 26 and "color/2/lp/4/1" not in {s.id for s in photo}
    assert "color/2/vp/4/1" in {s.id for s in photo}
    # vote_thres 3: landmark keeps "0", color keeps "4", time has none ("12" is never considered) -> skipped
    strict = VLind(vote_thres=3).load(bench_dir, None)
    assert len(strict) == 16 and not any(s.id.startswith("time/") for s in strict)


# -- parsing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("True", "True"),
        ("True.", "True"),
        ("false", "False"),
        ("FALSE,", "False"),
        ("It is true that the statue holds a sword.", "True"),
        ("The statement is false.\nTrue", "False"),  # the first verdict word wins
        ("Answer:\ntrue", "True"),  # newlines are spaces
        ("", "NA"),
        ("The image shows a statue.", "NA"),
        ("untrue", "NA"),
        ("True!", "NA"),  # official quirk: only , and . are stripped
        ("**True**", "NA"),
        ("Verdict:\tTrue", "NA"),  # official quirk: words are split on single spaces only
    ],
)
def test_parse_official_rule(text, answer):
    bench = VLind()
    assert infer_true_or_false(text) == answer
    parsed = bench.parse({"text": text})
    assert parsed == {"answer": answer, "parseable": answer != "NA"}


def test_parse_missing_text_and_correct():
    bench = VLind()
    assert bench.parse({"text": None})["answer"] == "NA"
    assert bench.correct({"answer": "False", "expected": "False"}) is True
    assert bench.correct({"answer": "NA", "expected": "False"}) is False
    assert bench.unit({"instance": "color/2", "id": "color/2/lp/0/1"}) == "color/2"
    assert (bench.name, bench.primary, bench.paired_test) == ("vlind", "S_LP", "bootstrap")
    assert bench.headline_metrics(HAND) == ["S_LP", "S_CK", "S_VP", "S_CB", "CB", "LP"]


# -- the six indicators ----------------------------------------------------------------------------
def test_metrics_against_hand_values(bench_dir):
    bench = VLind()
    records = _records(bench, bench.load(bench_dir, None))
    _approx(bench.metrics(records), HAND)
    random.Random(0).shuffle(records)  # order does not matter
    _approx(bench.metrics(records), HAND)


def test_metrics_all_right_and_empty_denominators(bench_dir):
    bench = VLind()
    samples = bench.load(bench_dir, None)
    perfect = bench.metrics(_records(bench, samples, wrong={}))
    _approx(perfect, {k: 100.0 for k in ("S_CK", "S_VP", "S_CB", "S_LP", "CB", "LP")})
    assert perfect["unparseable"] == 0 and perfect["n_LP"] == 3
    # everyone fails CK statement 2: S_CB and S_LP have no denominator -> 0, as the official script prints
    wrong = {s.id: "True" for s in samples if s.meta["test"] == "ck"}
    m = bench.metrics(_records(bench, samples, wrong=wrong))
    _approx(m, {"S_CK": 0.0, "S_CB": 0.0, "S_LP": 0.0, "n_CB": 0.0, "n_LP": 0.0, "S_VP": 100.0, "LP": 100.0})


def test_metrics_style_filter_changes_scores(bench_dir):
    # photorealistic: color's LP is over image "0" only (still passes); other values as in HAND
    bench = VLind(style="photorealistic")
    m = bench.metrics(_records(bench, bench.load(bench_dir, None)))
    _approx(m, {**HAND, "n_images": 4.0, "n": 26.0})


def test_metrics_bootstrap_copies_count_twice(bench_dir):
    bench = VLind()
    records = _records(bench, bench.load(bench_dir, None))
    twice = records + [r for r in records if r["instance"] == "landmark/1"]
    random.Random(1).shuffle(twice)
    # landmark counted twice: N = 4; CK pass 3 (landmark x2, time); VP pass 4; CB pass 3 (landmark x2, color);
    # S_CB = 2 (landmark x2) / 3; S_LP = (1/2 + 1/2) / 2 = 50; LP = (1/2 + 1/2 + 1 + 1) / 4 = 75
    _approx(
        bench.metrics(twice),
        {"S_CK": 75.0, "S_VP": 100.0, "CB": 75.0, "S_CB": 200 / 3, "S_LP": 50.0, "LP": 75.0, "n_instances": 4.0},
    )


def test_metrics_vp_failure_alone_excludes_from_s_lp(bench_dir):
    bench = VLind()
    wrong = {"landmark/1/vp/0/2": "True", "landmark/1/lp/1/2": "True"}
    # landmark fails VP only (d = 1/2); color and time pass everything (d = 1)
    # S_VP = 2/3; S_CB = 3/3; S_LP = (1 + 1) / 2 = 100 (landmark excluded); LP = (1/2 + 1 + 1) / 3 = 83.33
    m = bench.metrics(_records(bench, bench.load(bench_dir, None), wrong=wrong))
    _approx(m, {"S_CK": 100.0, "S_VP": 200 / 3, "S_CB": 100.0, "S_LP": 100.0, "LP": 250 / 3, "n_LP": 2.0})


def test_metrics_incomplete_instance_fails(bench_dir):
    bench = VLind()
    records = _records(bench, bench.load(bench_dir, None))
    with pytest.raises(BenchmarkError, match="color/2.*incomplete"):
        bench.metrics([r for r in records if r["id"] != "color/2/vp/4/2"])
    with pytest.raises(BenchmarkError, match="time/4.*incomplete"):
        bench.metrics([r for r in records if not (r["instance"] == "time/4" and r["test"] == "lp")])
    with pytest.raises(BenchmarkError, match="no records"):
        bench.metrics([])


# -- native format ---------------------------------------------------------------------------------
def test_write_native_and_read_back(bench_dir, tmp_path):
    bench = VLind()
    samples = bench.load(bench_dir, None)
    records = _records(bench, samples)
    (path,) = bench.write_native(records, tmp_path / "native")
    assert path.name == "data.json"
    written = json.loads(path.read_text())
    assert [i["concept"] for i in written] == ["landmark", "color", "time"]
    lm = written[0]
    assert lm["causalmm_pred_a1_image"] == {"response": "True.", "answer": "True"}
    assert lm["causalmm_pred_d2"]["1"] == {"response": "True", "answer": "True"}
    assert set(lm["causalmm_pred_d1"]) == {"0", "1"}
    assert lm["aggregated_human_label_good_images"] == INSTANCES[0]["aggregated_human_label_good_images"]
    assert lm["non-existent_noun"] == "a lighthouse"

    for data in (bench_dir / "data.json", None):
        back = bench.read_predictions(path, data, None)
        assert [r["id"] for r in back] == [s.id for s in samples]
        for r in back:
            r.update(bench.parse(r))
        _approx(bench.metrics(back), HAND)


def test_write_native_one_file_per_seed(bench_dir, tmp_path):
    bench = VLind(model_key="mine")
    samples = bench.load(bench_dir, None)
    paths = bench.write_native(_records(bench, samples, seed=0) + _records(bench, samples, {}, seed=1), tmp_path)
    assert [p.name for p in paths] == ["data_seed0.json", "data_seed1.json"]
    assert "mine_pred_b1" in json.loads(paths[1].read_text())[0]
    _approx(bench.metrics([{**r, **bench.parse(r)} for r in bench.read_predictions(paths[0], None, None)]), HAND)


def test_read_predictions_matches_by_id_and_picks_model(bench_dir, tmp_path):
    bench = VLind()
    samples = bench.load(bench_dir, None)
    (path,) = bench.write_native(_records(bench, samples), tmp_path / "a")
    preds = json.loads(path.read_text())
    # reversed order (matched by id, not position) and a second model's answers (all right)
    for inst in preds:
        for key in [k for k in inst if k.startswith("causalmm_pred_")]:
            value = inst[key]
            if key.endswith(("_d1", "_d2")):
                inst[key.replace("causalmm", "other")] = {
                    i: {"response": "True" if key.endswith("1") else "False"} for i in value
                }
            else:
                inst[key.replace("causalmm", "other")] = {"response": "True" if "1" in key[-8:] else "False"}
    (tmp_path / "two.json").write_text(json.dumps(preds[::-1]))
    with pytest.raises(BenchmarkError, match=r"several models \(causalmm, other\).*model_key"):
        bench.read_predictions(tmp_path / "two.json", bench_dir, None)
    mine = VLind(model_key="causalmm_pred").read_predictions(tmp_path / "two.json", bench_dir, None)
    assert [r["id"] for r in mine] == [s.id for s in samples]
    _approx(bench.metrics([{**r, **bench.parse(r)} for r in mine]), HAND)
    other = VLind(model_key="other").read_predictions(tmp_path / "two.json", bench_dir, None)
    assert bench.metrics([{**r, **bench.parse(r)} for r in other])["S_LP"] == 100.0
    with pytest.raises(BenchmarkError, match="no gpt4o_pred_.*causalmm, other"):
        VLind(model_key="gpt4o").read_predictions(tmp_path / "two.json", bench_dir, None)


def test_read_predictions_missing_answers(bench_dir, tmp_path):
    bench = VLind()
    (path,) = bench.write_native(_records(bench, bench.load(bench_dir, None)), tmp_path / "a")
    preds = json.loads(path.read_text())
    del preds[1]["causalmm_pred_d2"]["4"]
    (tmp_path / "hole.json").write_text(json.dumps(preds, indent=4))
    with pytest.raises(
        BenchmarkError, match=r"hole\.json: line \d+ \(instance 2\) \(color/2\): no causalmm_pred_d2\['4'\]"
    ):
        bench.read_predictions(tmp_path / "hole.json", None, None)
    (tmp_path / "short.json").write_text(json.dumps(preds[:1]))
    with pytest.raises(BenchmarkError, match="no predictions for instance color/2"):
        bench.read_predictions(tmp_path / "short.json", bench_dir, None)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(INSTANCES))
    with pytest.raises(BenchmarkError, match="not a VLind-Bench prediction file"):
        bench.read_predictions(plain, None, None)


# -- errors ----------------------------------------------------------------------------------------
def test_errors_name_file_and_place(tmp_path, bench_dir):
    bench = VLind()
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"concept": "x",\n  oops}\n]')
    with pytest.raises(BenchmarkError, match=r"bad\.json: line 3: not valid JSON"):
        bench.load(bad, tmp_path)
    broken = [dict(INSTANCES[0]), {k: v for k, v in INSTANCES[1].items() if k != "best_img_id"}]
    bad.write_text(json.dumps(broken, indent=2))
    with pytest.raises(BenchmarkError, match=r"bad\.json: line \d+ \(instance 2\): missing field\(s\) best_img_id"):
        bench.load(bad, tmp_path)
    bad.write_text(json.dumps([{**INSTANCES[0], "aggregated_human_label_good_images": ["0"]}]))
    with pytest.raises(BenchmarkError, match=r"instance 1\).*aggregated_human_label_good_images"):
        bench.load(bad, tmp_path)
    bad.write_text(json.dumps([INSTANCES[0], INSTANCES[0]]))
    with pytest.raises(BenchmarkError, match="instance 2.*duplicate instance landmark/1"):
        bench.load(bad, tmp_path)
    bad.write_text("")
    with pytest.raises(BenchmarkError, match="is empty"):
        bench.load(bad, tmp_path)
    bad.write_text("[]")
    with pytest.raises(BenchmarkError, match="holds no instances"):
        bench.load(bad, tmp_path)
    bad.write_text(json.dumps([INSTANCES[2]]))
    with pytest.raises(BenchmarkError, match=">= 2 good-image votes"):
        bench.load(bad, tmp_path)
    with pytest.raises(BenchmarkError, match="not found"):
        bench.load(tmp_path / "nope.json", tmp_path)
    for option in ({"style": "anime"}, {"prompts": "llava"}, {"vote_thres": "2"}):
        with pytest.raises(BenchmarkError):
            VLind(**option)


def test_missing_images(bench_dir, tmp_path):
    # the runner checks images after --limit (load_run_samples), so a partial image folder serves a limited run
    (bench_dir / "images/counterfactual/color/2_Bananas are blue/4.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"1 image\(s\) referenced by .* are missing.*4\.jpg"):
        load_run_samples(VLind(), bench_dir, None, None)
    with pytest.raises(BenchmarkError, match="missing"):
        load_run_samples(VLind(), bench_dir / "data.json", tmp_path / "elsewhere", None)


def test_cli_eval_then_score_the_native_file_end_to_end(bench_dir, model_dirs, causalmm_cli, tmp_path):
    out = tmp_path / "run"
    causalmm_cli(
        "eval",
        "vlind",
        "--model",
        model_dirs["llava"],
        "--data",
        bench_dir,
        "--out",
        out,
        "--method",
        "regular",
        "--max-new-tokens",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 28 and metrics["native_files"] == ["data.json"]
    assert set(HAND) <= set(metrics["metrics"])
    causalmm_cli("score", "vlind", out / "data.json", "--data", bench_dir / "data.json", "--out", tmp_path / "s")
    scored = json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"]
    assert scored == metrics["metrics"]


def test_png_images_are_accepted_where_the_official_layout_has_jpg(bench_dir):
    jpg = bench_dir / "images/counterfactual/color/2_Bananas are blue/4.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()
    samples = load_run_samples(VLind(), bench_dir, None, None)  # no missing-image error
    assert jpg.with_suffix(".png") in {s.image for s in samples}
