"""``causalmm compare`` over many runs: the baselines read from run.json, Holm's correction of each baseline's
family of tests, and CHAIR's recall–CHAIR_i frontier against regular decoding at several lengths. Real runs of
the toy world's shipped model (12 test images), checked against their own run folders."""

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from causalmm import CausalMM, CausalMMConfig
from causalmm.benchmarks import get_benchmark
from causalmm.benchmarks.compare import compare_runs, curve_verdict, find_baselines, format_p
from causalmm.benchmarks.evaluate import RunSpec, evaluate
from causalmm.benchmarks.records import load_records
from causalmm.benchmarks.stats import holm

N_BOOT = 300  # enough for the numbers checked here, which never depend on the bootstrap's draws


# -- Holm ------------------------------------------------------------------------------------------------------
def test_holm_matches_the_hand_computed_example_and_its_edges():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([]) == []
    assert holm([0.3]) == [0.3]  # a family of one is not adjusted
    # ties get the same adjusted value whatever their order: 0.01 * 3, then 0.02 * 2 for both
    assert holm([0.02, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04], abs=1e-15)
    assert holm([0.5, 0.5]) == [1.0, 1.0]  # capped at 1
    assert holm([1.0, 0.001]) == [1.0, 0.002]
    assert holm([0.0, 0.0]) == [0.0, 0.0]
    for bad in ([1.5], [-0.1], [math.nan]):
        with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
            holm(bad)


# -- which runs are the baselines -------------------------------------------------------------------------------
def _info(method: str, **generation) -> dict:
    return {"config": {"method": method}, "generation": generation}


def test_baselines_are_the_regular_runs_of_the_methods_length():
    infos = [
        _info("regular", max_new_tokens=8, do_sample=False),  # greedy, but not the methods' length
        _info("causalmm", max_new_tokens=4, do_sample=False),
        _info("regular", max_new_tokens=4),  # no do_sample recorded (the API's runs): greedy
        _info("vcd", max_new_tokens=4, do_sample=False),
        _info("regular", max_new_tokens=8, do_sample=True, temperature=1.0, top_p=None),
        _info("regular", max_new_tokens=4, do_sample=True, temperature=1.0, top_p=None),
        _info("regular", max_new_tokens=4, do_sample=False, num_beams=3),  # beam search: neither baseline
    ]
    found = find_baselines(infos)
    assert {k: v["index"] for k, v in found.items()} == {"greedy": 2, "sampled": 5}
    assert found["greedy"]["why"].startswith("regular decoding, greedy, max_new_tokens 4")
    assert "as 2 of the 2 other methods' runs use" in found["greedy"]["why"]
    # no regular run at the methods' length: the first regular run of each kind
    found = find_baselines([_info("vcd", max_new_tokens=4), _info("regular", max_new_tokens=8),
                            _info("regular", max_new_tokens=16)])  # fmt: skip
    assert found["greedy"]["index"] == 1 and "first of 2" in found["greedy"]["why"] and "sampled" not in found
    # the same length, other search options: the one searching as the methods do
    found = find_baselines([_info("regular", max_new_tokens=4, repetition_penalty=1.2), _info("vcd", max_new_tokens=4),
                            _info("regular", max_new_tokens=4)])  # fmt: skip
    assert found["greedy"]["index"] == 2
    # only regular runs: the first run's length decides
    found = find_baselines([_info("regular", max_new_tokens=16), _info("regular", max_new_tokens=8),
                            _info("regular", max_new_tokens=16)])  # fmt: skip
    assert found["greedy"]["index"] == 0 and "as the first run; 3 greedy runs given" in found["greedy"]["why"]
    assert find_baselines([_info("vcd", max_new_tokens=4), _info("causalmm", max_new_tokens=4)]) == {}
    assert find_baselines([]) == {}


