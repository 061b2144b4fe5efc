"""Bad benchmark inputs: every loader and prediction reader refuses a field of the wrong type, a file that is not
UTF-8 or a record without its id with one line naming the file, the line (or row) and the field; answers that
mostly cannot be parsed warn and say so in the metrics."""

import io
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from causalmm.benchmarks import BenchmarkError, get_benchmark
from causalmm.benchmarks.base import UnparseableWarning
from causalmm.benchmarks.chair import read_image_list
from causalmm.benchmarks.score import score_predictions
from causalmm.benchmarks.stats import bootstrap_ci

POPE_ROW = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}

VLIND = {
    "concept": "color",
    "context_id": 2,
    "context": "Bananas are blue",
    "factual_context": "Bananas are yellow",
    "true_statement": "The bananas are blue.",
    "false_statement": "The bananas are yellow.",
    "existent_noun": "a banana",
    "non-existent_noun": "a car",
    "best_img_id": 4,
    "aggregated_human_label_good_images": {"4": 3},
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_line_error(call, *fragments):
    with pytest.raises(BenchmarkError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


# -- field types in the loaders --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("text", None, "got null"),  # was asked as the prompt "None Please answer..."
        ("text", ["a", "b"], "got a list ['a', 'b']"),  # was asked as "['a', 'b'] Please answer..."
        ("text", 7, "got a number 7"),
        ("question_id", None, "got null"),  # was the id "None"
        ("question_id", [1], "got a list [1]"),
        ("question_id", {"id": 1}, "got an object"),
        ("question_id", True, "got a boolean True"),
        ("question_id", float("nan"), "got a number NaN"),
        ("question_id", 1.5, "got a number 1.5"),
        ("image", 5, "got a number 5"),  # was a TypeError traceback joining the image folder
        ("image", ["a.jpg"], "got a list"),
        ("label", None, "got null"),
    ],
)
def test_pope_loader_refuses_wrong_field_types(tmp_path, field, value, shown):
    path = _jsonl(tmp_path / "q.jsonl", [POPE_ROW, {**POPE_ROW, "question_id": 2, field: value}])
    _one_line_error(lambda: get_benchmark("pope").load(path, tmp_path), f"{path}: line 2: field {field!r}", shown)


def test_pope_ids_may_be_integers_or_strings_as_in_the_official_files(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [POPE_ROW, {**POPE_ROW, "question_id": "q2"}])
    samples = get_benchmark("pope").load(path, None)
    assert [s.id for s in samples] == ["1", "q2"] and samples[0].meta["question_id"] == 1
    array = tmp_path / "q.json"
    array.write_text(json.dumps([POPE_ROW, {**POPE_ROW, "question_id": 2, "text": None}], indent=4))
    _one_line_error(lambda: get_benchmark("pope").load(array, None), f"{array}: line 8: field 'text'")


def test_pope_and_mme_parquet_rows_are_type_checked(tmp_path):
    pope = tmp_path / "pope.parquet"
    img = {"bytes": _png(), "path": None}
    pq.write_table(
        pa.table({"question_id": ["1", "2"], "question": ["Is there a cat?", None], "answer": ["yes", "no"],
                  "image": [img, img]}),
        pope,
    )  # fmt: skip
    _one_line_error(lambda: get_benchmark("pope").load(pope, None), f"{pope}: row 1: field 'question'", "got null")
    mme = tmp_path / "mme.parquet"
    pq.write_table(
        pa.table({"question_id": ["code_reasoning/1.png"] * 2, "question": ["Will it print 3?", "Prints 4?"],
                  "answer": ["Yes", None], "image": [img, img], "category": ["code_reasoning"] * 2}),
        mme,
    )  # fmt: skip
    # the answer column's null was an AttributeError traceback (None.strip())
    _one_line_error(lambda: get_benchmark("mme").load(mme, None), f"{mme}: row 1: field 'answer'", "got null")


def test_mme_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    res = tmp_path / "Your_Results"
    res.mkdir()
    (res / "existence.txt").write_bytes("1.jpg\tIs there a caf\xe9?\tYes\n1.jpg\tA dog?\tNo\n".encode("latin-1"))
    bench = get_benchmark("mme")
    _one_line_error(lambda: bench.load(res, None), f"{res / 'existence.txt'}: not UTF-8", "iconv")
    (res / "existence.txt").write_bytes("1.jpg\tA cat?\tYes\tYes\n1.jpg\tA dog?\tNo\tNo\n".encode("utf-16"))
    _one_line_error(lambda: bench.read_predictions(res, None, None), f"{res / 'existence.txt'}: not UTF-8")
    # a byte-order mark (Windows editors) is not part of the first image's name
    (res / "existence.txt").write_text("\ufeff1.jpg\tA cat?\tYes\n1.jpg\tA dog?\tNo\n", encoding="utf-8")
    assert [s.meta["image"] for s in bench.load(res, None)] == ["1.jpg", "1.jpg"]


