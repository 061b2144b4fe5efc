"""The tables and charts of a comparison, drawn from the result :func:`~.compare.compare_runs` computes: the
markdown (``compare.md``), the PNG charts, and the cells the HTML page (:mod:`.html_report`) prints, so that every
output shows the same numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "FRONTIER_TEXT", "format_p", "frontier_table", "method_text", "plot_frontier", "plot_runs", "reference_text",
    "render_table", "runs_table", "tests_table",
]  # fmt: skip


def method_text(row: dict[str, Any]) -> str:
    """A run's method as the tables name it (CausalMM with its mode)."""
    return f"{row['method']}" + (f"/{row['mode']}" if row["method"] == "causalmm" else "")


def format_p(p: float) -> str:
    """A p-value as the tables print it (three significant digits)."""
    return f"{p:.3g}"


def runs_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one row per run, ``value [lo, hi]`` per metric, its role."""
    shown = result["metrics"]
    head = ["run", "method", "n", "decoding", *shown, "baseline"]
    rows = []
    for row in result["runs"]:
        cells = [row["run"], method_text(row), str(row["n"]), row["decoding"]]
        for m in shown:
            lo, hi = row["ci95"].get(m, (float("nan"), float("nan")))
            cells.append(f"{row['metrics'][m]:.2f} [{lo:.2f}, {hi:.2f}]")
        roles = [("reference" if name == "first" else f"{name} baseline") for name in row["baseline_of"]]
        cells.append(", ".join(roles) or "—")
        rows.append(cells)
    return head, rows


def tests_table(result: dict[str, Any], reference: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the paired tests of every run against ``reference`` (one of
    ``result["references"]``): the difference, the test, its evidence, raw and Holm-adjusted p."""
    head = [
        "run",
        f"Δ {result['primary']} (run − baseline)",
        "test",
        "n",
        "evidence",
        "p",
        "p (Holm)",
        f"significant at {result['alpha']} (Holm)",
    ]
    rows = []
    for row in result["runs"]:
        test = row["tests"].get(reference["name"])
        if test is None:
            continue
        if "ref_only" in test:
            evidence = f"only baseline right: {int(test['ref_only'])}, only run right: {int(test['run_only'])}"
        else:
            evidence = f"Δ 95% CI [{test['lo']:+.2f}, {test['hi']:+.2f}]"
        rows.append(
            [
                row["run"],
                f"{test['diff']:+.2f}",
                test["test"],
                str(test["n"]),
                evidence,
                format_p(test["p"]),
                format_p(test["p_holm"]),
                "yes" if test["significant"] else "no",
            ]
        )
    return head, rows


def frontier_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the CHAIR frontier: the regular curve's points, then every other run with the
    curve's recall at its CHAIR_i and its verdict."""
    fr = result["frontier"]
    head = ["run", "method", "max_new_tokens", "CHAIR_i", "recall", "curve's recall at its CHAIR_i", "margin",
            "verdict", "dominated by"]  # fmt: skip
    method = {p["label"]: p["method"] for p in fr["points"]}
    rows = [
        [
            c["label"],
            method[c["label"]],
            str(c["max_new_tokens"]),
            f"{c['chair_i']:.2f}",
            f"{c['recall']:.2f}",
            "—",
            "—",
            "regular curve",
            "—",
        ]  # fmt: skip
        for c in fr["curve"]
    ]
    length = {p["label"]: p["max_new_tokens"] for p in fr["points"]}
    for v in fr["verdicts"]:
        at = "—" if v["recall_at"] is None else f"{v['recall_at']:.2f}"
        margin = "—" if v["margin"] is None else f"{v['margin']:+.2f}"
        rows.append(
            [
                v["label"],
                method[v["label"]],
                str(length[v["label"]]),
                f"{v['chair_i']:.2f}",
                f"{v['recall']:.2f}",
                at,
                margin,
                v["verdict"],
                ", ".join(v["dominated_by"]) or "—",
            ]  # fmt: skip
        )
    return head, rows


