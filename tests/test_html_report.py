"""``causalmm compare --html``: the disagreement rule on hand-built records, and the page a user gets from two
real toy-world runs, checked against their run folders (in a real browser too, where Chromium is installed)."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from causalmm.benchmarks import get_benchmark
from causalmm.benchmarks.compare import Run
from causalmm.benchmarks.html_report import disagreements
from causalmm.benchmarks.records import load_records


def _pope_run(answers, label_list, name):
    bench = get_benchmark("pope")
    records = []
    for i, (text, label) in enumerate(zip(answers, label_list, strict=True)):
        rec = {"id": str(i), "seed": 0, "text": text, "label": label, "prompt": f"q{i}", "image_digest": None}
        records.append({**rec, **bench.parse(rec)})
    return Run(Path(name), name, {}, bench, records)


def test_disagreements_are_exactly_the_changed_answers_with_their_kind():
    labels = ["yes", "no", "yes", "no", "yes"]
    ref = _pope_run(["Yes", "Yes", "No", "No", "Yes, there is."], labels, "ref")
    # sample 0: same parsed answer in other words (not listed); 1: fixed; 2: fixed; 3: broken; 4: agrees
    run = _pope_run(["Yes, it is.", "No", "Yes", "Yes", "Yes"], labels, "run")
    flips = disagreements([ref, run], ["ref", "run"])
    assert [(f["id"], f["answers"][1]["kind"]) for f in flips] == [("1", "fixed"), ("2", "fixed"), ("3", "broken")]
    assert all(f["answers"][0]["kind"] is None for f in flips)
    assert flips[0]["label"] == "no" and flips[0]["prompt"] == "q1"
    # a third run that agrees with the reference on sample 1 leaves it listed (for the second run) with no kind
    third = _pope_run(["Yes", "Yes", "No", "No", "No"], labels, "third")
    flips = disagreements([ref, run, third], ["ref", "run", "third"])
    kinds = {f["id"]: [a["kind"] for a in f["answers"]] for f in flips}
    assert kinds == {"1": [None, "fixed", None], "2": [None, "fixed", None], "3": [None, "broken", None],
                     "4": [None, None, "broken"]}  # fmt: skip


def test_chair_outcome_reads_the_named_objects_and_counts_hallucinations():
    bench = get_benchmark("chair")
    ref = {"mentioned": ["dog", "cat", "cat"], "hallucinated": ["cat", "cat"], "gt_objects": ["dog"]}
    fewer = {"mentioned": ["dog"], "hallucinated": [], "gt_objects": ["dog"]}
    other = {"mentioned": ["dog", "car"], "hallucinated": ["car"], "gt_objects": ["dog"]}
    assert bench.outcome(ref) == (("cat", "dog"), -2.0)
    assert bench.outcome(fewer) == (("dog",), 0.0)
    assert bench.outcome(other)[1] > bench.outcome(ref)[1]
    assert bench.label_of(ref) == "objects in the image: dog"
    vlind = get_benchmark("vlind")
    assert vlind.outcome({"answer": "True", "expected": "False"}) == ("True", 0.0)
    assert vlind.label_of({"expected": "False"}) == "False"


class _Page(HTMLParser):
    """The samples, images and external references of a report page."""

    def __init__(self):
        super().__init__()
        self.samples, self.external, self.styles, self._in_style = [], [], "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "sample" in (a.get("class") or "").split():
            self.samples.append({"id": a["data-id"], "seed": int(a["data-seed"]), "kinds": json.loads(a["data-kinds"])})
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_style:
            self.styles += data


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, causalmm_cli):
    """Regular decoding and CausalMM's language branch on the toy world's test questions (they disagree)."""
    from causalmm.toyworld.model import shipped_model_path

    root = tmp_path_factory.mktemp("html")
    causalmm_cli("toyworld", "splits", "--out", root / "sp", "--val-images", "1", "--test-images", "8")
    test = root / "sp" / "test"
    runs = {}
    for name, flags in (("regular", ["--method", "regular"]), ("language", ["--mode", "language"])):
        runs[name] = root / name
        causalmm_cli("eval", "pope", "--model", shipped_model_path(), "--data", test / "pope_all.jsonl",
                     "--images", test / "images", "--out", runs[name], "--batch-size", "40", "--no-progress",
                     *flags)  # fmt: skip
    return root, runs


def _expected_flips(runs):
    """(id, seed) -> kind, read from the two run folders' predictions with the POPE rule."""
    bench = get_benchmark("pope")
    ref, run = ({k: {**r, **bench.parse(r)} for k, r in load_records(p / "predictions.jsonl").items()} for p in runs)
    out = {}
    for key, a in ref.items():
        b = run[key]
        if a["answer"] != b["answer"]:
            out[(str(key[0]), int(key[1]))] = "fixed" if b["answer"] == b["label"] else "broken"
    return out


