"""Run a benchmark into a run folder, resumably, and score it.

Run a benchmark into a run folder, resumably, and score it.

A run folder holds:

* ``run.json`` — what the run is (benchmark and its options, model, decoding config, generation options), a
  digest of its data (``data_digest``) and the native files it wrote (``native_files``). A rerun into the same
  folder must describe the same run, or it is refused, naming what differs.
* ``predictions.jsonl`` — one record per (sample, seed), appended and flushed to disk as each batch
  finishes. A rerun skips what is there; a torn last line (``kill -9`` mid-write) is dropped and redone.
  When the run completes the file is rewritten atomically in (seed, sample) order, so it is the same
  whatever the interruptions and batch sizes were.
* ``metrics.json`` and ``report.md`` — metrics per seed, mean ± std over seeds, 95% bootstrap intervals.
* the benchmark's own formats (MME ``Your_Results``, VLind ``data.json``) for the official scripts.
* ``.causalmm.lock`` — the writer's lock (:mod:`.run_folder`).

Every sample gets its own seed, :func:`causalmm.seeds.sample_seed` of the run seed and its id, so its output
does not depend on the batch it ran in, on the limit, or on how many processes shared the run. Its image-side
draws (the vision branch's counterfactual attention, VCD's noise, the language branch's maps over the image
prefix) are seeded per image instead, :func:`causalmm.seeds.image_seed` of the run seed and a digest of the
image file: the questions about one image then share their counterfactual image features, which
are computed once, and their image prefix, which is prefilled once.

The folder's own files and rules (``run.json``, the writer's lock, where ``--out`` may be) are in
:mod:`.run_folder`; reading predictions back, and tying each record to the sample it answers, in :mod:`.records`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import seeds as streams
from .base import Benchmark, BenchmarkError, Sample
from .records import (
    GENERATED,
    OUTSIDE,
    data_digest,
    image_digest,
    load_done,
    load_records,
    pending,
    sample_digest,
    shard_path,
)
from .run_folder import atomic_write, read_run_info, unwritable, write_run_info
from .stats import bootstrap_ci, seed_metrics

__all__ = ["IMAGE_SEEDS", "finalize", "limit_samples", "render_report", "run_samples"]

#: how image-side draws are seeded (in run.json: a run made another way is not resumed with this one)
IMAGE_SEEDS = (
    "seeds/2: every part hashed whole (BLAKE2b); per image: derive_seed(run_seed, 'image', blake2b of the image "
    "file); seeds the vision branch, VCD's noise and the language branch's draws over the image prefix"
)


#: ``generate(samples, seeds, image_seeds) -> list of dicts with at least "text"`` (one per sample)
GenerateFn = Callable[[Sequence[Sample], Sequence[int], Sequence[int]], list[dict[str, Any]]]


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
    digests: dict[str, str] | None = None,
) -> int:
    """Generate this process's share of the (sample, seed) pairs not done yet; returns how many it generated.

    The pending pairs are dealt round-robin (``pending[rank::world]``), which every process computes alike
    from the same ``done`` set (read by all before any of them writes: pass it in when running several).
    ``digests`` (sample id -> :func:`image_digest`) saves rereading the images when the caller has them.
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
    memo: dict[Any, str] = {}
    try:
        fh = path.open("a", encoding="utf-8")
    except OSError as err:
        raise unwritable(out, err) from None
    with fh, _progress(label, mine_total, mine_done, show) as advance:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [digests[s.id] if digests else image_digest(s, memo) for _, s in chunk]
            sample_seeds = [streams.sample_seed(seed, s.id) for seed, s in chunk]
            image_seeds = [streams.image_seed(seed, d) for (seed, _), d in zip(chunk, images, strict=True)]
            outputs = generate([s for _, s in chunk], sample_seeds, image_seeds)
            for (seed, s), sample_seed, image_seed, image, gen in zip(
                chunk, sample_seeds, image_seeds, images, outputs, strict=True
            ):
                rec = {"id": s.id, "seed": int(seed), "sample_seed": sample_seed, "image_seed": image_seed}
                rec.update({k: v for k, v in s.meta.items() if k not in GENERATED})
                rec.update(gen)
                rec.update(prompt=s.prompt, image_digest=image, sample_digest=sample_digest(s, image))
                rec.update(bench.parse(rec))
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written += len(chunk)
            advance(len(chunk))
    return written


