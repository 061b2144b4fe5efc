"""AMBER, discriminative half: loading the official layout, the official parsing and metrics (hand-computed and
against a re-derivation of ``inference.py``'s counters), errors, an end-to-end resumable run and re-scoring."""

import json
import random
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

from causalmm import CausalMMConfig
from causalmm.benchmarks import BenchmarkError, get_benchmark
from causalmm.benchmarks.amber import TYPES, amber_metrics, parse_official, parse_substring
from causalmm.benchmarks.base import UnparseableWarning
from causalmm.benchmarks.evaluate import RunSpec, evaluate
from causalmm.benchmarks.score import score_predictions

#: a miniature release: (id, image, query, annotation type, truth); ids 1-2 are the generative half
ITEMS = [
    (1, "AMBER_1.jpg", "Describe this image.", "generative", ["sky", "tree"]),
    (2, "AMBER_2.jpg", "Describe this image.", "generative", ["dog"]),
    (3, "AMBER_1.jpg", "Is the sky sunny in this image?", "discriminative-attribute-state", "yes"),
    (4, "AMBER_1.jpg", "Is the sky gloomy in this image?", "discriminative-attribute-state", "no"),
    (5, "AMBER_2.jpg", "Is there one dog in this image?", "discriminative-attribute-number", "yes"),
    (6, "AMBER_2.jpg", "Are there two dogs in this image?", "discriminative-attribute-number", "no"),
    (7, "AMBER_2.jpg", "Is the dog running in this image?", "discriminative-attribute-action", "yes"),
    (8, "AMBER_2.jpg", "Is the dog eating in this image?", "discriminative-attribute-action", "no"),
    (9, "AMBER_1.jpg", "Is there a cloud in this image?", "discriminative-hallucination", "no"),
    (10, "AMBER_2.jpg", "Is there a cat in this image?", "discriminative-hallucination", "no"),
    (11, "AMBER_2.jpg", "Is there direct contact between the dog and grass?", "discriminative-relation", "yes"),
    (12, "AMBER_1.jpg", "Is there direct contact between the sky and tree?", "relation", "no"),
]


def _annotation(i, kind, truth):
    if kind == "generative":
        return {"id": i, "type": kind, "truth": truth, "hallu": ["cat"]}
    return {"id": i, "type": kind, "truth": truth}


def _write(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=4))
    return path


@pytest.fixture
def release(tmp_path):
    """The official layout: data/query/query_*.json, data/annotations.json, and an image folder."""
    data = tmp_path / "AMBER" / "data"
    _write(data / "annotations.json", [_annotation(i, k, t) for i, _, _, k, t in ITEMS])
    queries = [{"id": i, "image": img, "query": q} for i, img, q, _, _ in ITEMS]
    _write(data / "query" / "query_all.json", queries)
    _write(data / "query" / "query_discriminative.json", queries[2:])
    _write(data / "query" / "query_generative.json", queries[:2])
    return data


def _records(bench, rows):
    """Parsed records of (dimension, label, text) rows."""
    recs = [{"id": str(i), "seed": 0, "dimension": d, "label": g, "text": t} for i, (d, g, t) in enumerate(rows)]
    return [{**r, **bench.parse(r)} for r in recs]


# -- parsing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, official, substring",
    [
        ("Yes", "yes", "yes"),
        ("No", "no", "no"),
        ("yes", "other", "yes"),  # inference.py compares the whole response, case and all
        ("No.", "other", "no"),
        (" No", "other", "no"),
        ("Yes, there is no dog.", "other", "yes"),  # lmms-eval's port looks for "yes" first
        ("There is nothing", "other", "no"),  # ... and "no" anywhere, "nothing" included
        ("A cat.", "other", "other"),
        ("", "other", "other"),
    ],
)
def test_official_and_substring_parsing(text, official, substring):
    assert parse_official(text) == official
    assert parse_substring(text) == substring