def test_the_page_lists_exactly_the_disagreeing_samples_with_their_images(toy_runs, tmp_path, causalmm_cli):
    root, runs = toy_runs
    page_path = tmp_path / "out" / "report.html"
    proc = causalmm_cli("compare", runs["regular"], runs["language"], "--out", tmp_path / "cmp", "--html", page_path)
    assert f"wrote {page_path}" in proc.stderr
    page = _Page()
    page.feed(page_path.read_text(encoding="utf-8"))
    expected = _expected_flips([runs["regular"], runs["language"]])
    assert expected, "the two toy-world runs should disagree somewhere"
    assert {(s["id"], s["seed"]): s["kinds"]["language"] for s in page.samples} == expected
    assert len(page.samples) == len(expected)
    assert page.external == []  # self-contained: every image and script is inline
    images = set(re.findall(r"\.im\d+\{background-image:url\(data:image/png;base64,", page.styles))
    assert images, "the listed samples' images are embedded"
    text = page_path.read_text(encoding="utf-8")
    fixed = sum(1 for k in expected.values() if k == "fixed")
    assert f'<td class="num">{fixed}</td>' in text and "McNemar" in text and "causalmm compare" in text


def test_images_replaced_after_the_run_are_not_shown(toy_runs, tmp_path, causalmm_cli):
    """A picture the model never saw is not put beside its answer: the page says the images are not shown."""
    import shutil

    from PIL import Image

    root, runs = toy_runs
    moved = tmp_path / "runs"
    shutil.copytree(root, moved)
    for image in (moved / "sp" / "test" / "images").iterdir():
        Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    for name in runs:  # the run folders point at the copied data
        info = json.loads((moved / name / "run.json").read_text())
        info["data"] = str(moved / "sp" / "test" / "pope_all.jsonl")
        info["images"] = str(moved / "sp" / "test" / "images")
        (moved / name / "run.json").write_text(json.dumps(info))
    page_path = tmp_path / "report.html"
    causalmm_cli("compare", moved / "regular", moved / "language", "--out", tmp_path / "cmp", "--html", page_path)
    text = page_path.read_text(encoding="utf-8")
    assert "image(s) not shown" in text and "background-image:url(data:" not in text
    assert "image not available" in text


def test_html_into_a_directory_is_one_line(toy_runs, tmp_path, causalmm_cli):
    _, runs = toy_runs
    bad = causalmm_cli("compare", runs["regular"], runs["language"], "--html", tmp_path, check=False)
    assert bad.returncode == 2 and "is a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_the_page_filters_in_a_real_browser(toy_runs, tmp_path, causalmm_cli, browser):
    """Chromium opens the page from disk: every disagreeing sample is shown, unticking "broken" leaves the fixed
    ones, and the text filter finds a sample by its id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, runs = toy_runs
    page_path = tmp_path / "report.html"
    causalmm_cli("compare", runs["regular"], runs["language"], "--out", tmp_path / "cmp", "--html", page_path)
    expected = _expected_flips([runs["regular"], runs["language"]])
    browser.get(page_path.as_uri())

    def shown():
        return {(e.get_attribute("data-id"), int(e.get_attribute("data-seed")))
                for e in browser.find_elements(By.CSS_SELECTOR, ".sample") if e.is_displayed()}  # fmt: skip

    assert shown() == set(expected)
    browser.find_element(By.CSS_SELECTOR, "input[name=kind][value=broken]").click()
    assert shown() == {k for k, v in expected.items() if v == "fixed"}
    assert browser.find_element(By.ID, "shown-count").text == str(len(shown()))
    browser.find_element(By.CSS_SELECTOR, "input[name=kind][value=broken]").click()
    some = sorted(expected)[0]
    box = browser.find_element(By.ID, "text-filter")
    box.send_keys(f"id {some[0]} ")  # never typed in a question: matches nothing, so the list empties
    assert shown() == set()
    box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    box.send_keys(browser.find_element(By.CSS_SELECTOR, f'.sample[data-id="{some[0]}"] .q').text.lower())
    assert some in shown()
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