def finalize(
    bench: Benchmark,
    samples: Sequence[Sample],
    out: Path,
    *,
    seeds: Sequence[int],
    info: dict[str, Any],
    n_boot: int = 1000,
    digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the shards, order and rewrite the predictions, score them, write ``metrics.json``, ``report.md``
    and the benchmark's native files.

    Each record gets its sample's current metadata before it is parsed and scored, so a corrected label takes
    effect (prompt and image were checked unchanged by :func:`check_done`). ``digests`` as for
    :func:`run_samples`.
    """
    done = load_done(out)
    memo: dict[Any, str] = {}
    digests = digests or {s.id: image_digest(s, memo) for s in samples}
    ordered = []
    missing = []
    for seed in seeds:
        for s in samples:
            rec = done.get((s.id, int(seed)))
            if rec is None:
                missing.append(s.id)
                continue
            rec = {**rec, **{k: v for k, v in s.meta.items() if k not in GENERATED}}  # current labels
            rec["sample_digest"] = sample_digest(s, digests[s.id])
            rec.update(bench.parse(rec))  # re-parse: records always reflect the current parser and labels
            ordered.append(rec)
    if missing:
        raise BenchmarkError(f"{len(missing)} sample(s) have no prediction yet (e.g. {missing[0]}); rerun to finish")
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    # finished records outside this run (an earlier, larger --limit, or other seeds) are kept, apart
    keep = {(r["id"], r["seed"]) for r in ordered}
    extra = [r for k, r in done.items() if k not in keep]
    if extra:
        atomic_write(out / OUTSIDE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in extra))
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
        "data_digest": data_digest(samples, digests),
        "metrics": seed_metrics(bench, ordered),
        "per_seed": per_seed,
    }
    if len(seeds) > 1:
        import numpy as np

        summary["std"] = {k: float(np.std([m[k] for m in per_seed.values()], ddof=1)) for k in summary["metrics"]}
    if n_boot:
        summary["ci95"] = {k: list(v) for k, v in bootstrap_ci(bench, ordered, n_boot=n_boot).items()}
    summary["native_files"] = _write_native(bench, ordered, out)
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "report.md", render_report(bench, summary))
    return summary


def _write_native(bench: Benchmark, records: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """Write the benchmark's native files into ``out`` without replacing any file this run did not write.

    They are written into a staging folder first; a target that exists and is not among the native files
    this run recorded (``run.json``, or ``metrics.json`` of runs made before ``run.json`` kept them) is
    refused, before anything is moved. The files written are recorded in ``run.json`` first, then moved.
    """
    import shutil

    stage = out / ".causalmm-native"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        written = sorted(str(p.relative_to(stage)) for p in bench.write_native(records, stage) if p.is_file())
        info = read_run_info(out) or {}
        ours = set(info.get("native_files", []))
        try:
            ours |= set(json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("native_files", []))
        except (OSError, ValueError, AttributeError):
            pass
        foreign = [rel for rel in written if (out / rel).exists() and rel not in ours]
        if foreign:
            raise BenchmarkError(
                f"{out / foreign[0]} exists and was not written by this run; the run would replace it with its "
                f"{bench.name} predictions: move it away (or pick another --out) and rerun to finish"
            )
        if (out / "run.json").exists():  # finalize runs in a run folder; a bare call records nothing
            write_run_info(out, {**info, "native_files": sorted(ours | set(written))})
        for rel in written:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
    except OSError as err:
        raise unwritable(out, err) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


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
