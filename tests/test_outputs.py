"""No output ever overwrites an input or a result, and a run refused before it starts leaves nothing behind.

Every command that writes a file is run as a user runs it, aimed at the files it reads and at results it did
not write; each refusal is one ``error:`` line, before any model loads, and every byte of the target is kept.
"""

import json
import shutil
from pathlib import Path

import pytest

from causalmm.outputs import OutputError, check_output_file, check_results_folder


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def picture(tmp_path, images):
    path = tmp_path / "photo.png"
    images[0].save(path)
    return path


# -- one-image commands: the output is never the image, a model file, or a run's file ---------------------------
@pytest.mark.parametrize("command", ["visualize", "explain"])
def test_the_output_file_is_never_the_image_or_a_model_file(command, model_dirs, picture, tmp_path, causalmm_cli):
    flag = "--out" if command == "visualize" else "--html"
    model = model_dirs["llava"]
    base = [command, "--model", model, "--image", picture, "--prompt", "hi"]
    before = picture.read_bytes()
    one_line_error(causalmm_cli(*base, flag, picture, check=False), flag, "is the input --image", "pick another path")
    # the same file through a symbolic link and a hard link
    link = tmp_path / "link.png"
    link.symlink_to(picture)
    one_line_error(causalmm_cli(*base, flag, link, check=False), "is the input --image")
    hard = tmp_path / "hard.png"
    hard.hardlink_to(picture)
    one_line_error(causalmm_cli(*base, flag, hard, check=False), "is the input --image")
    assert picture.read_bytes() == before
    config = model / "config.json"
    kept = config.read_bytes()
    one_line_error(causalmm_cli(*base, flag, config, check=False), "is a file of the input folder --model")
    assert config.read_bytes() == kept


def test_the_output_file_never_replaces_a_run_file(tmp_path, picture):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"benchmark": "pope"}')
    (run / "report.md").write_text("finished")
    with pytest.raises(OutputError, match="would replace a file of the run folder of a causalmm eval"):
        check_output_file(run / "report.md", "--out", [("--image", picture)])
    assert (run / "report.md").read_text() == "finished"
    # a new file beside them is not a replacement, and any other path is fine
    assert check_output_file(run / "figure.png", "--out", [("--image", picture)]) == run / "figure.png"
    assert check_output_file(tmp_path / "fig.png", "--out", [("--image", picture), ("--model", "org/hub-id")])


# -- score: its metrics.json never replaces a run's, another score's, or anyone's -----------------------------
def _pope_answers(path: Path, answers=("yes", "no", "yes", "no")) -> Path:
    lines = [{"question_id": i + 1, "text": a} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_score_never_replaces_a_result_it_did_not_write(tmp_path, causalmm_cli):
    questions = tmp_path / "questions.jsonl"
    rows = [
        {"question_id": i, "image": "a.jpg", "text": "Is there a cat?", "label": ("yes", "no")[i % 2]}
        for i in range(1, 5)
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = _pope_answers(tmp_path / "answers.jsonl")
    other = _pope_answers(tmp_path / "other.jsonl", ("no", "no", "no", "no"))
    # a finished run's folder
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"benchmark": "pope"}')
    (run / "metrics.json").write_text('{"accuracy": 88.5}')
    before = tree_bytes(run)
    one_line_error(
        causalmm_cli("score", "pope", preds, "--data", questions, "--out", run, check=False),
        "is the run folder of a causalmm eval",
    )
    assert tree_bytes(run) == before
    # someone's own metrics.json
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"f1": 1}')
    one_line_error(
        causalmm_cli("score", "pope", preds, "--data", questions, "--out", mine, check=False),
        "causalmm score did not write",
        "move it",
    )
    assert (mine / "metrics.json").read_text() == '{"f1": 1}'
    # its own result: a rerun on the same predictions replaces it; other predictions are refused
    out = tmp_path / "scored"
    causalmm_cli("score", "pope", preds, "--data", questions, "--out", out)
    first = json.loads((out / "metrics.json").read_text())
    assert first["format"] == "causalmm-score/1" and first["source"] == str(preds.resolve())
    causalmm_cli("score", "pope", preds, "--data", questions, "--out", out)
    one_line_error(
        causalmm_cli("score", "pope", other, "--data", questions, "--out", out, check=False),
        "earlier run on other predictions",
    )
    assert json.loads((out / "metrics.json").read_text())["metrics"] == first["metrics"]
    # the predictions themselves named metrics.json, in --out
    named = tmp_path / "named"
    named.mkdir()
    clash = _pope_answers(named / "metrics.json")
    kept = clash.read_bytes()
    one_line_error(
        causalmm_cli("score", "pope", clash, "--data", questions, "--out", named, check=False),
        "would replace the input",
    )
    assert clash.read_bytes() == kept


