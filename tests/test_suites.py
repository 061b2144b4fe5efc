"""``causalmm suite``: the shipped causalmm-paper protocol end to end on a miniature data root (placeholder
images under the real file names, the real POPE question files cut by --limit), resumed after a kill."""

import json
import shutil

import pytest
from PIL import Image

from causalmm import CausalMM, CausalMMConfig
from causalmm.benchmarks.base import BenchmarkError
from causalmm.suites import SUITES, load_suite, plan, run_suite
from causalmm.toyworld.worlds import shipped_model_path

LIMIT = 2
VLIND = {
    "concept": "color", "context_id": 1, "context": "Bananas are blue", "factual_context": "Bananas are yellow",
    "true_statement": "The bananas are blue.", "false_statement": "The bananas are yellow.",
    "existent_noun": "a banana", "non-existent_noun": "a car", "best_img_id": 0,
    "aggregated_human_label_good_images": {"0": 3},
}  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """coco, gqa, mme and vlind roots holding what the first LIMIT samples of each benchmark need."""
    root = tmp_path_factory.mktemp("suite-data")
    suite = load_suite("causalmm-paper")
    image = Image.new("RGB", (24, 24), (30, 120, 200))
    for b in suite.benchmarks:
        if b["benchmark"] != "pope":
            continue
        folder = root / b["images"].strip("{}")
        folder.mkdir(exist_ok=True)
        text = (suite.path.parent / b["data"]).read_text()
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()]
        for item in items[:LIMIT]:
            image.save(folder / item["image"])
    for sub in ("existence", "count", "position", "color"):
        (root / "mme" / sub).mkdir(parents=True)
        image.save(root / "mme" / sub / "1.png")
        (root / "mme" / sub / "1.txt").write_text(f"Is there a {sub}?\tYes\nIs there no {sub}?\tNo\n")
    vlind = root / "vlind"
    vlind.mkdir()
    (vlind / "data.json").write_text(json.dumps([VLIND]))
    for part in ("factual/color/1_Bananas are yellow", "counterfactual/color/1_Bananas are blue"):
        (vlind / "images" / part).mkdir(parents=True)
        image.save(vlind / "images" / part / "0.jpg")
    return {name: str(root / name) for name in ("coco", "gqa", "mme", "vlind")}


def test_the_shipped_suite_names_every_run_and_ships_its_question_files():
    suite = load_suite("causalmm-paper")
    runs = plan(suite, {}, dry_run=True)
    assert len(runs) == 11 * 7  # nine POPE files, MME, VLind-Bench x seven methods, one seed
    assert len({r.folder for r in runs}) == len(runs)
    for r in runs:
        if r.benchmark["benchmark"] == "pope":
            assert (suite.path.parent / r.benchmark["data"]).is_file()
    causal = [r for r in runs if r.method["key"] == "causalmm-language"][0]
    assert causal.method["config"]["epsilon"] == 0.6 and causal.seed == 55 and causal.generation["do_sample"]
    assert "causalmm-paper" in SUITES
    with pytest.raises(BenchmarkError, match="needs --root coco=DIR"):
        plan(suite, {})


