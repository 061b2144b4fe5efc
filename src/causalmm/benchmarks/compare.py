"""Compare finished runs of one benchmark: a table with 95% intervals, paired tests against the baselines that
make a gain meaningful, Holm's correction over the many methods tested, and, for CHAIR, the recall–CHAIR_i
frontier against regular decoding at several caption lengths.

**Baselines** (:func:`.baselines.find_baselines`) are read from each run's ``run.json``: *regular greedy* decoding
(``config.method == "regular"``, no sampling, no beams) and *regular sampled* decoding (``do_sample``). Where
several regular runs of a kind are given, the one with the ``max_new_tokens`` most methods use wins, then the
one whose other generation options match theirs, then the first given. Every other run is tested against each
baseline found: McNemar's exact test on per-question right/wrong for yes/no benchmarks (single-seed runs),
otherwise a paired bootstrap of the benchmark's primary metric (CHAIR, VLind-Bench, multi-seed runs). Without
a regular run the first run is the reference, as before.

**Holm**: the p-values of all runs tested against one baseline are one family, adjusted with Holm–Bonferroni
(:func:`.stats.holm`): ten methods tested at 0.05 each would otherwise find a "gain" by chance.

**The CHAIR frontier**: shorter captions name fewer objects, so they hallucinate fewer (CHAIR_i falls) and
recall fewer (recall falls). Regular decoding at several ``max_new_tokens`` traces that trivial trade-off; a
method is worth its cost only if its (CHAIR_i, recall) point lies above that curve.

Only like is compared with like: every run must hold the same samples (the same ids), each asked with the
same prompt about the same image and scored against the same labels, as the records' ``prompt``,
``image_digest`` and ``sample_digest`` say. Otherwise a paired test pairs unrelated questions that share an id,
and a difference between a 10- and a 30-sample run is no difference at all; such runs are refused, naming
the runs and how their data differ. Runs of other generation options (CHAIR at other lengths) hold the same
samples and are compared.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import get_benchmark
from .base import Benchmark, BenchmarkError
from .baselines import (
    BASELINE_TITLES,
    curve_verdict,
    decoding_text,
    find_baselines,
    frontier,
    generation_options,
    search_options,
)
from .compare_render import format_p, plot_frontier, plot_runs, render_table
from .records import load_records
from .run_folder import read_run_info
from .stats import bootstrap_ci, holm, mcnemar, paired_bootstrap, seed_metrics

__all__ = [
    "ALPHA",
    "Run",
    "check_same_samples",
    "compare_runs",
    "curve_verdict",
    "find_baselines",
    "format_p",
    "load_run",
]


@dataclass
class Run:
    """A finished run folder, re-scored with the current metric code."""

    path: Path
    label: str
    info: dict[str, Any]
    bench: Benchmark
    records: list[dict[str, Any]]


def load_run(path: str | Path) -> Run:
    """Read ``run.json`` and ``predictions.jsonl`` of a run folder and re-parse its records."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise BenchmarkError(f"{path} {what}; pass run folders written by `causalmm eval`")
    info = read_run_info(path)
    if info is None:
        raise BenchmarkError(f"{path} is not a run folder (no run.json); pass folders written by `causalmm eval`")
    if not (path / "metrics.json").is_file():
        raise BenchmarkError(f"run {path} is not finished (no metrics.json); rerun the same `causalmm eval` to finish")
    bench = get_benchmark(info["benchmark"], **_init_options(info))
    records = [{**r, **bench.parse(r)} for r in load_records(path / "predictions.jsonl", repair=False).values()]
    if not records:
        raise BenchmarkError(f"run {path} has no predictions")
    return Run(path, path.name, info, bench, records)


def check_same_samples(runs: list[Run]) -> list[str]:
    """Refuse runs whose samples differ from the first run's; returns notes for runs that could only be
    checked by id (made before records carried their prompt and image digests).

    Checked in order, so the message names the coarsest difference: the sample ids, then what each sample
    asks (prompt and image), then what it is scored against (labels and other metadata).
    """
    ref = runs[0]
    mine = _samples_of(ref)
    notes = []
    for run in runs[1:]:
        theirs = _samples_of(run)
        only_ref, only_run = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if only_ref or only_run:
            parts = []
            if only_run:
                parts.append(f"{len(only_run)} only in {run.path} (e.g. id {only_run[0]!r})")
            if only_ref:
                parts.append(f"{len(only_ref)} only in {ref.path} (e.g. id {only_ref[0]!r})")
            raise BenchmarkError(
                f"runs {ref.path} ({len(mine)} samples) and {run.path} ({len(theirs)} samples) cover different "
                f"samples: {'; '.join(parts)}; compare runs made on the same --data and --limit"
            )
        if any(v is None for v in (*mine.values(), *theirs.values())):
            old = [r.path for r, keys in ((ref, mine), (run, theirs)) if any(v is None for v in keys.values())]
            notes.append(f"{old[0]} predates per-sample data digests: only its sample ids were checked.")
            continue
        asked = [k for k in mine if mine[k][:2] != theirs[k][:2]]
        if asked:
            k = asked[0]
            what = f"prompt {mine[k][0]!r} vs {theirs[k][0]!r}" if mine[k][0] != theirs[k][0] else "different images"
            raise BenchmarkError(
                f"runs {ref.path} and {run.path} ask different things under the same ids ({len(asked)} of "
                f"{len(mine)} samples, e.g. id {k!r}: {what}); they were run on different data: compare runs "
                "made on the same --data"
            )
        scored = [k for k in mine if mine[k][2] != theirs[k][2]]
        if scored:
            raise BenchmarkError(
                f"runs {ref.path} and {run.path} score the same questions against different labels or metadata "
                f"({len(scored)} samples, e.g. id {scored[0]!r}); the data was edited between them: rerun "
                "`causalmm eval` into each folder with the current --data to re-score it"
            )
    return list(dict.fromkeys(notes))