def test_results_folders_refuse_input_folders_and_foreign_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    kw = dict(main="metrics.json", fmt="causalmm-score/", writes=("metrics.json",))
    for out in (data, data / "inside"):
        with pytest.raises(OutputError, match="lies inside the input folder --data"):
            check_results_folder(out, "--out", inputs=[("--data", data)], **kw)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file; give a folder"):
        check_results_folder(tmp_path / "file", "--out", **kw)
    assert check_results_folder(tmp_path / "new", "--out", **kw) == tmp_path / "new"


# -- compare and demo -----------------------------------------------------------------------------------------
def test_compare_never_writes_into_a_run_or_over_another_comparison(tmp_path, run_two_pope_runs, causalmm_cli):
    a, b = run_two_pope_runs
    before = tree_bytes(a)
    one_line_error(causalmm_cli("compare", a, b, "--out", a, "--no-plot", check=False), "lies inside the input")
    one_line_error(causalmm_cli("compare", a, b, "--out", a / "sub", "--no-plot", check=False), "inside the input")
    one_line_error(
        causalmm_cli("compare", a, b, "--out", tmp_path / "c", "--no-plot", "--html", a / "report.md", check=False),
        "--html",
        "input folder run",
    )
    assert tree_bytes(a) == before
    out = tmp_path / "cmp"
    causalmm_cli("compare", a, b, "--out", out, "--no-plot")
    causalmm_cli("compare", a, b, "--out", out, "--no-plot")  # the same comparison, again: replaced
    one_line_error(causalmm_cli("compare", b, a, "--out", out, "--no-plot", check=False), "earlier run on other runs")
    assert json.loads((out / "compare.json").read_text())["sources"] == [str(a.resolve()), str(b.resolve())]


@pytest.fixture
def run_two_pope_runs(tmp_path, model_dirs, loaded):
    from causalmm import CausalMMConfig
    from causalmm.benchmarks.evaluate import RunSpec, evaluate

    root = tmp_path / "pope"
    (root / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "images" / "a.png")
    rows = [{"question_id": i, "image": "a.png", "text": f"Is there a {o}?", "label": lab}
            for i, (o, lab) in enumerate([("cat", "yes"), ("dog", "no")], 1)]  # fmt: skip
    (root / "q.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for name in ("a", "b"):
        spec = RunSpec(
            "pope", model=str(model_dirs["llava"]), data=root / "q.json", images=root / "images",
            config=CausalMMConfig(method="regular"), generation={"max_new_tokens": 2},
        )  # fmt: skip
        evaluate(spec, out=tmp_path / name, progress=False, n_boot=0, causalmm=loaded("llava"))
        runs.append(tmp_path / name)
    return runs


def test_demo_refuses_a_bad_out_before_running_anything(tmp_path, causalmm_cli):
    existing = tmp_path / "existing-file"
    existing.write_text("keep me")
    proc = causalmm_cli("demo", "--out", existing, "--images", "1", check=False)
    one_line_error(proc, "--out", "is a file")
    assert existing.read_text() == "keep me" and proc.stdout == ""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"benchmark": "pope"}')
    (run / "metrics.json").write_text("{}")
    one_line_error(causalmm_cli("demo", "--out", run, "--images", "1", check=False), "run folder of a causalmm eval")
    assert (run / "metrics.json").read_text() == "{}"


def test_toyworld_splits_bounds_and_its_own_folder(tmp_path, causalmm_cli):
    for flag in ("--val-images", "--test-images"):
        for n in ("0", "-3", "100001"):
            one_line_error(
                causalmm_cli("toyworld", "splits", "--out", tmp_path / "s", flag, n, check=False),
                f"{flag} {n} is out of range: give 1 to 100000",
            )
    assert not (tmp_path / "s").exists()
    foreign = tmp_path / "foreign"
    (foreign / "val").mkdir(parents=True)
    (foreign / "val" / "mine.txt").write_text("x")
    one_line_error(
        causalmm_cli("toyworld", "splits", "--out", foreign, "--val-images", "1", "--test-images", "1", check=False),
        "holds val",
    )
    assert (foreign / "val" / "mine.txt").read_text() == "x"
    out = tmp_path / "sp"
    small = ("--val-images", "1", "--test-images", "1")
    causalmm_cli("toyworld", "splits", "--out", out, *small)
    causalmm_cli("toyworld", "splits", "--out", out, *small)  # the same splits again
    one_line_error(
        causalmm_cli("toyworld", "splits", "--out", out, "--val-images", "2", "--test-images", "1", check=False),
        "other split sizes",
    )