def test_a_bad_suite_file_is_refused_with_what_is_wrong(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('[[benchmarks]]\nkey = "a"\nbenchmark = "pope"\ndata = "q.json"\n')
    with pytest.raises(BenchmarkError, match="needs \\[\\[benchmarks\\]\\] and \\[\\[methods\\]\\]"):
        load_suite(path=bad)
    bad.write_text(bad.read_text() + '[[methods]]\nkey = "m"\nconfig = {method = "regular"}\n'
                   '[[tables]]\nkey = "t"\nbenchmarks = ["b"]\n')  # fmt: skip
    with pytest.raises(BenchmarkError, match="names benchmark 'b'"):
        load_suite(path=bad)
    bad.write_text("name = [")
    with pytest.raises(BenchmarkError, match="not valid TOML"):
        load_suite(path=bad)


def _tables(out):
    return (out / "tables.json").read_text(), (out / "tables.md").read_text()


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_the_paper_suite_runs_end_to_end_and_resumes_to_the_same_tables(which, roots, model_dirs, tmp_path):
    model = str(model_dirs["llava"]) if which == "tiny" else str(shipped_model_path())
    cm = CausalMM.from_pretrained(model, CausalMMConfig(method="regular"))
    suite = load_suite("causalmm-paper")
    out = tmp_path / "suite"
    result = run_suite(suite, model, out, roots, limit=LIMIT, batch_size=2, log=lambda _: None, causalmm=cm,
                       command="causalmm suite causalmm-paper")  # fmt: skip
    assert [t["key"] for t in result["tables"]] == ["pope", "mme", "vlind"]
    pope = result["tables"][0]
    assert pope["header"] == ["dataset", "setting", "method", "accuracy", "precision", "recall", "f1"]
    assert len(pope["rows"]) == 9 * 7
    run = json.loads((out / "runs/pope/gqa/popular/causalmm-vision/seed-55/metrics.json").read_text())
    row = [r for r in pope["rows"] if r[:3] == ["GQA", "popular", "CausalMM (vision)"]][0]
    assert row[3:] == [f"{run['metrics'][m]:.2f}" for m in ("accuracy", "precision", "recall", "f1")]
    info = json.loads((out / "runs/mme/opera/seed-55/run.json").read_text())
    assert info["options"]["subtasks"] == "existence,count,position,color" and info["n_samples"] == LIMIT
    assert info["config"]["method"] == "opera"
    sampled = json.loads((out / "runs/vlind/vcd/seed-55/run.json").read_text())
    assert sampled["generation"]["do_sample"] is True and sampled["seeds"] == [55]
    before = _tables(out)
    # a kill: one run half written, one never started, the tables never written
    half = out / "runs/pope/aokvqa/adversarial/causalmm-multimodal/seed-55"
    lines = (half / "predictions.jsonl").read_text().splitlines(keepends=True)
    (half / "predictions.jsonl").write_text(lines[0])
    (half / "metrics.json").unlink()
    shutil.rmtree(out / "runs/vlind/causalmm-language")
    (out / "tables.json").unlink()
    (out / "tables.md").unlink()
    run_suite(suite, model, out, roots, limit=LIMIT, batch_size=2, log=lambda _: None, causalmm=cm,
              command="causalmm suite causalmm-paper")  # fmt: skip
    assert _tables(out) == before


def test_suite_from_the_command_line(roots, causalmm_cli, tmp_path):
    proc = causalmm_cli("suite", "causalmm-paper", "--dry-run")
    assert len(proc.stdout.splitlines()) == 77 and "runs/vlind/opera/seed-55" in proc.stdout
    bad = causalmm_cli("suite", "causalmm-paper", "--model", "m", "--out", tmp_path / "o", check=False)
    assert bad.returncode == 2 and "needs --root coco=DIR" in bad.stderr
    bad = causalmm_cli("suite", "causalmm-paper", "--dry-run", "--root", "cocoa=/x", check=False)
    assert bad.returncode == 2 and "no such root; it takes coco, gqa, mme, vlind" in bad.stderr


def test_a_suite_file_of_ones_own_over_two_processes_gives_the_same_tables(roots, model_dirs, causalmm_cli, tmp_path):
    """``--suite-file`` with a shipped question file named by its absolute path; under ``--num-processes 2`` each
    run's samples are dealt between two processes and the tables are those of one process."""
    shipped = load_suite("causalmm-paper").path.parent / "data" / "pope" / "coco_pope_random.json"
    suite = tmp_path / "mine.toml"
    suite.write_text(
        'name = "mine"\ntitle = "Mine"\nseeds = [3]\n[roots]\ncoco = "COCO images"\n'
        f'[[benchmarks]]\nkey = "coco"\nbenchmark = "pope"\ndata = "{shipped}"\nimages = "{{coco}}"\n'
        '[[methods]]\nkey = "regular"\nconfig = { method = "regular" }\n'
        '[[methods]]\nkey = "vcd"\nconfig = { method = "vcd" }\n'
    )
    args = ["suite", "--suite-file", suite, "--model", model_dirs["llava"], "--root", f"coco={roots['coco']}",
            "--limit", str(LIMIT)]  # fmt: skip
    one = causalmm_cli(*args, "--out", tmp_path / "one")
    assert "| coco | method |" not in one.stdout and "| method | accuracy |" in one.stdout
    causalmm_cli(*args, "--out", tmp_path / "two", "--num-processes", "2")
    a = json.loads((tmp_path / "one" / "tables.json").read_text())
    b = json.loads((tmp_path / "two" / "tables.json").read_text())
    assert a["tables"] == b["tables"] and a["tables"][0]["rows"][1][0] == "vcd"
    assert json.loads((tmp_path / "two" / "runs/coco/vcd/seed-3/run.json").read_text())["seeds"] == [3]