def _samples_of(run: Run) -> dict[str, tuple[str, str, str] | None]:
    """id -> (prompt, image digest, sample digest) of a run's records (``None`` where a record lacks them)."""
    out: dict[str, tuple[str, str, str] | None] = {}
    for r in run.records:
        keys = (r.get("prompt"), r.get("image_digest"), r.get("sample_digest"))
        out[str(r["id"])] = None if None in keys else keys  # type: ignore[assignment]
    return out


def _init_options(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (info.get("options") or {}).items() if v is not None}


def _paired(ref: Run, run: Run, n_boot: int) -> dict[str, Any]:
    bench = ref.bench
    one_seed = len({r["seed"] for r in ref.records}) == 1 and len({r["seed"] for r in run.records}) == 1
    if bench.paired_test == "mcnemar" and one_seed:
        a = {r["id"]: bench.correct(r) for r in ref.records}
        b = {r["id"]: bench.correct(r) for r in run.records}
        common = [k for k in a if k in b and a[k] is not None and b[k] is not None]
        res = mcnemar([a[k] for k in common], [b[k] for k in common])
        return {
            "test": "McNemar",
            "p": res["p"],
            "n": len(common),
            "ref_only": res["a_only"],
            "run_only": res["b_only"],
        }
    res = paired_bootstrap(bench, ref.records, run.records, bench.primary, n_boot=n_boot)
    n = len({r["id"] for r in ref.records} & {r["id"] for r in run.records})
    return {"test": f"paired bootstrap ({bench.primary})", "n": n, **res}


#: stamped into compare.json, so a rerun into the same --out can tell its own result from others'
COMPARE_FORMAT = "causalmm-compare/2"

#: the level of the "significant after Holm" mark: an adjusted p at most this is significant
ALPHA = 0.05


