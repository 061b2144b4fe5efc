"""POPE and MME: loaders for every layout, answer parsing, metrics against hand-computed values, errors."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from causalmm.benchmarks import BenchmarkError, get_benchmark
from causalmm.benchmarks.base import check_images, read_json_records
from causalmm.benchmarks.mme import parse_mme
from causalmm.benchmarks.pope import parse_official, parse_substring, yes_no_metrics
from causalmm.benchmarks.score import score_predictions

SHARED_POPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pope"


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _records(bench, labels, texts, **meta):
    recs = [
        {"id": str(i), "seed": 0, "label": g, "text": t, **meta}
        for i, (g, t) in enumerate(zip(labels, texts, strict=True))
    ]
    return [{**r, **bench.parse(r)} for r in recs]


# -- POPE parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, answer, parseable",
    [
        ("Yes.", "yes", True),
        ("Yes", "yes", True),
        ("No, there is not", "no", True),
        ("There is no cat", "no", True),
        ("no.", "no", True),
        ("Yes, but not entirely.", "no", True),  # the official rule: "not" in the first sentence wins
        ("Yes. There is no dog elsewhere.", "yes", True),  # only the first sentence counts
        ("", "yes", False),  # the official script scores it "yes"; we also count it unparseable
        ("The sky is blue", "yes", False),
    ],
)
def test_pope_official_parsing(text, answer, parseable):
    assert parse_official(text) == (answer, parseable)


def test_pope_substring_variant_is_label_dependent_like_the_original_script():
    assert parse_substring("Yes.", "yes")[0] == "yes"
    assert parse_substring("Nothing like it", "no")[0] == "no"  # "no" substring: counted as no
    assert parse_substring("I see snow", "no")[0] == "no"  # the substring rule's known false match
    assert parse_substring("Yes", "no")[0] == "yes"
    assert parse_substring("The answer is unclear", "yes")[0] == "no"


def test_pope_metrics_hand_computed():
    # labels y y n n n ; answers y n y n n -> TP=1 FN=1 FP=1 TN=2
    m = yes_no_metrics(["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", "no"])
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(50.0)
    assert m["recall"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(50.0)
    assert m["yes_ratio"] == pytest.approx(40.0)
    # nothing predicted yes: precision and F1 are 0, not a division error
    z = yes_no_metrics(["yes", "no"], ["no", "no"])
    assert z["precision"] == 0.0 and z["f1"] == 0.0 and z["accuracy"] == 50.0


def test_pope_benchmark_counts_unparseable_and_names_the_variant():
    bench = get_benchmark("pope")
    recs = _records(bench, ["yes", "no", "no", "yes"], ["Yes.", "There is no cat", "", "I like trains"])
    m = bench.metrics(recs)
    assert m["unparseable"] == 2 and m["n"] == 4
    # "Yes." right, "There is no cat" -> no (right), "" -> yes (wrong: label no), "I like trains" -> yes (right)
    assert m["accuracy"] == pytest.approx(75.0)
    assert bench.describe()["parse"] == "official"
    sub = get_benchmark("pope", parse="substring")
    assert sub.describe()["parse"] == "substring"
    with pytest.raises(BenchmarkError, match="official or substring"):
        get_benchmark("pope", parse="fuzzy")


# -- POPE data ---------------------------------------------------------------------------------------------
def _pope_file(tmp_path, rows, name="q.json", array=False):
    path = tmp_path / name
    if array:
        path.write_text(json.dumps(rows, indent=4))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _pope_rows():
    return [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "Yes"},
    ]


@pytest.mark.parametrize("array", [False, True])
def test_pope_loads_json_lines_and_arrays(tmp_path, array):
    path = _pope_file(tmp_path, _pope_rows(), array=array)
    samples = get_benchmark("pope").load(path, tmp_path / "imgs")
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert samples[0].prompt == "Is there a cat in the image? Please answer this question with one word."
    assert samples[2].meta["label"] == "yes" and samples[0].image == tmp_path / "imgs" / "a.jpg"
    custom = get_benchmark("pope", suffix=" Answer yes or no.").load(path, None)
    assert custom[0].prompt.endswith("image? Answer yes or no.")


@pytest.mark.skipif(not SHARED_POPE.is_dir(), reason="../shared/data/pope not present")
def test_all_nine_official_pope_files_load():
    files = sorted(SHARED_POPE.glob("*.json"))
    assert len(files) == 9
    bench = get_benchmark("pope")
    for f in files:
        samples = bench.load(f, None)
        assert len(samples) == 3000, f
        assert len({s.id for s in samples}) == 3000
        assert sum(s.meta["label"] == "yes" for s in samples) == 1500


def test_pope_errors_name_file_and_line(tmp_path):
    bench = get_benchmark("pope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_pope_rows()[0]) + "\n{not json\n")
    with pytest.raises(BenchmarkError, match=r"bad\.json: line 2"):
        bench.load(bad, None)
    label = _pope_file(tmp_path, [{**_pope_rows()[0], "label": "maybe"}], name="label.json")
    with pytest.raises(BenchmarkError, match=r"label\.json: line 1: label 'maybe' is not yes/no"):
        bench.load(label, None)
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match="is empty"):
        bench.load(empty, None)
    missing = _pope_file(tmp_path, [{"question_id": 1, "image": "a.jpg", "label": "yes"}], name="m.json")
    with pytest.raises(BenchmarkError, match="missing field.*text"):
        bench.load(missing, None)
    dup = _pope_file(tmp_path, [_pope_rows()[0], _pope_rows()[0]], name="dup.json")
    with pytest.raises(BenchmarkError, match="line 2: duplicate question_id 1"):
        bench.load(dup, None)


def test_array_errors_point_at_the_item_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"a": 1}, {"b": 2}, {"c": 3}], indent=4))
    lines = [ln for ln, _ in read_json_records(path, what="x")]
    assert lines == [2, 5, 8]


def test_missing_images_error_counts_and_names_the_first(tmp_path):
    path = _pope_file(tmp_path, _pope_rows())
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (4, 4)).save(imgs / "a.jpg")
    samples = get_benchmark("pope").load(path, imgs)
    with pytest.raises(BenchmarkError, match=r"1 image\(s\) .* missing .*b\.jpg"):
        check_images(samples, imgs, path)
    Image.new("RGB", (4, 4)).save(imgs / "b.jpg")
    check_images(samples, imgs, path)  # all present: no error


def _parquet(path: Path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_pope_hf_parquet_layout_with_categories(tmp_path):
    img = {"bytes": _png(), "path": None}
    _parquet(
        tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet",
        {
            "question_id": ["1", "2", "1", "2"],
            "question": ["Is there a cat in the image?", "Is there a dog in the image?"] * 2,
            "answer": ["yes", "no", "yes", "no"],
            "image": [img] * 4,
            "category": ["adversarial", "adversarial", "random", "random"],
        },
    )
    bench = get_benchmark("pope")
    samples = bench.load(tmp_path / "POPE", None)
    assert [s.id for s in samples] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert isinstance(samples[0].image, bytes)
    only = get_benchmark("pope", category="random").load(tmp_path / "POPE", None)
    assert [s.id for s in only] == ["1", "2"] and all(s.meta["category"] == "random" for s in only)
    recs = [{**{"id": s.id, "seed": 0, "text": "Yes", **s.meta}} for s in samples]
    m = bench.metrics([{**r, **bench.parse(r)} for r in recs])
    assert m["adversarial/accuracy"] == 50.0 and m["random/accuracy"] == 50.0


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkError, match="hub is disabled"):
        get_benchmark("pope").load(Path("lmms-lab/POPE"), None)


def test_pope_score_only_matches_by_question_id_not_line_order(tmp_path):
    q = _pope_file(tmp_path, _pope_rows())
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "\n".join(
            json.dumps(a)
            for a in [
                {"question_id": 3, "text": "No."},  # LLaVA's key
                {"question_id": 1, "answer": "Yes, there is."},  # POPE's key
                {"question_id": 2, "text": "No, there is not."},
            ]
        )
    )
    bench = get_benchmark("pope")
    recs = bench.read_predictions(answers, q, None)
    assert [r["id"] for r in recs] == ["1", "2", "3"]
    m = bench.metrics([{**r, "seed": 0, **bench.parse(r)} for r in recs])
    assert m["accuracy"] == pytest.approx(200 / 3)  # q3 labelled yes, answered no
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n")
    with pytest.raises(BenchmarkError, match="answers 1 of the 3 questions"):
        bench.read_predictions(short, q, None)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"question_id": 99, "text": "Yes"}) + "\n")
    with pytest.raises(BenchmarkError, match="line 1: question_id 99 is not in"):
        bench.read_predictions(unknown, q, None)


# -- MME -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, answer",
    [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("I don't know", "other"), ("", "other")],
)
def test_mme_parsing_follows_calculation_py(text, answer):
    assert parse_mme(text) == answer


def _mme_results_dir(tmp_path):
    res = tmp_path / "Your_Results"
    res.mkdir()
    (res / "existence.txt").write_text(
        "1.jpg\tIs there a dog? Please answer yes or no.\tYes\n"
        "1.jpg\tIs there a cat? Please answer yes or no.\tNo\n"
        "2.jpg\tIs there a car? Please answer yes or no.\tYes\n"
        "2.jpg\tIs there a bus? Please answer yes or no.\tNo\n"
    )
    (res / "code_reasoning.txt").write_text(
        "0020.png\tWill it print 3? Please answer yes or no.\tYes\n"
        "0020.png\tWill it print 4? Please answer yes or no.\tNo\n"
    )
    return res


def test_mme_acc_plus_when_one_of_two_answers_is_wrong(tmp_path):
    bench = get_benchmark("mme")
    samples = bench.load(_mme_results_dir(tmp_path), tmp_path / "release")
    assert [s.id for s in samples][:2] == ["existence/1.jpg#0", "existence/1.jpg#1"]
    assert samples[0].image == tmp_path / "release" / "existence" / "1.jpg"
    answers = ["Yes", "No", "Yes", "Yes", "Yes.", "No"]  # image 2's second answer is wrong
    recs = [{"id": s.id, "seed": 0, "text": a, **s.meta} for s, a in zip(samples, answers, strict=True)]
    m = bench.metrics([{**r, **bench.parse(r)} for r in recs])
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: 100 + 100 = 200
    assert m["existence/acc"] == 75.0 and m["existence/acc_plus"] == 50.0 and m["existence/score"] == 125.0
    assert m["code_reasoning/score"] == 200.0
    assert m["perception"] == 125.0 and m["cognition"] == 200.0 and m["total"] == 325.0
    assert m["hallucination"] == 125.0  # existence is in the hallucination subset, code_reasoning is not


# Three images whose two questions are not on adjacent lines (1a 2a 1b 2b 3a 3b); right: 1a 2a 3a 3b.
# By image: 1 (right, wrong), 2 (right, wrong), 3 (right, right) -> acc 4/6 = 66.67, acc+ 1/3 = 33.33, score 100.
# Pairing consecutive lines instead: (1a, 2a) both right, (1b, 2b) none, (3a, 3b) both -> acc+ 2/3, score 133.33.
_SPREAD = [
    ("1.jpg", "Is there a dog?", "Yes", "Yes"),
    ("2.jpg", "Is there a car?", "Yes", "Yes"),
    ("1.jpg", "Is there a cat?", "No", "Yes"),
    ("2.jpg", "Is there a bus?", "No", "Yes"),
    ("3.jpg", "Is there a cup?", "Yes", "Yes"),
    ("3.jpg", "Is there a pen?", "No", "No"),
]


def _spread_dir(tmp_path, name, columns):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "existence.txt").write_text("".join("\t".join(line[:columns]) + "\n" for line in _SPREAD))
    return folder


def test_mme_acc_plus_pairs_by_image_when_an_images_lines_are_not_adjacent(tmp_path):
    from causalmm.benchmarks.runner import limit_samples
    from causalmm.benchmarks.score import score_predictions

    bench = get_benchmark("mme")
    samples = bench.load(_spread_dir(tmp_path, "questions", 3), None)
    # an image's questions are put together, so --limit keeps both and the bootstrap unit is the image
    assert [s.id for s in samples] == [f"existence/{i}.jpg#{k}" for i in (1, 2, 3) for k in (0, 1)]
    assert [s.id for s in limit_samples(bench, samples, 1)] == ["existence/1.jpg#0", "existence/1.jpg#1"]
    assert bench.unit({"id": samples[0].id, **samples[0].meta}) == bench.unit({"id": samples[1].id, **samples[1].meta})
    predicted = {(img, q): pred for img, q, _, pred in _SPREAD}
    recs = [{"id": s.id, "seed": 0, "text": predicted[s.meta["image"], s.meta["question"]], **s.meta} for s in samples]
    recs = [{**r, **bench.parse(r)} for r in recs]
    by_hand = {"existence/acc": 400 / 6, "existence/acc_plus": 100 / 3, "existence/score": 100.0}
    for order in (recs, recs[::-1], [recs[i] for i in (0, 2, 1, 4, 3, 5)]):  # `eval`: any record order
        m = bench.metrics(order)
        assert {k: m[k] for k in by_hand} == pytest.approx(by_hand)
    # `score` on a Your_Results file with the lines spread out
    scored = score_predictions("mme", _spread_dir(tmp_path, "Your_Results", 4), n_boot=20)
    assert {k: scored["metrics"][k] for k in by_hand} == pytest.approx(by_hand)
    # the files written for calculation.py have each image's two lines adjacent, whatever the record order
    (path,) = bench.write_native([recs[i] for i in (0, 2, 1, 4, 3, 5)], tmp_path / "out")
    assert [line.split("\t")[0] for line in path.read_text().splitlines()] == ["1.jpg", "1.jpg", "2.jpg", "2.jpg",
                                                                              "3.jpg", "3.jpg"]  # fmt: skip
    with pytest.raises(BenchmarkError, match="existence/2.jpg: 1 answer.*both of its questions"):
        bench.metrics(recs[:3])


def test_mme_native_results_round_trip(tmp_path):
    bench = get_benchmark("mme")
    samples = bench.load(_mme_results_dir(tmp_path), None)
    texts = ["Yes", "No", "No", "No", "Yes\twith a tab", "No"]
    recs = [{**{"id": s.id, "seed": 0, "text": t, **s.meta}} for s, t in zip(samples, texts, strict=True)]
    recs = [{**r, **bench.parse(r)} for r in recs]
    paths = bench.write_native(recs, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["code_reasoning.txt", "existence.txt"]
    line = (tmp_path / "out" / "Your_Results" / "existence.txt").read_text().splitlines()[0]
    assert line.split("\t") == ["1.jpg", "Is there a dog? Please answer yes or no.", "Yes", "Yes"]
    back = bench.read_predictions(tmp_path / "out" / "Your_Results", None, None)
    again = bench.metrics([{**r, "seed": 0, **bench.parse(r)} for r in back])
    assert again == bench.metrics(recs)


def test_mme_native_results_one_folder_per_seed_when_several(tmp_path):
    """calculation.py scores one answer per question: several seeds' answers in one file would be paired across
    seeds (and `score mme` refuses an image with four answers), so each seed gets its own folder."""
    bench = get_benchmark("mme")
    samples = bench.load(_mme_results_dir(tmp_path), None)
    recs = []
    for seed, texts in ((0, ["Yes", "No", "No", "No", "Yes", "No"]), (1, ["No", "No", "Yes", "No", "Yes", "Yes"])):
        recs += [{"id": s.id, "seed": seed, "text": t, **s.meta} for s, t in zip(samples, texts, strict=True)]
    recs = [{**r, **bench.parse(r)} for r in recs]
    paths = bench.write_native(recs, tmp_path / "out")
    assert sorted({p.parent.name for p in paths}) == ["Your_Results_seed0", "Your_Results_seed1"]
    for seed in (0, 1):
        back = bench.read_predictions(tmp_path / "out" / f"Your_Results_seed{seed}", None, None)
        mine = [r for r in recs if r["seed"] == seed]
        assert bench.metrics([{**r, "seed": 0, **bench.parse(r)} for r in back]) == bench.metrics(mine)


def test_mme_release_folder_flat_and_nested_variants(tmp_path):
    rel = tmp_path / "MME_Benchmark_release_version"
    (rel / "color").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(rel / "color" / "000001.jpg")
    (rel / "color" / "000001.txt").write_text("Is the car red? Please answer yes or no.\tYes\nIs the car blue?\tNo\n")
    (rel / "artwork" / "images").mkdir(parents=True)
    (rel / "artwork" / "questions_answers_YN").mkdir()
    Image.new("RGB", (4, 4)).save(rel / "artwork" / "images" / "10002.jpg")
    (rel / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this by Monet?\tNo\nIs this a painting?\tYes\n"
    )
    samples = get_benchmark("mme").load(rel, None)
    by_id = {s.id: s for s in samples}
    assert set(by_id) == {"artwork/10002.jpg#0", "artwork/10002.jpg#1", "color/000001.jpg#0", "color/000001.jpg#1"}
    assert by_id["artwork/10002.jpg#0"].image == rel / "artwork" / "images" / "10002.jpg"
    assert by_id["color/000001.jpg#1"].image == rel / "color" / "000001.jpg"
    assert by_id["artwork/10002.jpg#1"].meta["label"] == "yes"
    check_images(samples, None, rel)


def test_mme_hf_parquet_layout(tmp_path):
    img = {"bytes": _png(), "path": None}
    _parquet(
        tmp_path / "MME" / "data" / "test-00000.parquet",
        {
            "question_id": ["code_reasoning/0020.png"] * 2,
            "question": ["Will it print 3? Please answer yes or no.", "Will it print 4? Please answer yes or no."],
            "answer": ["Yes", "No"],
            "image": [img, img],
            "category": ["code_reasoning"] * 2,
        },
    )
    samples = get_benchmark("mme").load(tmp_path / "MME", None)
    assert [s.id for s in samples] == ["code_reasoning/0020.png#0", "code_reasoning/0020.png#1"]


def test_mme_errors(tmp_path):
    bench = get_benchmark("mme")
    res = tmp_path / "r"
    res.mkdir()
    (res / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\n1.jpg\tIs there a cat?\n")
    with pytest.raises(BenchmarkError, match=r"existence\.txt: line 2: expected image<TAB>question<TAB>answer"):
        bench.load(res, None)
    (res / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\n1.jpg\tIs there a cat?\tMaybe\n")
    with pytest.raises(BenchmarkError, match="line 2: answer 'Maybe' is not Yes/No"):
        bench.load(res, None)
    (res / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\n")
    with pytest.raises(BenchmarkError, match="exactly two questions per image"):
        bench.load(res, None)
    (res / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\n1.jpg\tIs there a cat?\tNo\n")
    (res / "notes.txt").write_text("hello\n")
    with pytest.raises(BenchmarkError, match="notes.txt is not an MME subtask file"):
        bench.load(res, None)
    (tmp_path / "r2").mkdir()
    with pytest.raises(BenchmarkError, match="no MME subtask"):
        bench.load(tmp_path / "r2", None)


def test_unknown_benchmark_and_option():
    with pytest.raises(BenchmarkError, match="unknown benchmark 'gqa'"):
        get_benchmark("gqa")
    with pytest.raises(BenchmarkError, match="mme does not take option.*prompt"):
        get_benchmark("mme", prompt="Describe.")


def test_mme_cli_eval_then_score_your_results_end_to_end(tmp_path, model_dirs, causalmm_cli):
    res = _mme_results_dir(tmp_path)
    rel = tmp_path / "release"
    for sub, names in (("existence", ("1.jpg", "2.jpg")), ("code_reasoning", ("0020.png",))):
        (rel / sub).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(rel / sub / name)
    out = tmp_path / "run"
    causalmm_cli(
        "eval",
        "mme",
        "--model",
        model_dirs["llava"],
        "--data",
        res,
        "--images",
        rel,
        "--out",
        out,
        "--max-new-tokens",
        "2",
        "--batch-size",
        "3",
        "--no-progress",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 6 and {"perception", "cognition", "total", "hallucination"} <= set(
        metrics["metrics"]
    )
    lines = (out / "Your_Results" / "existence.txt").read_text().splitlines()
    assert len(lines) == 4 and all(len(ln.split("\t")) == 4 for ln in lines)
    causalmm_cli("score", "mme", out / "Your_Results", "--out", tmp_path / "s")
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"] == metrics["metrics"]


def test_pope_datasets_save_to_disk_arrow_layout(tmp_path):
    import datasets  # in the test extra: this must run, not skip

    ds = datasets.Dataset.from_dict(
        {
            "question_id": ["7", "8"],
            "question": ["Is there a cat in the image?", "Is there a dog in the image?"],
            "answer": ["no", "yes"],
            "image": [{"bytes": _png(), "path": None}, {"bytes": _png((0, 0, 255)), "path": None}],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "pope_arrow"))
    samples = get_benchmark("pope").load(tmp_path / "pope_arrow", None)
    assert [s.id for s in samples] == ["7", "8"] and [s.meta["label"] for s in samples] == ["no", "yes"]
    with Image.open(io.BytesIO(samples[1].image)) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)


def test_options_that_do_not_apply_to_the_data_are_refused(tmp_path):
    """An option the data cannot use is refused, never ignored and recorded in run.json as if it had applied."""
    img = {"bytes": _png(), "path": None}
    questions = ["Is there a cat?", "Is there a dog?"]
    table = {"question_id": ["1", "2"], "question": questions, "answer": ["yes", "no"], "image": [img] * 2}
    _parquet(tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet", {**table, "category": ["random"] * 2})
    _parquet(tmp_path / "MME" / "data" / "test-00000.parquet", {**table, "question_id": ["existence/1.jpg"] * 2,
             "answer": ["Yes", "No"], "category": ["existence"] * 2})  # fmt: skip
    with pytest.raises(BenchmarkError, match=r"--images does not apply to .*POPE: its table holds the images"):
        get_benchmark("pope").load(tmp_path / "POPE", tmp_path)
    with pytest.raises(BenchmarkError, match=r"--images does not apply to .*MME: its table holds the images"):
        get_benchmark("mme").load(tmp_path / "MME", tmp_path)
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}))
    with pytest.raises(BenchmarkError, match=r"--category applies to the Hugging Face layout.*drop --category"):
        get_benchmark("pope", category="random").load(questions, None)
    assert len(get_benchmark("pope", category="random").load(tmp_path / "POPE", None)) == 2  # where it applies
    results = tmp_path / "Your_Results"
    results.mkdir()
    (results / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\tYes\n1.jpg\tIs there a cat?\tNo\tNo\n")
    with pytest.raises(BenchmarkError, match="--data does not apply to MME predictions"):
        score_predictions("mme", results, data=questions)
    assert score_predictions("mme", results, n_boot=0)["n_records"] == 2
