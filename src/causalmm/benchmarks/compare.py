"""Compare finished runs of one benchmark: a table with 95% intervals and paired tests, and a bar chart.

The first run is the reference. Each other run is tested against it: McNemar's exact test on per-question
right/wrong for yes/no benchmarks (single-seed runs), otherwise a paired bootstrap of the benchmark's primary
metric (CHAIR, VLind-Bench, multi-seed runs).

Only like is compared with like: every run must hold the same samples (the same ids), each asked with the
same prompt about the same image and scored against the same labels, as the records' ``prompt``,
``image_digest`` and ``sample_digest`` say. Otherwise a paired test pairs unrelated questions that share an id,
and a difference between a 10- and a 30-sample run is no difference at all; such runs are refused, naming
the runs and how their data differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import get_benchmark
from .base import Benchmark, BenchmarkError
from .records import load_records
from .run_folder import read_run_info
from .stats import bootstrap_ci, mcnemar, paired_bootstrap, seed_metrics

__all__ = ["Run", "check_same_samples", "compare_runs", "load_run"]


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
    return {"test": f"paired bootstrap ({bench.primary})", **res}


#: stamped into compare.json, so a rerun into the same --out can tell its own result from others'
COMPARE_FORMAT = "causalmm-compare/1"


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
    """Compare run folders; writes ``compare.md``, ``compare.json`` (and ``compare.png``) into ``out``, and,
    given ``html``, one self-contained page with the table, the chart and the samples where the runs disagree
    (:mod:`.html_report`; ``command`` is the command line it names as its origin)."""
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
                writes=("compare.md", "compare.json", "compare.png"), inputs=inputs,
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
    rows = []
    for run, label in zip(runs, labels, strict=True):
        metrics = seed_metrics(run.bench, run.records)
        row = {
            "run": label,
            "path": str(run.path),
            "method": (run.info.get("config") or {}).get("method"),
            "mode": (run.info.get("config") or {}).get("mode"),
            "seeds": sorted({r["seed"] for r in run.records}),
            "n": len({r["id"] for r in run.records}),
            "metrics": metrics,
            "ci95": {k: list(v) for k, v in bootstrap_ci(run.bench, run.records, n_boot=n_boot).items()},
        }
        if run is not ref:
            row["vs_first"] = _paired(ref, run, n_boot)
            row["vs_first"]["diff"] = metrics[ref.bench.primary] - rows[0]["metrics"][ref.bench.primary]
        rows.append(row)
    shown = ref.bench.headline_metrics(rows[0]["metrics"])
    result = {
        "format": COMPARE_FORMAT,
        "benchmark": ref.bench.name,
        "primary": ref.bench.primary,
        "metrics": shown,
        "runs": rows,
        "sources": sources,
    }
    result["notes"] = notes
    table = render_table(result)
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.md").write_text(table, encoding="utf-8")
            (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            if plot:
                result["plot"] = str(plot_runs(result, out / "compare.png"))
        except OSError as err:
            raise BenchmarkError(f"cannot write to --out {out} ({err.strerror or err}); pick another folder") from None
    if html is not None:
        _write_html(result, runs, Path(html), plot, command)
    result["table"] = table
    return result


def _write_html(result: dict[str, Any], runs: list[Run], path: Path, plot: bool, command: str | None) -> None:
    import tempfile

    from .html_report import render_html

    png = None
    if plot:
        if result.get("plot"):
            png = Path(result["plot"]).read_bytes()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_runs(result, Path(tmp) / "compare.png").read_bytes()
    page = render_html(result, runs, plot_png=png, command=command)
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


def render_table(result: dict[str, Any]) -> str:
    """Markdown: one row per run, ``value [lo, hi]`` per metric, then the paired test against the first."""
    shown, primary = result["metrics"], result["primary"]
    head = ["run", "method", "n", *shown, f"Δ {primary} vs first", "p (test)"]
    lines = [
        f"# {result['benchmark'].upper()}: comparison (95% bootstrap CIs; paired test vs the first run)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in result["runs"]:
        method = f"{row['method']}" + (f"/{row['mode']}" if row["method"] == "causalmm" else "")
        cells = [row["run"], method, str(row["n"])]
        for m in shown:
            lo, hi = row["ci95"].get(m, (float("nan"), float("nan")))
            cells.append(f"{row['metrics'][m]:.2f} [{lo:.2f}, {hi:.2f}]")
        vs = row.get("vs_first")
        if vs:
            cells += [f"{vs['diff']:+.2f}", f"{vs['p']:.3g} ({vs['test']})"]
        else:
            cells += ["—", "reference"]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("notes"):
        lines += ["", *(f"Note: {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


def plot_runs(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars (one group per metric, one bar per run) with 95% CI error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown, runs = result["metrics"], result["runs"]
    x = np.arange(len(shown))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shown) * max(1, len(runs)) / 2), 4.0), dpi=100)
    for i, row in enumerate(runs):
        vals = np.array([row["metrics"][m] for m in shown])
        lo = np.array([row["ci95"].get(m, (v, v))[0] for m, v in zip(shown, vals, strict=True)])
        hi = np.array([row["ci95"].get(m, (v, v))[1] for m, v in zip(shown, vals, strict=True)])
        err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=row["run"])
    ax.set_xticks(x, shown)
    ax.set_title(f"{result['benchmark'].upper()} (bars: 95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