# -- metrics: hand-computed ---------------------------------------------------------------------------------
CRAFTED = [
    # existence (all "no", as in the release): two caught, one "Yes", one unparseable "No."
    ("existence", "no", "No"),
    ("existence", "no", "No"),
    ("existence", "no", "Yes"),
    ("existence", "no", "No."),
    # state: right, right, a false "No"
    ("state", "yes", "Yes"),
    ("state", "no", "No"),
    ("state", "yes", "No"),
    # number: one caught, one unparseable
    ("number", "no", "No"),
    ("number", "no", "maybe"),
    # action: no "no" answer and no "no" truth
    ("action", "yes", "Yes"),
    # relation: no "no" answer at all
    ("relation", "yes", "Yes"),
    ("relation", "no", "Yes"),
]


def test_metrics_hand_computed_for_every_dimension():
    bench = get_benchmark("amber")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2 of 12 unparseable: no warning
        m = bench.metrics(_records(bench, CRAFTED))

    def f1(p, r, eps=0.0001):  # the script's F1 of the printed (one-decimal) P and R
        return 2 * (p / 100) * (r / 100) / (p / 100 + r / 100 + eps) * 100

    def approx(x):  # the denominators are 0.001 plus the count, added one at a time: equal to the last bits or so
        return pytest.approx(x, rel=1e-12)

    expected = {
        # 12 questions, 7 right; 8 truths "no", 5 answers "No", 4 of them right
        "accuracy": 100 * 7 / 12.001, "precision": 100 * 4 / 5.001, "recall": 100 * 4 / 8.001, "f1": f1(80.0, 50.0),
        "existence/accuracy": 100 * 2 / 4.001, "existence/precision": 100 * 2 / 2.001,
        "existence/recall": 100 * 2 / 4.001, "existence/f1": f1(100.0, 50.0, eps=0.001),
        "state/accuracy": 100 * 2 / 3.001, "state/precision": 100 * 1 / 2.001, "state/recall": 100 * 1 / 1.001,
        "state/f1": f1(50.0, 99.9),
        "number/accuracy": 100 * 1 / 2.001, "number/precision": 100 * 1 / 1.001, "number/recall": 100 * 1 / 2.001,
        "number/f1": f1(99.9, 50.0),
        "action/accuracy": 100 * 1 / 1.001, "action/precision": 0.0, "action/recall": 0.0, "action/f1": 0.0,
        "relation/accuracy": 100 * 1 / 2.001, "relation/precision": 0.0, "relation/recall": 0.0, "relation/f1": 0.0,
        # attribute pools state, number and action, each counter seeded: 3.001 + 2.001 + 1.001
        "attribute/accuracy": 100 * 4 / 6.003, "attribute/precision": 100 * 2 / 3.003,
        "attribute/recall": 100 * 2 / 3.003, "attribute/f1": f1(66.6, 66.6),
    }  # fmt: skip
    assert {k: m[k] for k in expected} == {k: approx(v) for k, v in expected.items()}
    # what the official script prints for these answers: round(value, 1)
    printed = {k: round(m[k], 1) for k in ("accuracy", "precision", "recall", "f1")}
    assert printed == {"accuracy": 58.3, "precision": 80.0, "recall": 50.0, "f1": 61.5}
    existence = [round(m[f"existence/{k}"], 1) for k in ("accuracy", "precision", "recall", "f1")]
    assert existence == [50.0, 100.0, 50.0, 66.6]
    assert m["unparseable"] == 2 and m["n"] == 12 and m["unparseable_pct"] == pytest.approx(100 * 2 / 12)
    assert bench.headline_metrics(m) == ["accuracy", "precision", "recall", "f1"]