def reference_text(reference: dict[str, Any]) -> str:
    """One line on a baseline: which run, why it, and its Holm family."""
    return (
        f"Baseline {reference['run']} ({reference['why']}); {reference['family']} run(s) tested against it form "
        "one family, Holm–Bonferroni adjusted."
    )


#: what the frontier section says above its table
FRONTIER_TEXT = (
    "Regular decoding at several max_new_tokens is the trivial curve: shorter captions name fewer objects, so "
    "they hallucinate fewer (lower CHAIR_i) and recall fewer. A run above the curve recalls more objects than "
    "regular decoding at the same CHAIR_i (interpolated between the nearest regular points); one on or below it "
    "does no better than shortening captions. Outside: beyond the curve's CHAIR_i range, not judged."
)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def render_table(result: dict[str, Any]) -> str:
    """Markdown: the runs with their intervals, one section of paired tests per baseline, the CHAIR frontier."""
    refs = " and ".join(f"{r['title']} ({r['run']})" for r in result["references"])
    lines = [
        f"# {result['benchmark'].upper()}: comparison (95% bootstrap CIs; paired tests against {refs}, Holm-adjusted)",
        "",
        *_md_table(*runs_table(result)),
    ]
    for reference in result["references"]:
        lines += ["", f"## Paired tests against {reference['title']} ({reference['run']})", ""]
        lines.append(reference_text(reference))
        head, rows = tests_table(result, reference)
        lines += ["", *_md_table(head, rows)] if rows else ["", "No other run to test."]
    if "frontier" in result:
        fr = result["frontier"]
        lines += ["", "## CHAIR: recall against CHAIR_i (the frontier)", "", FRONTIER_TEXT, ""]
        lines += _md_table(*frontier_table(result))
        if fr["notes"]:
            lines += ["", *(f"Note: {note}" for note in fr["notes"])]
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


def _legend(verdict: dict[str, Any]) -> str:
    dominated = verdict["dominated_by"]
    return f"{verdict['label']}: {verdict['verdict']}" + (
        f" (dominated by {', '.join(dominated)})" if dominated else ""
    )


def plot_frontier(result: dict[str, Any], path: Path) -> Path:
    """CHAIR's recall against CHAIR_i, saved as PNG: the regular curve (its points labelled by max_new_tokens)
    and every other run with its 95% intervals on both axes, its verdict in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = result["frontier"]
    ci = {row["run"]: row["ci95"] for row in result["runs"]}
    fig, ax = plt.subplots(figsize=(7.0, 5.0), dpi=100)
    if fr["curve"]:
        xs, ys = [c["chair_i"] for c in fr["curve"]], [c["recall"] for c in fr["curve"]]
        ax.plot(xs, ys, "-o", color="0.45", label=f"regular ({fr['curve_decoding']}), by max_new_tokens", zorder=2)
        for k, c in enumerate(fr["curve"]):  # alternate sides: neighbouring lengths often nearly coincide
            ax.annotate(str(c["max_new_tokens"]), (c["chair_i"], c["recall"]), textcoords="offset points",
                        xytext=(6, -12 if k % 2 else 5), fontsize=8, color="0.3")  # fmt: skip
    markers = "sD^vP*Xhp<>"
    for k, v in enumerate(fr["verdicts"]):
        x, y, bounds = v["chair_i"], v["recall"], ci.get(v["label"], {})
        xlo, xhi = bounds.get("CHAIR_i", (x, x))
        ylo, yhi = bounds.get("recall", (y, y))
        xerr = [[max(0.0, x - xlo)], [max(0.0, xhi - x)]]
        yerr = [[max(0.0, y - ylo)], [max(0.0, yhi - y)]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=markers[k % len(markers)], capsize=3,
                    label=_legend(v), zorder=3)  # fmt: skip
    ax.set_xlabel("CHAIR_i (%), lower is better")
    ax.set_ylabel("object recall (%), higher is better")
    ax.set_title("CHAIR: recall against CHAIR_i (up and left is better; bars: 95% bootstrap CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
