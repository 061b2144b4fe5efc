"""Run folders are safe to use: a run never overwrites its inputs or files it did not write, one process writes
into a folder at a time, the data is part of a run's identity (resume and compare), and bad input is one line."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from causalmm import CausalMMConfig
from causalmm.benchmarks import BenchmarkError, check_data_path, get_benchmark
from causalmm.benchmarks.base import Sample
from causalmm.benchmarks.compare import compare_runs, load_run
from causalmm.benchmarks.evaluate import RunSpec, evaluate, verify_images
from causalmm.benchmarks.records import check_done
from causalmm.benchmarks.run_folder import LOCK_ENV, RunLockedError, RunMismatchError, check_run_info, lock_run_folder

QUESTIONS = [
    ("a.png", "cat", "yes"),
    ("a.png", "dog", "no"),
    ("a.png", "car", "yes"),
    ("b.png", "bus", "no"),
    ("b.png", "tree", "yes"),
    ("b.png", "horse", "no"),
    ("c.png", "cup", "yes"),
    ("c.png", "boat", "no"),
    ("c.png", "kite", "yes"),
    ("c.png", "sink", "no"),
]


def write_questions(path: Path, rows=QUESTIONS, *, flip=(), template="Is there a {} in the image?") -> Path:
    """A POPE question file; ``flip`` lists 0-based rows whose label is inverted."""
    lines = []
    for i, (img, obj, label) in enumerate(rows):
        if i in flip:
            label = "no" if label == "yes" else "yes"
        lines.append(json.dumps({"question_id": i + 1, "image": img, "text": template.format(obj), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def noise_image(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope_rf")
    (root / "images").mkdir()
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        noise_image(root / "images" / name, k)
    write_questions(root / "q.json")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy world's test split in the POPE, CHAIR and VLind-Bench formats (small)."""
    from causalmm.toyworld import WorldConfig, write_splits

    root = tmp_path_factory.mktemp("toy_rf")
    write_splits(root, WorldConfig(), n_images_val=1, n_images_test=3, vlind_per_prior=1, vlind_images=1)
    return root / "test"


@pytest.fixture
def run_pope(model_dirs, loaded, pope):
    """``run_pope(out, data=..., images=..., **kw)``: a regular-decoding POPE run in this process."""

    def run(out, data=None, images=None, **kw):
        spec = RunSpec(
            "pope",
            model=str(model_dirs["llava"]),
            data=data or pope / "q.json",
            images=images or pope / "images",
            config=CausalMMConfig(method="regular"),
            generation={"max_new_tokens": 2},
            **kw,
        )
        return evaluate(spec, out=out, progress=False, n_boot=0, causalmm=loaded("llava"))

    return run