def test_a_dimension_without_no_answers_scores_zero_and_only_present_dimensions_are_reported():
    bench = get_benchmark("amber", dimension="relation")
    m = bench.metrics(_records(bench, [("relation", "yes", "Yes"), ("relation", "no", "Yes")]))
    assert m["precision"] == m["recall"] == m["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(100 / 2.001)
    assert {k.split("/")[0] for k in m if "/" in k} == {"relation"}
    empty = amber_metrics([])  # nothing divides by zero: the denominators start at 0.001
    assert empty == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_substring_variant_reads_more_answers():
    bench = get_benchmark("amber", parse="substring")
    m = bench.metrics(_records(bench, CRAFTED))
    # "No." now counts as no (existence: 3 caught); "maybe" is still unparseable
    assert m["unparseable"] == 1
    assert m["existence/accuracy"] == pytest.approx(100 * 3 / 4.001)
    assert m["accuracy"] == pytest.approx(100 * 8 / 12.001)
    assert bench.describe() == {"dimension": "discriminative", "parse": "substring", "suffix": ""}


def test_most_answers_unparseable_warns():
    bench = get_benchmark("amber")
    with pytest.warns(UnparseableWarning, match="not exactly 'Yes' or 'No'"):
        m = bench.metrics(_records(bench, [("existence", "no", "no"), ("existence", "no", "nope"), CRAFTED[0]]))
    assert m["unparseable"] == 2 and m["accuracy"] == pytest.approx(100 / 3.001)


# -- metrics: against inference.py's counters ----------------------------------------------------------------
_GROUP = {
    "discriminative-attribute-state": "as",
    "discriminative-attribute-number": "an",
    "discriminative-attribute-action": "aa",
    "discriminative-hallucination": "ha",
}


def _official_printout(rows):
    """What AMBER's ``inference.py`` prints (``-e d``, ``de``, ``da``, ``dr``) for (type, truth, response) rows,
    re-derived from its discriminative branch: counters per type group plus the overall ``qa`` group, every
    denominator starting at 0.001 (``metrics.txt``), responses compared whole with "Yes"/"No", F1 of the rounded
    P and R with 0.0001 (existence: 0.001). Unrounded values, keyed as causalmm names them."""
    num = defaultdict(lambda: 0.001)
    score = defaultdict(int)
    for kind, truth, response in rows:
        for g in ("qa", _GROUP.get(kind, "asso")):  # any other type counts as relation
            num[g, "correct"] += 1
            if truth == "yes":
                score[g, "correct"] += response == "Yes"
            else:
                num[g, "no"] += 1
                if response == "No":
                    score[g, "correct"] += 1
                    score[g, "no"] += 1
            if response == "No":
                num[g, "ans_no"] += 1
                score[g, "ans_no"] += truth == "no"

    def block(groups, eps):
        def ratio(counter):
            return sum(score[g, counter] for g in groups) / sum(num[g, counter] for g in groups) * 100

        acc, p, r = ratio("correct"), ratio("ans_no"), ratio("no")
        pr, rr = round(p, 1), round(r, 1)
        f1 = 2 * (pr / 100) * (rr / 100) / ((pr / 100) + (rr / 100) + eps) * 100
        return {"accuracy": acc, "precision": p, "recall": r, "f1": f1}

    out = block(["qa"], 0.0001)
    for name, groups, eps in (("existence", ["ha"], 0.001), ("attribute", ["as", "an", "aa"], 0.0001),
                              ("state", ["as"], 0.0001), ("number", ["an"], 0.0001), ("action", ["aa"], 0.0001),
                              ("relation", ["asso"], 0.0001)):  # fmt: skip
        out.update({f"{name}/{k}": v for k, v in block(groups, eps).items()})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_the_official_counters_on_random_answers(seed):
    rng = random.Random(seed)
    kinds = list(TYPES)
    texts = ["Yes", "No", "yes", "No.", "", "Yes, it is."]
    weights = [rng.random() for _ in texts]
    rows = [(rng.choice(kinds), rng.choice(["yes", "no"]), rng.choices(texts, weights)[0]) for _ in range(400)]
    rows += [(kind, "no", "No") for kind in kinds]  # every group present, none empty
    bench = get_benchmark("amber")
    recs = _records(bench, [(TYPES[k], g, t) for k, g, t in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnparseableWarning)
        ours = bench.metrics(recs)
    official = _official_printout(rows)
    # the same floats, not just the same printout: the seeded sums are added one question at a time as there
    assert {k: ours[k] for k in official} == official
    assert {k: round(ours[k], 1) for k in official} == {k: round(v, 1) for k, v in official.items()}


# -- data ---------------------------------------------------------------------------------------------------
def test_query_all_keeps_the_discriminative_questions_and_finds_the_annotations(release):
    samples = get_benchmark("amber").load(release / "query" / "query_all.json", release.parent / "images")
    assert [s.id for s in samples] == [str(i) for i in range(3, 13)]
    assert [s.meta["dimension"] for s in samples] == ["state", "state", "number", "number", "action", "action",
                                                      "existence", "existence", "relation", "relation"]  # fmt: skip
    assert [s.meta["label"] for s in samples] == ["yes", "no"] * 3 + ["no", "no", "yes", "no"]
    assert samples[0].prompt == "Is the sky sunny in this image?"  # no suffix: the query as released
    assert samples[0].image == release.parent / "images" / "AMBER_1.jpg"
    last = {"image": "AMBER_1.jpg", "question": ITEMS[-1][2], "label": "no", "dimension": "relation"}
    assert samples[-1].meta == last
    asked = get_benchmark("amber", suffix=" Please answer this question with one word.").load(
        release / "query" / "query_discriminative.json", None
    )
    assert asked[0].prompt == "Is the sky sunny in this image? Please answer this question with one word."


@pytest.mark.parametrize(
    "dimension, ids",
    [
        ("existence", [9, 10]),
        ("attribute", [3, 4, 5, 6, 7, 8]),
        ("state", [3, 4]),
        ("number", [5, 6]),
        ("action", [7, 8]),
        ("relation", [11, 12]),  # "discriminative-relation" and the bare "relation" of the release
    ],
)
def test_dimension_option_keeps_its_questions(release, dimension, ids):
    samples = get_benchmark("amber", dimension=dimension).load(release / "query" / "query_all.json", None)
    assert [int(s.id) for s in samples] == ids


def test_annotations_option_file_or_folder_and_a_clear_error_without(release, tmp_path):
    elsewhere = tmp_path / "q.json"
    elsewhere.write_text((release / "query" / "query_discriminative.json").read_text())
    with pytest.raises(BenchmarkError, match=r"needs its annotations\.json .*--annotations"):
        get_benchmark("amber").load(elsewhere, None)
    for given in (release, release / "annotations.json", str(release / "annotations.json")):
        assert len(get_benchmark("amber", annotations=given).load(elsewhere, None)) == 10
    with pytest.raises(BenchmarkError, match=r"--annotations .*nope\.json: no such file"):
        get_benchmark("amber", annotations=tmp_path / "nope.json").load(elsewhere, None)
    with pytest.raises(BenchmarkError, match=r"--annotations .*: the folder holds no annotations\.json"):
        get_benchmark("amber", annotations=tmp_path).load(elsewhere, None)


def test_generative_half_is_refused_with_the_lmms_eval_pointer(release):
    with pytest.raises(BenchmarkError, match=r"spaCy.*no package registry.*lmms-eval --model causalmm .*amber_g"):
        get_benchmark("amber", dimension="generative")
    with pytest.raises(BenchmarkError, match=r"query_generative\.json holds only generative queries.*amber_g"):
        get_benchmark("amber").load(release / "query" / "query_generative.json", None)
    with pytest.raises(BenchmarkError, match="dimension 'hallucination' is unknown; choose one of discriminative"):
        get_benchmark("amber", dimension="hallucination")
    with pytest.raises(BenchmarkError, match="official or substring"):
        get_benchmark("amber", parse="fuzzy")
    with pytest.raises(BenchmarkError, match="amber does not take option.*category"):
        get_benchmark("amber", category="random")


def _broken(release, index, field, value, which="query"):
    """The release with one field of one item replaced (``value`` None: removed)."""
    path = release / ("annotations.json" if which == "annotations" else "query/query_all.json")
    items = json.loads(path.read_text())
    if value is None:
        del items[index][field]
    else:
        items[index][field] = value
    _write(path, items)
    return release / "query" / "query_all.json"


@pytest.mark.parametrize(
    "index, field, value, which, message",
    [
        (3, "query", None, "query", r"query_all\.json: line 17: missing field\(s\) query; --data takes an AMBER query"),
        (3, "id", None, "query", r"line 17: missing field\(s\) id"),
        (3, "id", [4], "query", r"line 17: field 'id' must be an integer or a string id, got a list"),
        (3, "query", 7, "query", r"line 17: field 'query' must be a string, got a number 7"),
        (3, "image", "", "query", r"line 17: field 'image' is empty"),
        (3, "id", 3, "query", r"line 17: duplicate id 3"),
        (3, "id", 99, "query", r"line 17: id 99 is not in the annotations .*annotations\.json; pass the annotations"),
        (3, "truth", "maybe", "annotations", r"annotations\.json: line \d+ \(id 4\): field 'truth' is 'maybe'"),
        (3, "truth", ["no"], "annotations", r"annotations\.json: line \d+: field 'truth' must be a string, got a list"),
        (3, "truth", None, "annotations", r"\(id 4\): missing field truth"),
        (3, "type", "discriminative-colour", "annotations", r"field 'type' is 'discriminative-colour'; AMBER's types"),
        (3, "id", 5, "annotations", r"annotations\.json: line \d+: duplicate id 5"),
    ],
)
def test_malformed_files_name_file_line_and_field(release, index, field, value, which, message):
    data = _broken(release, index, field, value, which)
    with pytest.raises(BenchmarkError, match=message):
        get_benchmark("amber").load(data, None)


def test_other_wrong_inputs(release):
    bench = get_benchmark("amber")
    with pytest.raises(BenchmarkError, match=r"is a folder; pass an AMBER query file"):
        bench.load(release / "query", None)
    with pytest.raises(BenchmarkError, match=r"annotations\.json: line 2: missing field\(s\) image, query"):
        bench.load(release / "annotations.json", None)  # the annotations given as --data
    with pytest.raises(BenchmarkError, match="holds no existence questions"):
        get_benchmark("amber", dimension="existence").load(_write(release / "query" / "q.json", [
            {"id": 3, "image": "AMBER_1.jpg", "query": "Is the sky sunny?"}]), None)  # fmt: skip


# -- the field's formats ----------------------------------------------------------------------------------------
def test_official_responses_are_scored_and_written_back(release, tmp_path):
    texts = {3: "Yes", 4: "No", 5: "No", 6: "No", 7: "Yes", 8: "Yes", 9: "No", 10: "Yes", 11: "Yes", 12: "no"}
    responses = [{"id": 1, "response": "A sky over trees."}] + [{"id": i, "response": t} for i, t in texts.items()]
    path = _write(tmp_path / "responses.json", responses)
    data = release / "query" / "query_discriminative.json"
    summary = score_predictions("amber", path, data=data, n_boot=0)  # annotations found beside --data
    m = summary["metrics"]
    # 10 questions: right 3,4,6,7,9,11 = 6; truths no: 4,6,8,9,10,12 = 6; answers No: 4,5,6,9 = 4, of them 3 right
    assert summary["n_records"] == 10 and m["unparseable"] == 1  # "no" is not "No"; the description is left out
    assert m["accuracy"] == pytest.approx(100 * 6 / 10.001)
    assert m["precision"] == pytest.approx(100 * 3 / 4.001) and m["recall"] == pytest.approx(100 * 3 / 6.001)
    assert m["existence/recall"] == pytest.approx(100 * 1 / 2.001)
    # without --data: the answered questions, truths from --annotations; --dimension narrows them
    alone = score_predictions("amber", path, annotations=release / "annotations.json", n_boot=0)
    assert alone["metrics"] == m
    exist = score_predictions("amber", path, annotations=release, options={"dimension": "existence"}, n_boot=0)
    assert exist["n_records"] == 2 and exist["metrics"]["accuracy"] == pytest.approx(100 / 2.001)
    # and back: the file inference.py reads (integer ids, the responses as given)
    bench = get_benchmark("amber")
    recs = [{**r, "seed": 0, **bench.parse(r)} for r in bench.read_predictions(path, data, None)]
    (written,) = bench.write_native(recs, tmp_path / "native")
    assert written.name == "amber_responses.json"
    assert json.loads(written.read_text()) == responses[1:]


def test_response_file_errors(release, tmp_path):
    data = release / "query" / "query_discriminative.json"
    ok = [{"id": i, "response": "Yes"} for i in range(3, 13)]
    cases = [
        (ok[:-1], r"answers 9 of the 10 questions of .*; missing e\.g\. id 12"),
        (ok + [{"id": 77, "response": "No"}], r"line 42: id 77 is not in the annotations"),
        (ok + [{"id": 3, "response": "No"}], r"line 42: id 3 is answered again \(first at line 2\)$"),
        ([{"id": 3, "answer": "No"}], r"line 2: no answer field \(response, or text"),
        ([{"id": 3, "response": None}], r"line 2: field 'response' must be a string, got null"),
        ([{"response": "No"}], r"line 2: expected an object with id and response"),
    ]
    for items, message in cases:
        with pytest.raises(BenchmarkError, match=message):
            score_predictions("amber", _write(tmp_path / "r.json", items), data=data, n_boot=0)
    seeds = tmp_path / "p.jsonl"
    seeds.write_text("".join(json.dumps({"id": "3", "seed": s, "text": "No"}) + "\n" for s in (0, 1)))
    with pytest.raises(BenchmarkError, match="line 2: id 3 is answered again .*several seeds' answers"):
        score_predictions("amber", seeds, annotations=release, n_boot=0)
    with pytest.raises(BenchmarkError, match=r"needs its annotations\.json.*--annotations"):
        score_predictions("amber", seeds, n_boot=0)


# -- end to end ------------------------------------------------------------------------------------------------
def test_resumable_run_then_score_the_finished_run(release, loaded, model_dirs, images, tmp_path, causalmm_cli):
    """A run on the tiny model: resumed after losing part of its predictions it gives the same answers and metrics;
    ``causalmm score amber`` re-scores its predictions.jsonl (and the official responses file it wrote) alike."""
    folder = tmp_path / "images"
    folder.mkdir()
    images[0].save(folder / "AMBER_1.jpg")
    images[1].save(folder / "AMBER_2.jpg")
    data = release / "query" / "query_discriminative.json"
    out = tmp_path / "run"
    spec = RunSpec("amber", model=str(model_dirs["llava"]), data=data, images=folder, limit=6,
                   config=CausalMMConfig(method="regular"), generation={"max_new_tokens": 2},
                   options={"suffix": " Please answer this question with one word."})  # fmt: skip

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnparseableWarning)  # random weights seldom say "Yes"
            return evaluate(spec, out=out, progress=False, n_boot=50, causalmm=loaded("llava"))

    first = run()
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["3", "4", "5", "6", "7", "8"]
    assert [r["dimension"] for r in recs] == ["state", "state", "number", "number", "action", "action"]
    assert recs[0]["prompt"] == "Is the sky sunny in this image? Please answer this question with one word."
    m = first["metrics"]
    unread = sum(r["text"] not in ("Yes", "No") for r in recs)
    right = sum(parse_official(r["text"]) == r["label"] for r in recs)
    assert m["n"] == 6 and m["unparseable"] == unread
    assert m["accuracy"] == pytest.approx(100 * right / 6.001)
    assert {"state/f1", "number/f1", "action/f1", "attribute/f1"} <= set(m) and "existence/f1" not in m
    assert set(first["ci95"]) >= {"accuracy", "f1"}
    # lose the last four predictions (and the scores): the rerun generates just those, the same ones
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]))
    (out / "metrics.json").unlink()
    again = run()
    assert [json.loads(x)["text"] for x in (out / "predictions.jsonl").read_text().splitlines()] == [
        r["text"] for r in recs
    ]
    assert again["metrics"] == m
    native = json.loads((out / "amber_responses.json").read_text())
    assert native == [{"id": int(r["id"]), "response": r["text"]} for r in recs]
    # re-scoring: the run's own records through the CLI, and the official responses file it wrote
    annotations = release / "annotations.json"
    causalmm_cli("score", "amber", out / "predictions.jsonl", "--annotations", annotations, "--out", tmp_path / "s")
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"] == m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnparseableWarning)
        from_native = score_predictions("amber", out / "amber_responses.json", annotations=annotations, n_boot=0)
    assert from_native["metrics"] == m