def test_mme_line_without_image_name_is_refused(tmp_path):
    res = tmp_path / "Your_Results"
    res.mkdir()
    (res / "existence.txt").write_text("1.jpg\tA cat?\tYes\n\tA dog?\tNo\n")
    _one_line_error(lambda: get_benchmark("mme").load(res, None), "existence.txt: line 2: the image column is empty")


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"image": 310196}, "'image' must be a file name, got 310196"),
        ({"image": ["COCO_val2014_000000310196.jpg"]}, "'image' must be a file name"),
        ({"image_id": [310196]}, "image_id must be a COCO image number"),
        ({"image_id": 1.5}, "image_id must be a COCO image number"),
        ({"image_id": None}, "no image_id and no image"),
    ],
)
def test_chair_image_list_entries_of_the_wrong_type(tmp_path, entry, fragment):
    path = _jsonl(tmp_path / "list.jsonl", [{"image_id": 101}, entry])
    _one_line_error(lambda: read_image_list(path), f"{path}: line 2", fragment)


@pytest.mark.parametrize(
    "field, value",
    [("existent_noun", None), ("non-existent_noun", ["a", "car"]), ("true_statement", 3), ("context_id", None),
     ("context_id", [2]), ("best_img_id", None), ("concept", None)],
)  # fmt: skip
def test_vlind_fields_that_become_prompts_or_paths_are_type_checked(tmp_path, field, value):
    # a null noun was asked as "There is None in the given image."
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{**VLIND, field: value}], indent=2))
    _one_line_error(
        lambda: get_benchmark("vlind").load(path, tmp_path), f"{path}: line 2 (instance 1): field {field!r}"
    )


def test_vlind_ids_may_be_integers_or_strings(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{**VLIND, "context_id": "2", "best_img_id": "4"}]))
    samples = get_benchmark("vlind").load(path, tmp_path)
    assert samples[0].id == "color/2/ck/factual/1" and samples[2].meta["image_id"] == "4"


# -- prediction readers (causalmm score) -------------------------------------------------------------------
def test_pope_answers_of_the_wrong_type_or_without_id(tmp_path):
    questions = _jsonl(tmp_path / "q.jsonl", [POPE_ROW, {**POPE_ROW, "question_id": 2, "label": "no"}])
    bench = get_benchmark("pope")
    for answer, fragment in (
        ({"question_id": 2, "text": None}, "line 2: field 'text' must be a string, got null"),  # was scored ""
        ({"question_id": 2, "text": ["No"]}, "line 2: field 'text' must be a string, got a list"),
        ({"question_id": None, "text": "No"}, "line 2: field 'question_id' must be an integer or a string"),
        ({"text": "No"}, "line 2: expected an object with question_id"),
    ):
        answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Yes"}, answer])
        _one_line_error(lambda a=answers: bench.read_predictions(a, questions, None), str(answers), fragment)
    # an empty answer is a real (unparseable) answer, not bad input
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": "2", "text": ""}])
    assert [r["text"] for r in bench.read_predictions(answers, questions, None)] == ["Yes", ""]


def test_chair_caption_without_its_image(tmp_path):
    caps = _jsonl(tmp_path / "caps.jsonl", [{"image_id": 101, "caption": "A dog."}, {"caption": "A cat."}])
    _one_line_error(lambda: get_benchmark("chair").read_predictions(caps, None, None), f"{caps}: line 2: no image_id")
    caps = _jsonl(tmp_path / "caps.jsonl", [{"image_id": 101, "caption": None}])
    _one_line_error(lambda: get_benchmark("chair").read_predictions(caps, None, None), f"{caps}: line 1: no caption")


def _vlind_predictions(tmp_path, answer):
    """VLIND with every prediction ``{"answer": answer(expected)}`` (the official inference's fields)."""
    pred = dict(VLIND)
    for suffix in ("a1_image", "a2_image", "b1", "b2", "c1_image", "c2_image"):
        pred[f"m_pred_{suffix}"] = answer("True" if suffix[1] == "1" else "False")
    pred["m_pred_d1"] = {"4": answer("True")}
    pred["m_pred_d2"] = {"4": answer("False")}
    path = tmp_path / "pred.json"
    path.write_text(json.dumps([pred], indent=2))
    return path