def _image_inputs(paths: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """The data and image paths the runs were made from (their run.json), which the HTML page reads back."""
    out: list[tuple[str, str | None]] = []
    for p in paths:
        try:
            info = json.loads((Path(p) / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # load_run names what is wrong with the folder
        if isinstance(info, dict):
            out += [("--data", info.get("data")), ("--images", info.get("images"))]
    return out


def compare_runs(
    paths: list[str | Path],
    out: str | Path | None = None,
    *,
    n_boot: int = 1000,
    plot: bool = True,
    html: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare run folders; writes ``compare.md``, ``compare.json`` (and ``compare.png``, and for CHAIR
    ``frontier.png``) into ``out``, and, given ``html``, one self-contained page with the tables, the charts and
    the samples where the runs disagree (:mod:`.html_report`; ``command`` is the command line it names as its
    origin).

    ``compare.json``: ``references`` (the baselines, each with its Holm family), ``runs`` (each with its
    metrics, intervals and ``tests``: one paired test per baseline it is tested against, raw ``p``, ``p_holm``
    and ``significant``; ``vs_first`` too where the first run is a baseline, as earlier versions wrote it),
    and for CHAIR ``frontier``.
    """
    if len(paths) < 1:
        raise BenchmarkError("give at least one run folder")
    from ..inputs import InputError, check_output_file
    from ..outputs import check_output_file as check_not_overwriting
    from ..outputs import check_results_folder

    sources = [str(Path(p).resolve()) for p in paths]
    inputs = [("run", p) for p in paths]
    try:
        if out is not None:
            check_results_folder(
                out, "--out", main="compare.json", fmt="causalmm-compare/",
                writes=("compare.md", "compare.json", "compare.png", "frontier.png"), inputs=inputs,
                same=lambda earlier: earlier.get("sources") == sources, what="other runs",
            )  # fmt: skip
        if html is not None:
            check_output_file(Path(html), "--html", "report.html")
            check_not_overwriting(Path(html), "--html", inputs + _image_inputs(paths))
    except InputError as err:
        raise BenchmarkError(str(err)) from None
    runs = [load_run(p) for p in paths]
    names = {r.info["benchmark"] for r in runs}
    if len(names) > 1:
        raise BenchmarkError(f"runs of different benchmarks cannot be compared: {', '.join(sorted(names))}")
    notes = check_same_samples(runs)
    labels = _unique_labels(runs)
    ref = runs[0]
    primary = ref.bench.primary
    infos = [r.info for r in runs]
    found = find_baselines(infos)
    references = [
        {"name": kind, "run": labels[b["index"]], "index": b["index"], "title": BASELINE_TITLES[kind], "why": b["why"]}
        for kind, b in found.items()
    ] or [{"name": "first", "run": labels[0], "index": 0, "title": BASELINE_TITLES["first"], "why": "no regular run"}]
    baseline_at = {r["index"] for r in references}
    rows = []
    for i, (run, label, info) in enumerate(zip(runs, labels, infos, strict=True)):
        rows.append(
            {
                "run": label,
                "path": str(run.path),
                "method": (info.get("config") or {}).get("method"),
                "mode": (info.get("config") or {}).get("mode"),
                "decoding": decoding_text(generation_options(info)),
                "max_new_tokens": generation_options(info).get("max_new_tokens"),
                "seeds": sorted({r["seed"] for r in run.records}),
                "n": len({r["id"] for r in run.records}),
                "metrics": seed_metrics(run.bench, run.records),
                "ci95": {k: list(v) for k, v in bootstrap_ci(run.bench, run.records, n_boot=n_boot).items()},
                "baseline_of": [r["name"] for r in references if r["index"] == i],
                "tests": {},
            }
        )
    for reference in references:
        base = runs[reference["index"]]
        tested = [i for i in range(len(runs)) if i not in baseline_at]
        for i in tested:
            test = _paired(base, runs[i], n_boot)
            test["diff"] = rows[i]["metrics"][primary] - rows[reference["index"]]["metrics"][primary]
            rows[i]["tests"][reference["name"]] = test
            if reference["name"] != "first" and search_options(infos[i]) != search_options(infos[reference["index"]]):
                if (infos[i].get("config") or {}).get("method") != "regular":
                    notes.append(
                        f"{labels[i]} ({rows[i]['decoding']}) and the {reference['name']} baseline "
                        f"{reference['run']} ({rows[reference['index']]['decoding']}) differ in more than the "
                        "method: their difference is not the method's alone"
                    )
        family = [rows[i]["tests"][reference["name"]] for i in tested]
        for test, adjusted in zip(family, holm([t["p"] for t in family]), strict=True):
            test["p_holm"] = adjusted
            test["significant"] = adjusted <= ALPHA
        reference["family"] = len(family)
    if references[0]["index"] == 0:
        for row in rows[1:]:  # what earlier versions wrote: the test against the first run (none for the other
            # baseline: the two baselines are not tested against each other)
            if references[0]["name"] in row["tests"]:
                row["vs_first"] = row["tests"][references[0]["name"]]
    result: dict[str, Any] = {
        "format": COMPARE_FORMAT,
        "benchmark": ref.bench.name,
        "primary": primary,
        "metrics": ref.bench.headline_metrics(rows[0]["metrics"]),
        "alpha": ALPHA,
        "references": references,
        "runs": rows,
        "sources": sources,
    }
    if all({"CHAIR_i", "recall"} <= row["metrics"].keys() for row in rows):
        curve_of = found.get("greedy", found.get("sampled", {})).get("index")
        result["frontier"] = frontier(rows, infos, curve_of)
    result["notes"] = list(dict.fromkeys(notes))
    table = render_table(result)
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.md").write_text(table, encoding="utf-8")
            (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            if plot:
                result["plot"] = str(plot_runs(result, out / "compare.png"))
                if "frontier" in result:
                    result["frontier_plot"] = str(plot_frontier(result, out / "frontier.png"))
        except OSError as err:
            raise BenchmarkError(f"cannot write to --out {out} ({err.strerror or err}); pick another folder") from None
    if html is not None:
        _write_html(result, runs, Path(html), plot, command)
    result["table"] = table
    return result


def _write_html(result: dict[str, Any], runs: list[Run], path: Path, plot: bool, command: str | None) -> None:
    import tempfile

    from .html_report import render_html

    png = frontier_png = None
    if plot:
        with tempfile.TemporaryDirectory() as tmp:
            # the files just written into --out, else drawn afresh: the page shows the same pictures
            png = Path(result.get("plot") or plot_runs(result, Path(tmp) / "compare.png")).read_bytes()
            if "frontier" in result:
                drawn = result.get("frontier_plot") or plot_frontier(result, Path(tmp) / "frontier.png")
                frontier_png = Path(drawn).read_bytes()
    page = render_html(result, runs, plot_png=png, frontier_png=frontier_png, command=command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as err:
        raise BenchmarkError(f"cannot write --html {path} ({err.strerror or err}); pick another path") from None
    result["html"] = str(path)


def _unique_labels(runs: list[Run]) -> list[str]:
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{r.path.parent.name}/{r.label}" for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    return labels


# -- tables: one set of cells, which the markdown and the HTML page both print, so they show the same numbers --
