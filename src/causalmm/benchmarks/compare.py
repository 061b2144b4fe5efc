"""Compare finished runs of one benchmark: a table with 95% intervals and paired tests, and a bar chart.

The first run is the reference. Each other run is tested against it on the samples both hold: McNemar's
exact test on per-question right/wrong for yes/no benchmarks (single-seed runs), otherwise a paired bootstrap
of the benchmark's primary metric (CHAIR, VLind-Bench, multi-seed runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import get_benchmark
from .base import Benchmark, BenchmarkError
from .runner import load_records
from .stats import bootstrap_ci, mcnemar, paired_bootstrap, seed_metrics

__all__ = ["Run", "compare_runs", "load_run"]


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
    info_path = path / "run.json"
    if not info_path.is_file():
        raise BenchmarkError(f"{path} is not a run folder (no run.json); pass folders written by `causalmm eval`")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if not (path / "metrics.json").is_file():
        raise BenchmarkError(f"run {path} is not finished (no metrics.json); rerun the same `causalmm eval` to finish")
    bench = get_benchmark(info["benchmark"], **_init_options(info))
    records = [{**r, **bench.parse(r)} for r in load_records(path / "predictions.jsonl", repair=False).values()]
    if not records:
        raise BenchmarkError(f"run {path} has no predictions")
    return Run(path, path.name, info, bench, records)


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


def compare_runs(
    paths: list[str | Path], out: str | Path | None = None, *, n_boot: int = 1000, plot: bool = True
) -> dict[str, Any]:
    """Compare run folders; writes ``compare.md``, ``compare.json`` (and ``compare.png``) into ``out``."""
    if len(paths) < 1:
        raise BenchmarkError("give at least one run folder")
    runs = [load_run(p) for p in paths]
    names = {r.info["benchmark"] for r in runs}
    if len(names) > 1:
        raise BenchmarkError(f"runs of different benchmarks cannot be compared: {', '.join(sorted(names))}")
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
    result = {"benchmark": ref.bench.name, "primary": ref.bench.primary, "metrics": shown, "runs": rows}
    table = render_table(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table, encoding="utf-8")
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if plot:
            result["plot"] = str(plot_runs(result, out / "compare.png"))
    result["table"] = table
    return result


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
    if len({row["n"] for row in result["runs"]}) > 1:
        lines += ["", "Note: the runs cover different samples; paired tests use the samples they share."]
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