def test_vlind_prediction_fields_of_the_wrong_type(tmp_path):
    bench = get_benchmark("vlind")
    path = _vlind_predictions(tmp_path, lambda e: {"response": None, "answer": e})
    _one_line_error(lambda: bench.read_predictions(path, None, None), "m_pred_a1_image: field 'response'", "got null")
    path = _vlind_predictions(tmp_path, lambda e: {"answer": [e]})
    _one_line_error(lambda: bench.read_predictions(path, None, None), "field 'answer' must be a string, got a list")


# -- answers that cannot be parsed ---------------------------------------------------------------------
def _pope_records(bench, texts):
    recs = [{"id": str(i), "seed": 0, "label": "yes", "text": t} for i, t in enumerate(texts)]
    return [{**r, **bench.parse(r)} for r in recs]


def test_pope_mostly_unparseable_warns_and_says_so_in_the_metrics():
    bench = get_benchmark("pope")
    with pytest.warns(UnparseableWarning, match=r"pope: 3 of 4 answers \(75%\) could not be parsed"):
        m = bench.metrics(_pope_records(bench, ["Yes", "<image>", "", "The sky"]))
    assert m["unparseable_pct"] == 75.0 and m["unparseable"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnparseableWarning)  # half is not most: no warning
        assert bench.metrics(_pope_records(bench, ["Yes", "No", "", "The sky"]))["unparseable_pct"] == 50.0
    assert "unparseable_pct" not in bench.headline_metrics(m)


def test_the_warning_comes_once_not_once_per_bootstrap_resample():
    bench = get_benchmark("pope")
    records = _pope_records(bench, ["Yes", "<image>", "", "The sky"] * 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench.metrics(records)  # the point estimate, as `score` and `eval` compute it first
        bootstrap_ci(bench, records, n_boot=50)
    assert len([w for w in caught if issubclass(w.category, UnparseableWarning)]) == 1


def test_mme_mostly_unparseable_warns(tmp_path):
    res = tmp_path / "Your_Results"
    res.mkdir()
    (res / "existence.txt").write_text("1.jpg\tA cat?\tYes\tI think\n1.jpg\tA dog?\tNo\tThere is no dog\n")
    with pytest.warns(UnparseableWarning, match="mme: 2 of 2 answers"):
        summary = score_predictions("mme", res, n_boot=0)
    assert summary["metrics"]["unparseable_pct"] == 100.0


def test_vlind_answer_field_is_scored_as_the_official_pipeline_does(tmp_path):
    # answers without a response: score_pipeline.py reads `answer` and scores this file perfectly; re-parsing
    # the absent response made every record unparseable and every score 0
    bench = get_benchmark("vlind")
    path = _vlind_predictions(tmp_path, lambda e: {"answer": e})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnparseableWarning)
        m = score_predictions("vlind", path, n_boot=0)["metrics"]
    assert (m["S_CK"], m["S_VP"], m["S_CB"], m["S_LP"], m["CB"], m["LP"]) == (100.0,) * 6
    # the answer wins over a response that says otherwise, as in the official script
    path = _vlind_predictions(tmp_path, lambda e: {"response": "I cannot tell.", "answer": e})
    assert score_predictions("vlind", path, n_boot=0)["metrics"]["S_LP"] == 100.0
    # an answer that is not exactly True/False fails there and is NA here
    path = _vlind_predictions(tmp_path, lambda e: {"response": e, "answer": e.lower()})
    with pytest.warns(UnparseableWarning, match="vlind: 8 of 8 answers"):
        m = score_predictions("vlind", path, n_boot=0)["metrics"]
    assert m["S_VP"] == 0.0 and m["unparseable_pct"] == 100.0
    # no answer field: the response is parsed
    path = _vlind_predictions(tmp_path, lambda e: {"response": f"{e}."})
    records = [{**r, **bench.parse(r)} for r in bench.read_predictions(path, None, None)]
    assert all("given_answer" not in r for r in records) and bench.metrics(records)["S_LP"] == 100.0


def test_cli_score_shows_one_error_line_and_the_warning(tmp_path, causalmm_cli):
    questions = _jsonl(tmp_path / "q.jsonl", [POPE_ROW])
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": None}])
    proc = causalmm_cli("score", "pope", answers, "--data", questions, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {answers}: line 1: field 'text' must be a string, got null" in " ".join(proc.stderr.split())
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "<unk>"}])
    proc = causalmm_cli("score", "pope", answers, "--data", questions, "--out", tmp_path / "s")
    assert "UnparseableWarning: pope: 1 of 1 answers (100%) could not be parsed" in proc.stderr
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"]["unparseable_pct"] == 100.0
