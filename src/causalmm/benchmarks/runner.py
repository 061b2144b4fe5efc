"""Run a benchmark into a run folder, resumably, and score it.

A run folder holds:

* ``run.json`` — what the run is (benchmark and its options, model, decoding config, generation options).
  A rerun into the same folder must describe the same run, or it is refused, naming what differs.
* ``predictions.jsonl`` — one record per (sample, seed), appended and flushed to disk as each batch
  finishes. A rerun skips what is there; a torn last line (``kill -9`` mid-write) is dropped and redone.
  When the run completes the file is rewritten atomically in (seed, sample) order, so it is the same
  whatever the interruptions and batch sizes were.
* ``metrics.json`` and ``report.md`` — metrics per seed, mean ± std over seeds, 95% bootstrap intervals.
* the benchmark's own formats (MME ``Your_Results``, VLind ``data.json``) for the official scripts.

Every sample gets its own seed, ``derive_seed(run_seed, sample_id)``, so its output does not depend on the
batch it ran in, on the limit, or on how many processes shared the run. Its image-side draws (the vision
branch's counterfactual attention, VCD's noise) are seeded per image instead, ``derive_seed(run_seed, "image",
digest of the image)``: the questions about one image then share their counterfactual image features, which
are computed once, and their image prefix, which is prefilled once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..decoding import derive_seed
from .base import Benchmark, BenchmarkError, Sample
from .stats import bootstrap_ci, seed_metrics

__all__ = [
    "IMAGE_SEEDS",
    "RunMismatchError",
    "check_run_info",
    "finalize",
    "image_digest",
    "limit_samples",
    "load_done",
    "load_records",
    "pending",
    "run_samples",
    "shard_path",
    "write_run_info",
]

#: run.json fields that must agree between a run and its resumption
IDENTITY = ("benchmark", "options", "model", "config", "generation", "image_seeds")
#: how image-side draws are seeded (in run.json: a run made another way is not resumed with this one)
IMAGE_SEEDS = (
    "per image: derive_seed(run_seed, 'image', blake2b of the image file); seeds the vision branch, VCD's noise "
    "and the language branch's draws over the image prefix"
)

#: finished records that are not part of the current run (kept, so a later larger run reuses them)
OUTSIDE = "predictions.outside-run.jsonl"

#: ``generate(samples, seeds, image_seeds) -> list of dicts with at least "text"`` (one per sample)
GenerateFn = Callable[[Sequence[Sample], Sequence[int], Sequence[int]], list[dict[str, Any]]]


class RunMismatchError(BenchmarkError):
    """A rerun into an existing run folder describes a different run."""


def limit_samples(bench: Benchmark, samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples, extended to the end of the last unit (MME keeps both questions)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise BenchmarkError(f"--limit must be at least 1, got {limit}")
    end = limit
    last = bench.unit({"id": samples[end - 1].id, **samples[end - 1].meta})
    while end < len(samples) and bench.unit({"id": samples[end].id, **samples[end].meta}) == last:
        end += 1
    return samples[:end]


def check_run_info(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The run.json to write: ``info``, merged with an existing run.json that must describe the same run."""
    path = out / "run.json"
    if not path.exists():
        return info
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path} is corrupt ({err.msg}); delete the run folder or pick another --out") from err
    diff = [k for k in IDENTITY if _canon(old.get(k)) != _canon(info.get(k))]
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {info.get(k)!r}" for k in diff[:2])
        raise RunMismatchError(
            f"{out} holds a different run ({', '.join(diff)} differ: {detail}); "
            "rerun with the same settings to resume, or pick another --out"
        )
    seeds = list(dict.fromkeys([*old.get("seeds", []), *info.get("seeds", [])]))
    return {**old, **info, "seeds": seeds}


def write_run_info(out: Path, info: dict[str, Any]) -> None:
    """Write ``out/run.json`` (``info`` as returned by :func:`check_run_info`)."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def load_records(path: Path, *, repair: bool = True) -> dict[tuple[str, int], dict[str, Any]]:
    """Records of a predictions file keyed by (id, seed); a torn last line is cut off (when ``repair``)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    records: dict[tuple[str, int], dict[str, Any]] = {}
    good_end = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            if not last:
                good_end += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if last:  # no newline after it: the write may have been cut just after a valid prefix
                raise ValueError
        except ValueError:
            if last:
                break
            raise BenchmarkError(
                f"{path}: line {i + 1} is not valid JSON; the file was edited or corrupted "
                "(fix or delete that line to resume)"
            ) from None
        records.setdefault((str(rec["id"]), int(rec["seed"])), rec)
        good_end += len(line) + 1
    if repair and good_end < len(raw):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return records