# -- a refused eval leaves nothing behind, and a too-long question is named ------------------------------------
def _pope_data(root: Path, long_question: bool = False) -> tuple[Path, Path]:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 120, 30)).save(root / "images" / "a.png")
    rows = [
        {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
        {"question_id": 2, "image": "a.png", "text": "Is there " + "a very long dog " * 300 + "?", "label": "no"},
        {"question_id": 3, "image": "a.png", "text": "Is there a cup?", "label": "no"},
    ]
    if not long_question:
        rows[1]["text"] = "Is there a dog?"
    (root / "q.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "q.json", root / "images"


def test_a_refused_eval_leaves_nothing_and_the_corrected_command_runs(tmp_path, model_dirs, causalmm_cli):
    data, images = _pope_data(tmp_path / "d")
    out = tmp_path / "run"
    base = ["eval", "pope", "--model", model_dirs["llava"], "--data", data, "--images", images, "--out", out,
            "--method", "regular", "--no-progress"]  # fmt: skip
    one_line_error(causalmm_cli(*base, "--max-new-tokens", "5000", check=False), "max_new_tokens", "1024")
    assert not out.exists()
    causalmm_cli(*base, "--max-new-tokens", "2")
    assert (out / "run.json").is_file() and (out / "metrics.json").is_file()


def test_a_too_long_question_is_refused_by_id_and_line_before_anything_is_written(tmp_path, model_dirs, loaded):
    from causalmm import CausalMMConfig
    from causalmm.benchmarks import BenchmarkError
    from causalmm.benchmarks.evaluate import RunSpec, evaluate

    data, images = _pope_data(tmp_path / "d", long_question=True)
    out = tmp_path / "run"
    out.mkdir()  # an empty folder the user made: kept, and left empty
    spec = RunSpec(
        "pope", model=str(model_dirs["llava"]), data=data, images=images, config=CausalMMConfig(method="regular"),
        generation={"max_new_tokens": 2},
    )  # fmt: skip
    with pytest.raises(BenchmarkError, match=r"1 sample\(s\).*sample 2 \(.*q\.json: line 2\).*too long"):
        evaluate(spec, out=out, progress=False, n_boot=0, causalmm=loaded("llava"))
    assert out.is_dir() and not (out / "run.json").exists() and not list(out.glob("predictions*"))
    shutil.rmtree(out)


# -- every numeric option of these commands has a range, refused in one line before any work ---------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--images", "0"], "--images 0 is out of range: give 1 to 100000"),
        (["demo", "--batch-size", "5000"], "--batch-size 5000 is out of range: give 1 to 1024"),
        (["demo", "--seeds", "1,1"], "repeats a seed"),
        (["toyworld", "tune", "--max-drop", "1.5"], "--max-drop 1.5 is out of range: give 0.0 to 1.0"),
        (["toyworld", "tune", "--images", "-1"], "--images -1 is out of range"),
        (["toyworld", "train", "--out", "OUT", "--threads", "999"], "--threads 999 is out of range: give 1 to"),
        (["toyworld", "train", "--out", "OUT", "--steps", "0"], "--steps 0 is out of range: give at least 1"),
        (["eval", "pope", "--model", "m", "--data", "d", "--out", "OUT", "--batch-size", "0"], "--batch-size 0"),
        (["eval", "pope", "--model", "m", "--data", "d", "--out", "OUT", "--limit", "0"], "--limit 0 is out of range"),
        (["eval", "pope", "--model", "m", "--data", "d", "--out", "OUT", "--num-processes", "4096"], "--num-processes"),
        (["eval", "pope", "--model", "m", "--data", "d", "--out", "OUT", "--seeds", "1," + "9" * 30], "64-bit"),
    ],
)
def test_numeric_options_out_of_range_are_one_line(args, needle, tmp_path, causalmm_cli):
    out = tmp_path / "out"
    one_line_error(causalmm_cli(*[str(out) if a == "OUT" else a for a in args], check=False), needle)
    assert not out.exists()


def test_explain_top_k_is_bounded_by_the_vocabulary(loaded, images):
    from causalmm import CausalMMConfig
    from causalmm.config import ConfigError
    from causalmm.explain import explain

    cm = loaded("llava").with_config(CausalMMConfig(method="regular"))
    vocab = cm.model.config.get_text_config().vocab_size
    with pytest.raises(ConfigError, match=f"top_k={vocab + 1} is more than the model's {vocab} tokens"):
        explain(cm, images[0], "hi", max_new_tokens=1, top_k=vocab + 1)
    assert len(explain(cm, images[0], "hi", max_new_tokens=1, top_k=vocab).to_json()["steps"]) == 1


def test_toyworld_train_refuses_a_folder_it_did_not_make_before_training(tmp_path, causalmm_cli):
    someone = tmp_path / "a-model"
    someone.mkdir()
    (someone / "config.json").write_text('{"model_type": "theirs"}')
    proc = causalmm_cli("toyworld", "train", "--out", someone, "--steps", "1", check=False)
    one_line_error(proc, "holds config.json, which causalmm toyworld train did not write")
    assert (someone / "config.json").read_text() == '{"model_type": "theirs"}' and proc.stdout == ""
    existing = tmp_path / "file"
    existing.write_text("x")
    one_line_error(causalmm_cli("toyworld", "train", "--out", existing, check=False), "is a file; give a folder")