# -- the curve verdict, on crafted points -------------------------------------------------------------------------
def test_curve_verdict_interpolates_between_the_nearest_regular_points():
    curve = [(10.0, 70.0), (2.0, 40.0), (6.0, 60.0)]  # (CHAIR_i, recall), in any order
    above = curve_verdict(curve, 4.0, 55.0)  # the curve at CHAIR_i 4: 40 + (60 - 40) * (4 - 2) / (6 - 2) = 50
    assert above["recall_at"] == pytest.approx(50.0) and above["margin"] == pytest.approx(5.0)
    assert above["verdict"] == "above" and above["between"] == [1, 2]
    below = curve_verdict(curve, 8.0, 60.0)  # 60 + (70 - 60) * (8 - 6) / (10 - 6) = 65
    assert below["recall_at"] == pytest.approx(65.0) and below["verdict"] == "below"
    assert curve_verdict(curve, 6.0, 60.0)["verdict"] == "on"  # a regular point itself
    assert curve_verdict(curve, 2.0, 39.0)["verdict"] == "below"  # the range's ends are inside
    for x in (1.9, 10.5):
        assert curve_verdict(curve, x, 99.0) == {"recall_at": None, "margin": None, "between": [], "verdict": "outside"}
    assert curve_verdict([], 5.0, 50.0)["verdict"] == "outside"
    assert curve_verdict([(5.0, 50.0), (5.0, 55.0)], 5.0, 52.0)["recall_at"] == 55.0  # the best of tied points


# -- real runs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from causalmm.toyworld import WorldConfig, write_splits
    from causalmm.toyworld.model import shipped_model_path

    root = tmp_path_factory.mktemp("many")
    paths = write_splits(root / "w", WorldConfig(), n_images_val=1, n_images_test=12, vlind_per_prior=1,
                         vlind_images=1)  # fmt: skip
    model = str(shipped_model_path())
    cm = CausalMM.from_pretrained(model, CausalMMConfig(method="regular"), base="eager")

    def run(bench: str, name: str, config: CausalMMConfig, **generation) -> Path:
        data = {"pope": paths["test/pope_all"], "chair": paths["test/chair_images"]}[bench]
        options = {"annotations": str(paths["test/chair_annotations"])} if bench == "chair" else {}
        spec = RunSpec(bench, model=model, data=data, images=paths["test/images"], config=config,
                       generation=generation, options=options)  # fmt: skip
        evaluate(spec, out=root / name, progress=False, n_boot=0, causalmm=cm, batch_size=40)
        return root / name

    return root, run


REGULAR, LANGUAGE, VCD = CausalMMConfig(method="regular"), CausalMMConfig(mode="language"), CausalMMConfig(method="vcd")


@pytest.fixture(scope="module")
def pope_runs(world):
    _, run = world
    return {
        "long": run("pope", "long", REGULAR, max_new_tokens=8),  # regular greedy at another length, given first
        "language": run("pope", "language", LANGUAGE, max_new_tokens=4),
        "regular": run("pope", "regular", REGULAR, max_new_tokens=4),
        "vcd": run("pope", "vcd", VCD, max_new_tokens=4),
        "sampled": run("pope", "sampled", REGULAR, max_new_tokens=4, do_sample=True, temperature=1.0),
    }


@pytest.fixture(scope="module")
def chair_runs(world):
    _, run = world
    runs = {f"reg{n}": run("chair", f"reg{n}", REGULAR, max_new_tokens=n) for n in (4, 8, 16, 32)}
    runs["language"] = run("chair", "c-language", LANGUAGE, max_new_tokens=32)
    runs["vcd"] = run("chair", "c-vcd", VCD, max_new_tokens=32)
    return runs


class _Tables(HTMLParser):
    """Every table of a page, by id: its rows of cell texts (the header row first); and its images' sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._id, self._cell = {}, {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self.tables[self._id].append([])
        elif tag in ("td", "th") and self._id:
            self._cell = ""
        elif tag == "img":
            self.images[a["alt"]] = a["src"]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._id][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _md_table(md: str, heading: str) -> list[list[str]]:
    """The rows (header first) of the first markdown table after ``heading``."""
    lines = md[md.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def _mcnemar_by_hand(base: Path, run: Path) -> tuple[int, int, float]:
    """(baseline-only right, run-only right, exact two-sided p) from two POPE run folders' predictions."""
    bench = get_benchmark("pope")
    a, b = ({k: bench.parse(r) | r for k, r in load_records(p / "predictions.jsonl").items()} for p in (base, run))
    ra = {k: r["answer"] == r["label"] for k, r in a.items()}
    rb = {k: r["answer"] == r["label"] for k, r in b.items()}
    x = sum(ra[k] and not rb[k] for k in ra)
    y = sum(rb[k] and not ra[k] for k in ra)
    n = x + y
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(x, y) + 1)) / 2**n)
    return x, y, p