def one_line_error(proc, *needles):
    """The CLI refused with exit code 2 and one ``error:`` line holding every needle (no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in err, err
    return err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- a run never overwrites its inputs -------------------------------------------------------------------
def test_out_in_the_folder_of_vlind_data_json_is_refused_and_the_data_kept(toy, model_dirs, causalmm_cli):
    vlind = toy / "vlind"
    before = tree_bytes(vlind)
    proc = causalmm_cli(
        "eval", "vlind", "--model", model_dirs["llava"], "--data", vlind / "data.json", "--out", vlind,
        "--method", "regular", "--max-new-tokens", "2", "--no-progress", check=False,
    )  # fmt: skip
    one_line_error(proc, "holds the input", "data.json")
    assert tree_bytes(vlind) == before


@pytest.mark.parametrize("case", ["out is the data folder", "out inside the data folder", "images inside out"])
def test_every_overlap_of_out_and_the_inputs_is_refused_before_writing(toy, model_dirs, tmp_path, case):
    vlind = toy / "vlind"
    data, images, out = vlind, None, vlind
    if case == "out inside the data folder":
        out = vlind / "run"
    elif case == "images inside out":  # the POPE file lies elsewhere; its image folder is inside --out
        data, images, out = shutil.copy(toy / "pope_random.jsonl", tmp_path), toy / "images", toy
    before = tree_bytes(toy)
    bench = "vlind" if data == vlind else "pope"
    with pytest.raises(BenchmarkError, match="--out .*(holds the input|lies inside the input folder)"):
        evaluate(RunSpec(bench, model=str(model_dirs["llava"]), data=data, images=images), out=out, progress=False)
    assert tree_bytes(toy) == before


def test_the_num_processes_launcher_refuses_an_overlap_without_creating_anything(toy, model_dirs, causalmm_cli):
    out = toy / "vlind" / "run"
    proc = causalmm_cli(
        "eval", "vlind", "--model", model_dirs["llava"], "--data", toy / "vlind", "--out", out,
        "--num-processes", "2", "--no-progress", check=False,
    )  # fmt: skip
    one_line_error(proc, "lies inside the input folder")
    assert not out.exists()


def test_out_equal_to_the_chair_annotations_is_refused(toy, model_dirs, tmp_path):
    listing = shutil.copy(toy / "chair_images.txt", tmp_path / "chair_images.txt")
    with pytest.raises(BenchmarkError, match="holds the input .*annotations"):
        spec = RunSpec("chair", model=str(model_dirs["llava"]), data=listing, images=toy / "images",
                       options={"annotations": str(toy / "annotations")})  # fmt: skip
        evaluate(spec, out=toy / "annotations", progress=False)


def test_out_holding_files_of_its_own_is_refused_and_they_are_kept(model_dirs, tmp_path):
    """The MME case: --out already holds a Your_Results/ (someone's results) and is no run folder."""
    release = tmp_path / "mme"
    res = release / "eval_tool" / "Your_Results"
    res.mkdir(parents=True)
    (res / "existence.txt").write_text(
        "1.jpg\tIs there a dog? Please answer yes or no.\tYes\n1.jpg\tIs there a cat? Please answer yes or no.\tNo\n"
    )
    (release / "existence").mkdir()
    Image.new("RGB", (24, 24), (40, 90, 200)).save(release / "existence" / "1.jpg")
    out = tmp_path / "theirs"
    (out / "Your_Results").mkdir(parents=True)
    (out / "Your_Results" / "existence.txt").write_text("their answers\n")
    with pytest.raises(BenchmarkError, match="is not empty and is not a run folder .*Your_Results"):
        evaluate(RunSpec("mme", model=str(model_dirs["llava"]), data=res, images=release), out=out, progress=False)
    assert (out / "Your_Results" / "existence.txt").read_text() == "their answers\n"
    assert sorted(p.name for p in out.iterdir()) == ["Your_Results"]


def test_a_native_file_the_run_did_not_write_is_never_replaced(toy, model_dirs, loaded, tmp_path):
    out = tmp_path / "vlind-run"

    def run():
        spec = RunSpec("vlind", model=str(model_dirs["llava"]), data=toy / "vlind", limit=4,
                       config=CausalMMConfig(method="regular"), generation={"max_new_tokens": 2})  # fmt: skip
        return evaluate(spec, out=out, progress=False, n_boot=0, causalmm=loaded("llava"))

    run()
    assert json.loads((out / "run.json").read_text())["native_files"] == ["data.json"]
    # the state of a run killed before it finished (run.json, predictions), with someone's data.json put there
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "native_files": []}))
    (out / "metrics.json").unlink()
    theirs = (toy / "vlind" / "data.json").read_bytes()
    (out / "data.json").write_bytes(theirs)
    with pytest.raises(BenchmarkError, match="data.json exists and was not written by this run"):
        run()
    assert (out / "data.json").read_bytes() == theirs
    (out / "data.json").rename(tmp_path / "moved.json")
    run()
    assert json.loads((out / "run.json").read_text())["native_files"] == ["data.json"]
    assert "causalmm_pred_" in (out / "data.json").read_text()
    run()  # a file the run wrote is its own to replace


