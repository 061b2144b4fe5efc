"""Is a difference real? Bootstrap confidence intervals and paired tests over benchmark records.

Resampling is by *unit* (``Benchmark.unit``: a question, or MME's image pair, or a VLind instance), so
dependent records stay together. With several seeds, a resample keeps every seed's records of the drawn
units and the metric is the mean over seeds, as the point estimate is.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .base import Benchmark, UnparseableWarning

__all__ = ["bootstrap_ci", "holm", "mcnemar", "paired_bootstrap", "seed_metrics"]


def seed_metrics(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Metrics averaged over the seeds present in ``records`` (one seed: its metrics)."""
    by_seed: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_seed[r.get("seed")].append(r)
    per = [bench.metrics(rs) for rs in by_seed.values()]
    keys = [k for k in per[0] if all(k in m for m in per)]
    return {k: float(np.mean([m[k] for m in per])) for k in keys}


def _groups(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[bench.unit(r)].append(r)
    # records of a unit in (seed, record) order, so per-unit structure (MME's pairs) stays intact per seed
    return {u: sorted(rs, key=lambda r: str(r.get("seed"))) for u, rs in groups.items()}


@contextmanager
def _resampling() -> Iterator[None]:
    """Silence :class:`UnparseableWarning` while resampling: the records were scored (and warned about) once
    already, and a thousand resamples would repeat the warning a thousand times with shifting counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnparseableWarning)
        yield


def bootstrap_ci(
    bench: Benchmark,
    records: Sequence[dict[str, Any]],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric, resampling units with replacement."""
    groups = list(_groups(bench, records).values())
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    with _resampling():
        for _ in range(n_boot):
            idx = rng.integers(0, len(groups), len(groups))
            sample = [r for i in idx for r in groups[i]]
            for k, v in seed_metrics(bench, sample).items():
                draws[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items()}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact (binomial) two-sided McNemar test on paired right/wrong outcomes.

    Returns the discordant counts ``a_only`` (a right, b wrong) and ``b_only``, and ``p``.
    """
    if len(a) != len(b):
        raise ValueError("McNemar needs paired outcomes of equal length")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0.0, "b_only": 0.0, "p": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": float(a_only), "b_only": float(b_only), "p": min(1.0, 2 * tail)}


def paired_bootstrap(
    bench: Benchmark,
    base: Sequence[dict[str, Any]],
    other: Sequence[dict[str, Any]],
    metric: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(other) - metric(base)`` over the units both runs share.

    Returns the observed difference ``diff``, its 95% interval and a two-sided ``p`` (twice the smaller
    share of resampled differences on either side of zero).
    """
    ga, gb = _groups(bench, base), _groups(bench, other)
    units = [u for u in ga if u in gb]
    if not units:
        raise ValueError("the two runs share no samples")
    rng = np.random.default_rng(seed)
    observed = (
        seed_metrics(bench, [r for u in units for r in gb[u]])[metric]
        - seed_metrics(bench, [r for u in units for r in ga[u]])[metric]
    )
    diffs = []
    with _resampling():
        for _ in range(n_boot):
            idx = rng.integers(0, len(units), len(units))
            pick = [units[i] for i in idx]
            ma = seed_metrics(bench, [r for u in pick for r in ga[u]])[metric]
            mb = seed_metrics(bench, [r for u in pick for r in gb[u]])[metric]
            diffs.append(mb - ma)
    d = np.asarray(diffs)
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"diff": observed, "lo": float(np.percentile(d, 2.5)), "hi": float(np.percentile(d, 97.5)), "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    Comparing many methods against one baseline at 0.05 each finds "significant" gains by chance: with ten
    independent tests of methods that change nothing, at least one passes with probability 1 - 0.95**10,
    about 40%. Holm's step-down adjustment keeps that family-wise error at the level asked (an adjusted p at
    most 0.05 is significant at 0.05 for the whole family) under any dependence between the tests, and
    rejects at least as much as plain Bonferroni. Sorted ascending, the i-th smallest of m p-values (i from 1)
    becomes ``p * (m - i + 1)``, capped at 1, and a running maximum keeps the adjusted values in the order of
    the raw ones. Tied raw p-values get the same adjusted value.

    Raises ValueError for a p-value outside [0, 1] (NaN included): a broken test must not pass silently.
    """
    ps = [float(p) for p in pvalues]
    bad = [p for p in ps if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"p-values must lie in [0, 1], got {bad[0]!r}")
    m = len(ps)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):  # stable: ties keep their order
        running = max(running, min(1.0, ps[i] * (m - rank)))
        adjusted[i] = running
    return adjusted