def test_every_method_is_tested_against_greedy_and_sampled_with_holm(pope_runs, tmp_path):
    order = ["long", "language", "regular", "vcd", "sampled"]
    result = compare_runs([pope_runs[k] for k in order], tmp_path / "cmp", n_boot=N_BOOT, html=tmp_path / "r.html")
    refs = {r["name"]: r for r in result["references"]}
    assert set(refs) == {"greedy", "sampled"}
    assert refs["greedy"]["run"] == "regular" and refs["sampled"]["run"] == "sampled"  # not "long" (8 tokens)
    rows = {row["run"]: row for row in result["runs"]}
    tested = ["long", "language", "vcd"]
    for name in tested:
        assert set(rows[name]["tests"]) == {"greedy", "sampled"}
    assert rows["regular"]["tests"] == {} and rows["sampled"]["tests"] == {}
    assert rows["regular"]["baseline_of"] == ["greedy"] and "vs_first" not in rows["language"]  # first: no baseline
    md = (tmp_path / "cmp" / "compare.md").read_text()
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    page = _Tables()
    page.feed((tmp_path / "r.html").read_text())
    for kind, base in (("greedy", "regular"), ("sampled", "sampled")):
        family = [rows[name]["tests"][kind] for name in tested]
        assert refs[kind]["family"] == 3
        # McNemar's counts and p from the predictions, by hand; Holm over exactly this family
        for name, test in zip(tested, family, strict=True):
            x, y, p = _mcnemar_by_hand(pope_runs[base], pope_runs[name])
            assert test["test"] == "McNemar" and (test["ref_only"], test["run_only"]) == (x, y)
            assert test["p"] == pytest.approx(p, rel=1e-12)
            assert test["diff"] == pytest.approx(rows[name]["metrics"]["accuracy"] - rows[base]["metrics"]["accuracy"])
        adjusted = holm([t["p"] for t in family])
        assert [t["p_holm"] for t in family] == adjusted
        assert [t["significant"] for t in family] == [a <= 0.05 for a in adjusted]
        # the markdown, compare.json and the HTML page print the same p-values
        table = _md_table(md, f"## Paired tests against regular {kind} decoding ({base})")
        head, body = table[0], table[1:]
        assert [r[0] for r in body] == tested
        for r, name in zip(body, tested, strict=True):
            test = saved["runs"][order.index(name)]["tests"][kind]
            assert r[head.index("p")] == format_p(test["p"]) and r[head.index("p (Holm)")] == format_p(test["p_holm"])
            assert float(r[head.index("p (Holm)")]) == pytest.approx(test["p_holm"], rel=5e-3)
            assert r[head.index("significant at 0.05 (Holm)")] == ("yes" if test["significant"] else "no")
        assert page.tables[f"tests-{kind}"] == table
    assert page.tables["metrics"] == _md_table(md, "# POPE")
    assert "frontier" not in saved and not (tmp_path / "cmp" / "frontier.png").exists()


def test_two_runs_keep_the_test_against_the_first(pope_runs, tmp_path):
    """A plain comparison reads as before: regular first is the reference, ``vs_first`` its test; without any
    regular run the first run is the reference, a family of one."""
    result = compare_runs([pope_runs["regular"], pope_runs["language"]], None, n_boot=N_BOOT, plot=False)
    row = result["runs"][1]
    assert row["vs_first"] is row["tests"]["greedy"] and row["vs_first"]["p_holm"] == row["vs_first"]["p"]
    assert "McNemar" in result["table"] and "| regular | regular | 120 |" in result["table"]
    result = compare_runs([pope_runs["vcd"], pope_runs["language"]], None, n_boot=N_BOOT, plot=False)
    assert [r["name"] for r in result["references"]] == ["first"] and result["runs"][1]["vs_first"]["n"] == 120
    # the only greedy run decodes 8 tokens, the method 4: tested, and the table says the two differ in more
    result = compare_runs([pope_runs["long"], pope_runs["vcd"]], None, n_boot=N_BOOT, plot=False)
    assert result["runs"][1]["vs_first"]["test"] == "McNemar"
    assert any("differ in more than the method" in note for note in result["notes"])
    assert "Note: vcd (greedy, 4 tokens) and the greedy baseline long (greedy, 8 tokens)" in result["table"]
    # greedy first and sampled second, as a paper's table lists them: the two baselines are not tested against
    # each other, so the sampled run has no vs_first, and the method has both tests
    result = compare_runs([pope_runs[k] for k in ("regular", "sampled", "vcd")], None, n_boot=N_BOOT, plot=False)
    sampled, vcd = result["runs"][1], result["runs"][2]
    assert "vs_first" not in sampled and not sampled["tests"]
    assert vcd["vs_first"] is vcd["tests"]["greedy"] and set(vcd["tests"]) == {"greedy", "sampled"}


