"""The benchmark runner as a user drives it: eval, resume after kill -9, refusal of a different run,
multi-seed, score-only, compare; plus the statistics against hand-computed values."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from causalmm.benchmarks import BenchmarkError, get_benchmark
from causalmm.benchmarks.base import Sample
from causalmm.benchmarks.records import load_records
from causalmm.benchmarks.runner import limit_samples
from causalmm.benchmarks.stats import bootstrap_ci, mcnemar, paired_bootstrap

QUESTIONS = [
    ("a.png", "cat", "yes"),
    ("a.png", "dog", "no"),
    ("a.png", "car", "yes"),
    ("b.png", "bus", "no"),
    ("b.png", "tree", "yes"),
    ("b.png", "horse", "no"),
    ("c.png", "cup", "yes"),
    ("c.png", "boat", "no"),
]


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope")
    g = torch.Generator().manual_seed(1)
    (root / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "images" / name)
    rows = [
        {"question_id": i + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": label}
        for i, (img, obj, label) in enumerate(QUESTIONS)
    ]
    (root / "q.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def eval_args(model, data, out, *extra):
    args = ["eval", "pope", "--model", str(model), "--data", str(data / "q.json"), "--images", str(data / "images")]
    return [*args, "--out", str(out), "--max-new-tokens", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_run(model_dirs, pope_data, tmp_path_factory, causalmm_cli):
    """An uninterrupted CausalMM run, batch 3."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    proc = causalmm_cli(
        *eval_args(model_dirs["llava"], pope_data, out, "--batch-size", "3", "--language-layers", "all")
    )
    return out, proc


def test_eval_writes_the_run_folder_and_a_rerun_is_a_noop(reference_run, causalmm_cli):
    out, proc = reference_run
    assert "| accuracy |" in proc.stdout
    lines = (out / "predictions.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["id"] for r in recs] == [str(i) for i in range(1, 9)]
    assert {"text", "answer", "parseable", "label", "seed", "sample_seed", "image_seed", "question"} <= recs[0].keys()
    # one image seed per image (a.png: ids 1-3, b.png: 4-6, c.png: 7-8), one sample seed per question
    assert len({r["sample_seed"] for r in recs}) == 8
    assert [len({r["image_seed"] for r in recs[lo:hi]}) for lo, hi in ((0, 3), (3, 6), (6, 8))] == [1, 1, 1]
    assert len({r["image_seed"] for r in recs}) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 8 and metrics["method"] == "causalmm"
    assert set(metrics["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"}
    lo, hi = metrics["ci95"]["accuracy"]
    assert lo <= metrics["metrics"]["accuracy"] <= hi
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["language_layers"] == "all" and run["generation"]["max_new_tokens"] == 3
    before = (out / "predictions.jsonl").read_bytes()
    again = causalmm_cli(
        *eval_args(run["model"], Path(run["data"]).parent, out, "--batch-size", "3", "--language-layers", "all")
    )
    assert (out / "predictions.jsonl").read_bytes() == before
    assert again.stdout == proc.stdout


def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(
    reference_run, model_dirs, pope_data, tmp_path, causalmm_cli
):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    args = eval_args(model_dirs["llava"], pope_data, out, "--batch-size", "1", "--language-layers", "all")
    args[args.index("--max-new-tokens") + 1] = "3"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "causalmm", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pred = out / "predictions.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if pred.exists() and len(pred.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(pred.read_text().splitlines())
    assert 2 <= n_before < 8, "the run must be killed part-way for this test to mean anything"
    assert not (out / "metrics.json").exists()
    with pred.open("a") as fh:  # a write torn by the kill
        fh.write('{"id": "99", "seed": 0, "te')
    causalmm_cli(*args)
    got = [json.loads(x) for x in pred.read_text().splitlines()]
    ref = [json.loads(x) for x in (ref_out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got] == [str(i) for i in range(1, 9)]
    # per-sample seeds: batch 1 with an interruption gives what batch 3 uninterrupted gave
    assert [r["text"] for r in got] == [r["text"] for r in ref]
    assert (
        json.loads((out / "metrics.json").read_text())["metrics"]
        == json.loads((ref_out / "metrics.json").read_text())["metrics"]
    )


def test_resume_with_different_settings_is_refused(reference_run, model_dirs, pope_data, causalmm_cli):
    out, _ = reference_run
    proc = causalmm_cli(
        *eval_args(model_dirs["llava"], pope_data, out, "--gamma", "2", "--language-layers", "all"), check=False
    )
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "holds a different run" in err and "config" in err and "Traceback" not in proc.stderr


def test_multi_seed_sampling_reports_mean_and_std(model_dirs, pope_data, tmp_path, causalmm_cli):
    out = tmp_path / "seeds"
    causalmm_cli(
        *eval_args(
            model_dirs["llava"],
            pope_data,
            out,
            "--seeds",
            "1,2",
            "--do-sample",
            "--method",
            "regular",
            "--batch-size",
            "4",
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [1, 2] and set(metrics["per_seed"]) == {"1", "2"}
    assert "std" in metrics and "± " not in metrics  # std per metric, over seeds
    acc = [metrics["per_seed"][s]["accuracy"] for s in ("1", "2")]
    assert metrics["metrics"]["accuracy"] == pytest.approx(sum(acc) / 2)
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and len({(r["id"], r["seed"]) for r in recs}) == 16
    by = {(r["id"], r["seed"]): r["text"] for r in recs}
    assert any(by[(str(i), 1)] != by[(str(i), 2)] for i in range(1, 9)), "different seeds must sample differently"
    assert "std over seeds" in (out / "report.md").read_text()


def test_score_only_reproduces_the_runner_metrics(reference_run, pope_data, tmp_path, causalmm_cli):
    out, _ = reference_run
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps({"question_id": r["question_id"], "text": r["text"]}) + "\n" for r in reversed(recs))
    )
    proc = causalmm_cli(
        "score", "pope", str(answers), "--data", str(pope_data / "q.json"), "--out", str(tmp_path / "s")
    )
    assert "accuracy" in proc.stdout
    scored = json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"]
    assert scored == json.loads((out / "metrics.json").read_text())["metrics"]


def test_compare_two_runs_table_and_plot(reference_run, model_dirs, pope_data, tmp_path, causalmm_cli):
    ref_out, _ = reference_run
    regular = tmp_path / "regular"
    causalmm_cli(*eval_args(model_dirs["llava"], pope_data, regular, "--method", "regular", "--batch-size", "8"))
    proc = causalmm_cli("compare", str(regular), str(ref_out), "--out", str(tmp_path / "cmp"))
    assert "| regular | regular | 8 |" in proc.stdout and "McNemar" in proc.stdout
    assert "causalmm/multimodal" in proc.stdout
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["runs"][1]["vs_first"]["test"] == "McNemar"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"benchmark": "pope"}))
    bad = causalmm_cli("compare", str(regular), str(unfinished), check=False)
    assert bad.returncode == 2 and "not finished" in bad.stderr


