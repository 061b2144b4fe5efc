"""``score``: metrics of predictions made by other code bases, read in each benchmark's own format and scored by
the runners' metric code, into a results folder that never replaces a result ``score`` did not write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import check_data_path, get_benchmark
from .base import BenchmarkError
from .stats import bootstrap_ci

__all__ = ["SCORE_FORMAT", "score_predictions"]

#: stamped into the metrics.json ``causalmm score`` writes, so a rerun can tell its own result from others'
SCORE_FORMAT = "causalmm-score/1"


def score_predictions(
    benchmark: str,
    predictions: str | Path,
    *,
    data: str | Path | None = None,
    annotations: str | Path | None = None,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Metrics of predictions made elsewhere, read in the benchmark's own format, by the runners' metric code."""
    bench = get_benchmark(benchmark, **(options or {}))
    path = Path(predictions)
    if not path.exists():
        raise BenchmarkError(f"predictions not found: {path}")
    if data is not None:
        check_data_path(data)
    if out is not None:
        from ..outputs import OutputError, check_results_folder

        source = str(path.resolve())
        try:
            check_results_folder(
                out, "--out", main="metrics.json", fmt=SCORE_FORMAT.split("/")[0] + "/", writes=("metrics.json",),
                inputs=[("predictions", path), ("--data", data), ("--annotations", annotations)],
                same=lambda earlier: earlier.get("source") == source and earlier.get("benchmark") == bench.name,
                what="other predictions",
            )  # fmt: skip
        except OutputError as err:
            raise BenchmarkError(str(err)) from None
    records = bench.read_predictions(path, Path(data) if data else None, Path(annotations) if annotations else None)
    if not records:
        raise BenchmarkError(f"{path}: no predictions")
    records = [{"seed": 0, **r} for r in records]
    records = [{**r, **bench.parse(r)} for r in records]
    summary: dict[str, Any] = {
        "format": SCORE_FORMAT,
        "benchmark": bench.name,
        "options": bench.describe(),
        "predictions": str(path),
        "source": str(path.resolve()),
        "data": str(data) if data else None,
        "n_records": len(records),
        "metrics": bench.metrics(records),
    }
    if n_boot:
        summary["ci95"] = {k: list(v) for k, v in bootstrap_ci(bench, records, n_boot=n_boot).items()}
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as err:
            raise BenchmarkError(
                f"cannot write {out / 'metrics.json'} ({err.strerror or err}); pick another --out"
            ) from None
    return summary