def _interp_by_hand(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's recall at CHAIR_i ``x`` with numpy's linear interpolation over its points sorted by CHAIR_i
    (the best recall where points share a CHAIR_i); None outside its range."""
    best: dict[float, float] = {}
    for cx, cy in curve:
        best[cx] = max(cy, best.get(cx, -1.0))
    xs = sorted(best)
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, [best[v] for v in xs]))


def test_chair_frontier_points_are_the_runs_metrics_and_the_verdicts_hold(chair_runs, tmp_path):
    order = ["language", "reg16", "reg4", "vcd", "reg32", "reg8"]  # shuffled: the curve sorts by length
    out, page_path = tmp_path / "cmp", tmp_path / "page.html"
    result = compare_runs([chair_runs[k] for k in order], out, n_boot=N_BOOT, html=page_path)
    # CHAIR runs at other lengths hold the same samples: compared, not refused
    assert [r["run"] for r in result["references"]] == ["reg32"]  # the length both methods use
    saved = json.loads((out / "compare.json").read_text())
    fr = saved["frontier"]
    labels = {k: chair_runs[k].name for k in order}
    metrics = {k: json.loads((chair_runs[k] / "metrics.json").read_text())["metrics"] for k in order}
    points = {p["label"]: p for p in fr["points"]}
    for k in order:
        p = points[labels[k]]
        assert (p["chair_i"], p["recall"]) == (metrics[k]["CHAIR_i"], metrics[k]["recall"])  # exactly
        assert (
            p["max_new_tokens"] == json.loads((chair_runs[k] / "run.json").read_text())["generation"]["max_new_tokens"]
        )
    assert points["c-language"]["method"] == "causalmm/language" and points["c-vcd"]["method"] == "vcd"
    assert [c["label"] for c in fr["curve"]] == ["reg4", "reg8", "reg16", "reg32"]
    assert [c["max_new_tokens"] for c in fr["curve"]] == [4, 8, 16, 32]
    curve = [(metrics[k]["CHAIR_i"], metrics[k]["recall"]) for k in ("reg4", "reg8", "reg16", "reg32")]
    assert [v["label"] for v in fr["verdicts"]] == ["c-language", "c-vcd"]
    for v, k in zip(fr["verdicts"], ("language", "vcd"), strict=True):
        x, y = metrics[k]["CHAIR_i"], metrics[k]["recall"]
        at = _interp_by_hand(curve, x)
        if at is None:
            assert v["verdict"] == "outside" and v["recall_at"] is None
        else:
            assert v["recall_at"] == pytest.approx(at, abs=1e-9)
            assert v["verdict"] == ("on" if abs(y - at) <= 1e-9 else "above" if y > at else "below")
        dominated = [lab for lab, (cx, cy) in zip(("reg4", "reg8", "reg16", "reg32"), curve, strict=True)
                     if cx <= x and cy >= y and (cx, cy) != (x, y)]  # fmt: skip
        assert v["dominated_by"] == dominated
    # the markdown and the page print the same frontier, the runs' own numbers to two decimals
    md = (out / "compare.md").read_text()
    table = _md_table(md, "## CHAIR: recall against CHAIR_i")
    head, body = table[0], table[1:]
    shown = {r[0]: r for r in body}
    for k in order:
        r = shown[labels[k]]
        assert r[head.index("CHAIR_i")] == f"{metrics[k]['CHAIR_i']:.2f}"
        assert r[head.index("recall")] == f"{metrics[k]['recall']:.2f}"
    assert shown["c-vcd"][head.index("verdict")] == fr["verdicts"][1]["verdict"]
    page = _Tables()
    page.feed(page_path.read_text())
    assert page.tables["frontier"] == table
    # frontier.png beside compare.png, and the same picture embedded in the page
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (out / "compare.png").is_file()
    src = page.images["recall against CHAIR_i, with the regular curve"]
    assert base64.b64decode(src.removeprefix("data:image/png;base64,")) == png
    assert [t["test"] for row in saved["runs"] for t in row["tests"].values()] == ["paired bootstrap (CHAIR_s)"] * 5