def test_eval_errors_are_one_line(model_dirs, pope_data, tmp_path, causalmm_cli):
    args = ["eval", "pope", "--model", str(model_dirs["llava"]), "--data", str(pope_data / "q.json")]
    no_images = causalmm_cli(*args, "--images", str(tmp_path), "--out", str(tmp_path / "x"), check=False)
    assert no_images.returncode == 2 and "3 image(s)" in no_images.stderr and "Traceback" not in no_images.stderr
    unknown = causalmm_cli("eval", "gqa", "--model", "m", "--data", "d", "--out", str(tmp_path / "y"), check=False)
    assert unknown.returncode == 2 and "unknown benchmark 'gqa'" in unknown.stderr
    empty = tmp_path / "empty.json"
    empty.write_text("")
    e = causalmm_cli(
        "eval",
        "pope",
        "--model",
        str(model_dirs["llava"]),
        "--data",
        str(empty),
        "--out",
        str(tmp_path / "z"),
        check=False,
    )
    assert e.returncode == 2 and "is empty" in e.stderr


# -- runner pieces -----------------------------------------------------------------------------------------
def test_torn_last_line_is_repaired_and_a_corrupt_middle_line_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "1", "seed": 0, "text": "Yes"}\n{"id": "2", "se')
    recs = load_records(path)
    assert list(recs) == [("1", 0)]
    assert path.read_text() == '{"id": "1", "seed": 0, "text": "Yes"}\n'
    path.write_text('{"id": "1", "seed": 0}\nnot json\n{"id": "2", "seed": 0}\n')
    with pytest.raises(BenchmarkError, match="line 2 is not valid JSON"):
        load_records(path)


def test_limit_keeps_mme_image_pairs_whole():
    bench = get_benchmark("mme")
    samples = [
        Sample(f"existence/{i // 2}.jpg#{i % 2}", None, "q", {"subtask": "existence", "image": f"{i // 2}.jpg"})
        for i in range(6)
    ]
    assert len(limit_samples(bench, samples, 3)) == 4
    assert len(limit_samples(bench, samples, 4)) == 4
    assert len(limit_samples(get_benchmark("pope"), samples, 3)) == 3


# -- statistics --------------------------------------------------------------------------------------------
def test_mcnemar_exact_p_hand_computed():
    # 5 pairs only a is right, 1 only b: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    a = [True] * 5 + [False] + [True] * 3
    b = [False] * 5 + [True] + [True] * 3
    res = mcnemar(a, b)
    assert res["a_only"] == 5 and res["b_only"] == 1
    assert res["p"] == pytest.approx(14 / 64)
    assert mcnemar([True, False], [True, False])["p"] == 1.0


def _pope_records(answers, seed=0):
    bench = get_benchmark("pope")
    labels = ["yes", "no"] * (len(answers) // 2)
    recs = [
        {"id": str(i), "seed": seed, "label": lab, "text": a}
        for i, (lab, a) in enumerate(zip(labels, answers, strict=True))
    ]
    return bench, [{**r, **bench.parse(r)} for r in recs]


def test_bootstrap_interval_brackets_the_estimate_and_collapses_when_all_right():
    bench, recs = _pope_records(["Yes", "No", "No", "No", "Yes", "Yes"] * 10)
    ci = bootstrap_ci(bench, recs, n_boot=300)
    acc = bench.metrics(recs)["accuracy"]
    assert ci["accuracy"][0] < acc < ci["accuracy"][1]
    bench, perfect = _pope_records(["Yes", "No"] * 20)
    assert bootstrap_ci(bench, perfect, n_boot=100)["accuracy"] == (100.0, 100.0)


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    bench, good = _pope_records(["Yes", "No"] * 40)
    _, bad = _pope_records(["Yes", "Yes"] * 40)  # every "no" question wrong: accuracy 50
    same = paired_bootstrap(bench, good, good, "accuracy", n_boot=200)
    assert same["diff"] == 0 and same["p"] == 1.0
    worse = paired_bootstrap(bench, good, bad, "accuracy", n_boot=200)
    assert worse["diff"] == pytest.approx(-50.0) and worse["p"] < 0.01


def test_a_predictions_line_without_id_or_seed_is_one_error(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "1", "seed": 0, "text": "yes"}\n{"seed": 0, "text": "no"}\n{"id": "3", "seed": 0}\n')
    with pytest.raises(BenchmarkError, match="line 2 is not a prediction record .*'id' and an integer 'seed'"):
        load_records(path)
    path.write_text('{"id": "1", "seed": "zero"}\n{"id": "2", "seed": 0}\n')
    with pytest.raises(BenchmarkError, match="line 1 is not a prediction record"):
        load_records(path)


def test_beam_search_and_opera_runs_are_evaluated_and_compared(reference_run, model_dirs, pope_data, tmp_path,
                                                              causalmm_cli):  # fmt: skip
    """``eval`` with beams and with OPERA records its search, resumes only into the same search, and ``compare``
    takes the runs."""
    ref_out, _ = reference_run
    beams, opera = tmp_path / "beams", tmp_path / "opera"
    causalmm_cli(*eval_args(model_dirs["llava"], pope_data, beams, "--num-beams", "3", "--language-layers", "all",
                            "--batch-size", "3"))  # fmt: skip
    causalmm_cli(*eval_args(model_dirs["llava"], pope_data, opera, "--method", "opera", "--batch-size", "4"))
    for out, generation in ((beams, {"num_beams": 3}), (opera, {})):
        run = json.loads((out / "run.json").read_text())
        assert {k: v for k, v in run["generation"].items() if k not in ("max_new_tokens", "do_sample")} == generation
        assert len((out / "predictions.jsonl").read_text().splitlines()) == len(QUESTIONS)
    assert json.loads((opera / "run.json").read_text())["config"]["params"]["candidates"] == 5
    # the greedy run's folder refuses a beam run (a different search), with one line
    again = causalmm_cli(*eval_args(model_dirs["llava"], pope_data, ref_out, "--batch-size", "3",
                                    "--language-layers", "all", "--num-beams", "3"), check=False)  # fmt: skip
    assert again.returncode == 2 and "num_beams" in again.stderr and "Traceback" not in again.stderr
    proc = causalmm_cli("compare", str(ref_out), str(beams), str(opera), "--out", str(tmp_path / "cmp"))
    assert "opera" in proc.stdout and "McNemar" in proc.stdout