# -- one writer per run folder -----------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from causalmm.benchmarks.run_folder import lock_run_folder
with lock_run_folder(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (it prints "held" once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_frees_the_folder(
    run_pope, pope, model_dirs, tmp_path, causalmm_cli
):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        proc = causalmm_cli(
            "eval", "pope", "--model", model_dirs["llava"], "--data", pope / "q.json", "--images", pope / "images",
            "--out", out, "--method", "regular", "--max-new-tokens", "2", "--no-progress", check=False,
        )  # fmt: skip
        one_line_error(proc, "is in use by another causalmm eval", f"pid {holder.pid} ")
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            run_pope(out)
        assert not (out / "run.json").exists() and not (out / "predictions.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = run_pope(out)  # the kernel dropped the dead holder's lock: nothing stale to clean up
    assert summary["n_samples"] == len(QUESTIONS)


def test_workers_trust_the_lock_their_launcher_names(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with lock_run_folder(out) as fd:
        assert fd is not None
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):
            with lock_run_folder(out):
                pass
        monkeypatch.setenv(LOCK_ENV, str(out / ".causalmm.lock"))
        with lock_run_folder(out) as inherited:
            assert inherited is None
        monkeypatch.setenv(LOCK_ENV, str(tmp_path / "other" / ".causalmm.lock"))
        with pytest.raises(RunLockedError):
            with lock_run_folder(out):
                pass


# -- the data is part of a run's identity -----------------------------------------------------------------
def test_other_questions_under_the_same_ids_are_refused_on_resume(run_pope, pope, tmp_path):
    out = tmp_path / "run"
    run_pope(out)
    before = (out / "predictions.jsonl").read_bytes()
    other = write_questions(tmp_path / "other.json", template="Is a {} visible here?")
    with pytest.raises(RunMismatchError, match=r"10 sample\(s\) of --data differ .*id '1': its prompt was"):
        run_pope(out, data=other)
    assert (out / "predictions.jsonl").read_bytes() == before


def test_a_changed_image_is_refused_on_resume(run_pope, pope, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pope, data)
    out = tmp_path / "run"
    run_pope(out, data=data / "q.json", images=data / "images")
    noise_image(data / "images" / "b.png", 99)
    with pytest.raises(RunMismatchError, match=r"3 sample\(s\) .*id '4': its image .*b\.png changed"):
        run_pope(out, data=data / "q.json", images=data / "images")


def test_fixed_labels_rescore_a_finished_run_without_regenerating(run_pope, pope, tmp_path):
    """Labels do not influence generation: a rerun with corrected labels keeps the texts and scores them anew."""
    out = tmp_path / "run"
    wrong = write_questions(tmp_path / "wrong.json", flip=(0, 3))
    first = run_pope(out, data=wrong)
    texts = [json.loads(x)["text"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    fixed = run_pope(out, data=pope / "q.json")
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == texts
    assert [r["label"] for r in recs] == [label for _, _, label in QUESTIONS]
    bench = get_benchmark("pope")
    truth = [{"id": r["id"], "text": r["text"], "label": lab} for r, (_, _, lab) in zip(recs, QUESTIONS, strict=True)]
    expected = bench.metrics([{**r, **bench.parse(r)} for r in truth])["accuracy"]
    assert fixed["metrics"]["accuracy"] == pytest.approx(expected)
    assert fixed["data_digest"] != first["data_digest"]
    assert json.loads((out / "run.json").read_text())["data_digest"] == fixed["data_digest"]


def test_records_that_do_not_say_what_they_answer_are_not_reused(tmp_path):
    sample = Sample("1", None, "Is there a cat?", {"label": "yes"})
    old = {("1", 0): {"id": "1", "seed": 0, "text": "Yes", "label": "yes"}}
    with pytest.raises(RunMismatchError, match="do not record the prompt and image"):
        check_done([sample], old, tmp_path, {"1": "no image"})
    same = {("1", 0): {**old[("1", 0)], "prompt": "Is there a cat?", "image_digest": "no image", "label": "no"}}
    check_done([sample], same, tmp_path, {"1": "no image"})  # only the label differs: kept, re-scored


# -- compare compares like with like -----------------------------------------------------------------------
def test_compare_refuses_runs_on_different_samples_questions_or_labels(run_pope, pope, tmp_path, causalmm_cli):
    full, again = tmp_path / "full", tmp_path / "again"
    run_pope(full)
    run_pope(again)
    assert compare_runs([full, again], tmp_path / "ok", plot=False)["runs"][1]["vs_first"]["n"] == len(QUESTIONS)
    short = tmp_path / "short"
    run_pope(short, limit=4)
    with pytest.raises(BenchmarkError, match=r"\(10 samples\) and .*short \(4 samples\) cover different samples"):
        compare_runs([full, short], None, plot=False)
    asked = tmp_path / "asked"
    run_pope(asked, data=write_questions(tmp_path / "other.json", template="Is a {} visible here?"))
    with pytest.raises(BenchmarkError, match=r"ask different things under the same ids \(10 of 10 samples"):
        compare_runs([full, asked], None, plot=False)
    relabelled = tmp_path / "relabelled"
    run_pope(relabelled, data=write_questions(tmp_path / "flipped.json", flip=(2,)))
    with pytest.raises(BenchmarkError, match=r"different labels or metadata \(1 samples, e.g. id '3'\)"):
        compare_runs([full, relabelled], None, plot=False)
    proc = causalmm_cli("compare", full, short, "--out", tmp_path / "cmp", check=False)
    one_line_error(proc, "cover different samples", "short")


# -- one line for bad input ---------------------------------------------------------------------------------
def test_out_that_is_a_file_is_one_line_for_eval_and_compare(run_pope, pope, model_dirs, tmp_path, causalmm_cli):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    proc = causalmm_cli(
        "eval", "pope", "--model", model_dirs["llava"], "--data", pope / "q.json", "--images", pope / "images",
        "--out", a_file, "--no-progress", check=False,
    )  # fmt: skip
    one_line_error(proc, "is a file")
    run = tmp_path / "run"
    run_pope(run)
    proc = causalmm_cli("compare", run, run, "--out", a_file, check=False)
    one_line_error(proc, "is a file")
    assert a_file.read_text() == "mine\n"


def test_score_out_that_is_a_file_is_refused(run_pope, pope, tmp_path):
    from causalmm.benchmarks.score import score_predictions

    run = tmp_path / "run"
    run_pope(run)
    a_file = tmp_path / "metrics"
    a_file.write_text("mine\n")
    with pytest.raises(BenchmarkError, match="is a file"):
        score_predictions("pope", run / "predictions.jsonl", data=pope / "q.json", out=a_file)
    assert a_file.read_text() == "mine\n"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"model": "m"}'])
def test_a_corrupt_run_json_is_one_line(content, tmp_path):
    (tmp_path / "run.json").write_bytes(content)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(BenchmarkError, match="run.json is corrupt"):
        check_run_info(tmp_path, {"benchmark": "pope"})
    with pytest.raises(BenchmarkError, match="run.json is corrupt"):
        load_run(tmp_path)


def test_a_corrupt_run_json_through_the_cli(pope, model_dirs, tmp_path, causalmm_cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("[]")
    proc = causalmm_cli(
        "eval", "pope", "--model", model_dirs["llava"], "--data", pope / "q.json", "--images", pope / "images",
        "--out", out, "--no-progress", check=False,
    )  # fmt: skip
    one_line_error(proc, "run.json is corrupt", "pick another --out")


def _as_unprivileged() -> list[str] | None:
    """A command prefix under which file permissions bind (root ignores them), or ``None`` if none works here."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")  # a user namespace: still uid 0 on disk, without root's override
    if unshare and subprocess.run([unshare, "-U", "true"], capture_output=True).returncode == 0:
        return [unshare, "-U"]
    return None


def test_a_read_only_out_is_one_line_also_for_a_finished_run(run_pope, pope, model_dirs, tmp_path):
    prefix = _as_unprivileged()
    if prefix is None:
        pytest.skip("running as root without user namespaces: permissions cannot be made to bind")
    finished = tmp_path / "finished"
    run_pope(finished)
    parent = tmp_path / "parent"
    parent.mkdir()
    paths = [finished, *finished.iterdir(), parent]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
        for out in (finished, parent / "new"):
            proc = subprocess.run(
                [*prefix, sys.executable, "-m", "causalmm", "eval", "pope", "--model", str(model_dirs["llava"]),
                 "--data", str(pope / "q.json"), "--images", str(pope / "images"), "--out", str(out),
                 "--method", "regular", "--max-new-tokens", "2", "--no-progress"],
                capture_output=True, text=True, env=env, timeout=300,
            )  # fmt: skip
            one_line_error(proc, f"cannot write to --out {out}", "must be writable")
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_data_path_that_does_not_exist_says_so(model_dirs, tmp_path, causalmm_cli):
    proc = causalmm_cli(
        "eval", "pope", "--model", model_dirs["llava"], "--data", "nothere/q.json", "--out", tmp_path / "x",
        check=False,
    )  # fmt: skip
    err = one_line_error(proc, "--data nothere/q.json: no such file or folder")
    assert "download" not in err and not (tmp_path / "x").exists()
    for path in ("q.json", "runs/pope/q.json", "/abs/coco_pope.json", "./x/y", "data/pope.parquet"):
        with pytest.raises(BenchmarkError, match="no such file or folder"):
            check_data_path(path)
    check_data_path("lmms-lab/POPE")  # the shape of a hub id: left to the loaders' hub path


def test_a_corrupt_image_fails_before_the_model_is_loaded(pope, tmp_path, causalmm_cli):
    data = tmp_path / "data"
    shutil.copytree(pope, data)
    png = (data / "images" / "b.png").read_bytes()
    (data / "images" / "b.png").write_bytes(png[: len(png) // 2])  # cut mid-file, as a failed copy leaves it
    proc = causalmm_cli(
        "eval", "pope", "--model", tmp_path / "no-model-here", "--data", data / "q.json", "--images",
        data / "images", "--out", tmp_path / "run", check=False,
    )  # fmt: skip
    err = one_line_error(proc, "1 image(s) cannot be read as images", "b.png", "before loading the model")
    assert "no-model-here" not in err and not (tmp_path / "run").exists()


def test_image_bytes_are_decoded_too():
    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format=fmt)
        return buf.getvalue()

    good, jpeg = encoded("PNG"), encoded("JPEG")
    samples = [
        Sample("1", good, "q", {}),
        Sample("2", good, "q", {}),  # same image: one digest, decoded once
        Sample("3", jpeg[: len(jpeg) - 200], "q", {}),
        Sample("4", b"not an image", "q", {}),
    ]
    with pytest.raises(BenchmarkError, match=r"2 image\(s\) cannot be read .*sample 3 .*sample 4"):
        verify_images(samples)
    digests = verify_images(samples[:2])
    assert digests["1"] == digests["2"]


def test_killed_holder_leaves_a_reusable_lock_file(tmp_path):
    """The lock file stays behind after kill -9 (it names the dead pid), and means nothing: flock is gone."""
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".causalmm.lock").read_text().split()[0] == str(holder.pid)
    deadline = time.time() + 10
    while True:
        try:
            with lock_run_folder(out):
                break
        except RunLockedError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert (out / ".causalmm.lock").read_text().split()[0] == str(os.getpid())