def shard_path(out: Path, rank: int = 0, world: int = 1) -> Path:
    """Where process ``rank`` of ``world`` appends: ``predictions.jsonl`` alone, ``predictions.part{rank}.jsonl``
    when several processes share the run."""
    return out / ("predictions.jsonl" if world == 1 else f"predictions.part{rank}.jsonl")


def shard_files(out: Path) -> list[Path]:
    """Every predictions file of a run folder: the merged one first, then the per-process shards."""
    parts = sorted(out.glob("predictions.part*.jsonl"), key=lambda p: p.name)
    fixed = [out / "predictions.jsonl", out / OUTSIDE]
    return [p for p in fixed if p.exists()] + parts


def load_done(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished records of all files of a run folder (read-only: torn last lines are skipped, not cut)."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for path in shard_files(out):
        for key, rec in load_records(path, repair=False).items():
            done.setdefault(key, rec)
    return done


def pending(
    samples: Sequence[Sample], seeds: Sequence[int], done: dict[tuple[str, int], Any], out: Path
) -> list[tuple[int, Sample]]:
    """(seed, sample) pairs not yet done, in run order; refuses a folder whose samples are all foreign."""
    ids = {s.id for s in samples}
    stray = [k for k in done if k[0] not in ids]
    if stray and len(stray) == len(done):
        raise RunMismatchError(
            f"{out}: none of its predictions are for samples in the data given now (e.g. id {stray[0][0]!r}); "
            "is --data the same as when the run started?"
        )
    return [(int(seed), s) for seed in seeds for s in samples if (s.id, int(seed)) not in done]


def run_samples(
    bench: Benchmark,
    samples: Sequence[Sample],
    out: Path,
    generate: GenerateFn,
    *,
    seeds: Sequence[int],
    batch_size: int = 1,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    done: dict[tuple[str, int], Any] | None = None,
) -> int:
    """Generate this process's share of the (sample, seed) pairs not done yet; returns how many it generated.

    The pending pairs are dealt round-robin (``pending[rank::world]``), which every process computes alike
    from the same ``done`` set (read by all before any of them writes: pass it in when running several).
    """
    if batch_size < 1:
        raise BenchmarkError(f"--batch-size must be at least 1, got {batch_size}")
    done = load_done(out) if done is None else done
    todo_all = pending(samples, seeds, done, out)
    todo = todo_all[rank::world]
    path = shard_path(out, rank, world)
    load_records(path, repair=True)  # cut a torn last line of our own shard before appending
    if not todo:
        return 0
    total = len(seeds) * len(samples)
    label = bench.name if world == 1 else f"{bench.name} [{rank + 1}/{world}]"
    show = progress and rank == 0
    # process 0's bar counts its own share; the others run silently
    mine_total = total if world == 1 else len(todo)
    mine_done = total - len(todo_all) if world == 1 else 0
    written = 0
    digests: dict[Any, str] = {}
    with path.open("a", encoding="utf-8") as fh, _progress(label, mine_total, mine_done, show) as advance:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            sample_seeds = [derive_seed(seed, s.id) for seed, s in chunk]
            image_seeds = [derive_seed(seed, "image", image_digest(s, digests)) for seed, s in chunk]
            outputs = generate([s for _, s in chunk], sample_seeds, image_seeds)
            for (seed, s), sample_seed, image_seed, gen in zip(chunk, sample_seeds, image_seeds, outputs, strict=True):
                rec = {"id": s.id, "seed": int(seed), "sample_seed": sample_seed, "image_seed": image_seed}
                rec.update({**s.meta, **gen})
                rec.update(bench.parse(rec))
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written += len(chunk)
            advance(len(chunk))
    return written


def image_digest(sample: Sample, memo: dict[Any, str] | None = None) -> str:
    """A digest of a sample's image file (or encoded bytes): equal images get equal image seeds, wherever the
    files lie. ``memo`` caches it per path."""
    image = sample.image
    if image is None:
        return "no image"
    key = image if isinstance(image, bytes) else str(image)
    if memo is not None and key in memo:
        return memo[key]
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if memo is not None and not isinstance(image, bytes):
        memo[key] = digest
    return digest


def finalize(
    bench: Benchmark,
    samples: Sequence[Sample],
    out: Path,
    *,
    seeds: Sequence[int],
    info: dict[str, Any],
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Merge the shards, order and rewrite the predictions, score them, write ``metrics.json``, ``report.md``
    and the benchmark's native files."""
    done = load_done(out)
    ordered = []
    missing = []
    for seed in seeds:
        for s in samples:
            rec = done.get((s.id, int(seed)))
            if rec is None:
                missing.append(s.id)
                continue
            rec = {**rec, **bench.parse(rec)}  # re-parse: records always reflect the current parser
            ordered.append(rec)
    if missing:
        raise BenchmarkError(f"{len(missing)} sample(s) have no prediction yet (e.g. {missing[0]}); rerun to finish")
    _atomic_write(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    # finished records outside this run (an earlier, larger --limit, or other seeds) are kept, apart
    keep = {(r["id"], r["seed"]) for r in ordered}
    extra = [r for k, r in done.items() if k not in keep]
    if extra:
        _atomic_write(out / OUTSIDE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in extra))
    elif (out / OUTSIDE).exists():
        (out / OUTSIDE).unlink()
    for path in out.glob("predictions.part*.jsonl"):
        path.unlink()
    per_seed = {}
    for seed in seeds:
        per_seed[str(seed)] = bench.metrics([r for r in ordered if r["seed"] == int(seed)])
    summary: dict[str, Any] = {
        "benchmark": bench.name,
        "options": bench.describe(),
        "model": info.get("model"),
        "method": (info.get("config") or {}).get("method"),
        "config": info.get("config"),
        "generation": info.get("generation"),
        "seeds": [int(s) for s in seeds],
        "n_samples": len(samples),
        "metrics": seed_metrics(bench, ordered),
        "per_seed": per_seed,
    }
    if len(seeds) > 1:
        import numpy as np

        summary["std"] = {k: float(np.std([m[k] for m in per_seed.values()], ddof=1)) for k in summary["metrics"]}
    if n_boot:
        summary["ci95"] = {k: list(v) for k, v in bootstrap_ci(bench, ordered, n_boot=n_boot).items()}
    summary["native_files"] = [str(p.relative_to(out)) for p in bench.write_native(ordered, out)]
    _atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    _atomic_write(out / "report.md", render_report(bench, summary))
    return summary


def render_report(bench: Benchmark, summary: dict[str, Any]) -> str:
    """A markdown report of one run: settings, then a metric table with intervals (and std over seeds)."""
    m, ci, std = summary["metrics"], summary.get("ci95", {}), summary.get("std")
    cfg = summary.get("config") or {}
    lines = [
        f"# {bench.name.upper()} — {summary.get('method')} on {summary.get('model')}",
        "",
        f"- samples: {summary['n_samples']}, seeds: {', '.join(map(str, summary['seeds']))}",
        f"- options: `{json.dumps(summary.get('options'), sort_keys=True)}`",
        f"- config: `{json.dumps(cfg, sort_keys=True)}`",
        f"- generation: `{json.dumps(summary.get('generation'), sort_keys=True)}`",
        "",
        "| metric | value | 95% CI |" + (" std over seeds |" if std else ""),
        "|---|---|---|" + ("---|" if std else ""),
    ]
    shown = [k for k in m if k not in ("n",)]
    for k in shown:
        lo_hi = ci.get(k)
        row = f"| {k} | {m[k]:.2f} | " + (f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "") + " |"
        if std:
            row += f" {std[k]:.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


@contextmanager
def _progress(name: str, total: int, completed: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (done/total, samples per second, elapsed, ETA); yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as prog:
        task = prog.add_task(name, total=total, completed=completed, rate="")

        def advance(n: int) -> None:
            prog.advance(task, n)
            speed = prog.tasks[0].speed
            prog.update(task, rate=f"{speed:.2f} samples/s" if speed else "")

        yield advance


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
