"""Run a benchmark into a run folder, resumably, and score it.

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
* ``.causalmm.lock`` — the writer's lock (below).

Every sample gets its own seed, ``derive_seed(run_seed, sample_id)``, so its output does not depend on the
batch it ran in, on the limit, or on how many processes shared the run. Its image-side draws (the vision
branch's counterfactual attention, VCD's noise) are seeded per image instead, ``derive_seed(run_seed, "image",
digest of the image)``: the questions about one image then share their counterfactual image features, which
are computed once, and their image prefix, which is prefilled once.

**The data is part of a run's identity.** Ids alone do not say what a prediction answers: another question
file can reuse them, and a fixed label file keeps them. So every record carries what it was generated from —
the ``prompt`` and the ``image_digest`` — and a ``sample_digest`` of everything about its sample (id, prompt,
image, and the metadata scoring reads, such as the label); ``run.json`` holds ``data_digest``, one digest of
the run's whole sample set. On resume:

* a finished record whose prompt or image differs from the sample of that id now is never reused: the run is
  refused (:class:`RunMismatchError`), naming the sample, since the folder then mixes two data sets;
* a record whose prompt and image are unchanged but whose label (or other metadata) changed is kept and
  re-scored: labels do not influence generation, so the text stands, and :func:`finalize` merges the current
  metadata into every record before parsing and scoring it. Fixing a label file and rerunning is the way to
  re-score a finished run.

**One writer per run folder.** :func:`lock_run_folder` takes an OS lock (``fcntl.flock``) on
``.causalmm.lock`` and writes the holder's pid and host into it; a second writer is refused with that pid.
The kernel drops the lock when the holder's process dies, ``kill -9`` included, so a lock never goes stale.
Under several processes the lock is held once for all of them: ``causalmm eval --num-processes N`` holds it
in the launcher, which names it in ``CAUSALMM_RUN_LOCK`` for its workers (and passes its descriptor on to
accelerate's launcher, so the lock lives as long as the run); under a user's ``accelerate launch`` the main
process takes it and the others wait for it at a barrier before reading or writing anything.

**A run never overwrites what it did not write.** ``--out`` may not contain, equal or lie inside the data,
image or annotation paths (:func:`check_out_folder`); a new run needs a new or empty folder; and native files
are written beside the run's own only where the run wrote them before (``native_files`` in ``run.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..seeds import derive_seed
from .base import Benchmark, BenchmarkError, Sample
from .stats import bootstrap_ci, seed_metrics

__all__ = [
    "IMAGE_SEEDS",
    "LOCK_ENV",
    "LOCK_NAME",
    "RunLockedError",
    "RunMismatchError",
    "check_done",
    "check_out_folder",
    "check_run_info",
    "data_digest",
    "finalize",
    "image_digest",
    "limit_samples",
    "load_done",
    "load_records",
    "lock_run_folder",
    "pending",
    "read_run_info",
    "run_samples",
    "sample_digest",
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
#: the writer's lock file inside a run folder (holds "pid host" of the holder)
LOCK_NAME = ".causalmm.lock"
#: set by ``causalmm eval --num-processes`` for its workers: the lock file their launcher holds for them
LOCK_ENV = "CAUSALMM_RUN_LOCK"
#: record fields the generator writes; a sample's metadata never overrides them
GENERATED = frozenset({"id", "seed", "sample_seed", "image_seed", "prompt", "image_digest", "sample_digest", "text",
                       "finish_reason", "n_tokens"})  # fmt: skip

#: ``generate(samples, seeds, image_seeds) -> list of dicts with at least "text"`` (one per sample)
GenerateFn = Callable[[Sequence[Sample], Sequence[int], Sequence[int]], list[dict[str, Any]]]


class RunMismatchError(BenchmarkError):
    """A rerun into an existing run folder describes a different run."""


class RunLockedError(BenchmarkError):
    """Another process is writing into the run folder."""


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


def read_run_info(out: Path) -> dict[str, Any] | None:
    """``out/run.json`` as a dict, ``None`` where there is none; one line for an unreadable or corrupt file."""
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} at line {err.lineno}"
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except OSError as err:
        raise BenchmarkError(f"cannot read {path} ({err.strerror or err}); check its permissions") from None
    else:
        if isinstance(info, dict) and isinstance(info.get("benchmark"), str):
            return info
        reason = "not a run description (no benchmark field)"
    raise BenchmarkError(
        f"{path} is corrupt ({reason}); causalmm cannot tell what run this folder holds: "
        "pick another --out (or move this folder away)"
    )


def check_run_info(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The run.json to write: ``info``, merged with an existing run.json that must describe the same run."""
    old = read_run_info(out)
    if old is None:
        return info
    diff = [k for k in IDENTITY if _canon(old.get(k)) != _canon(info.get(k))]
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {info.get(k)!r}" for k in diff[:2])
        raise RunMismatchError(
            f"{out} holds a different run ({', '.join(diff)} differ: {detail}); "
            "rerun with the same settings to resume, or pick another --out"
        )
    seeds = list(dict.fromkeys([*old.get("seeds", []), *info.get("seeds", [])]))
    natives = list(dict.fromkeys([*old.get("native_files", []), *info.get("native_files", [])]))
    return {**old, **info, "seeds": seeds, "native_files": natives}


def write_run_info(out: Path, info: dict[str, Any]) -> None:
    """Write ``out/run.json`` (``info`` as returned by :func:`check_run_info`)."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def check_out_folder(out: Path, inputs: Sequence[str | Path | None], images: Sequence[str | Path] = ()) -> None:
    """Refuse an ``--out`` where the run's files could land on its inputs, before anything is written.

    ``inputs`` are the data, image and annotation paths as given (missing ones and hub ids are skipped);
    ``images`` the samples' image files, which catch image folders a loader finds on its own (VLind's
    ``images/`` beside ``data.json``). An input inside ``--out`` (or equal to it) could be overwritten by the
    run's files (VLind's ``data.json``, MME's ``Your_Results``); ``--out`` inside an input folder would mix
    run files into the data. An existing ``--out`` must be a folder, and a run folder (with ``run.json``) or
    empty: a run only ever replaces files it wrote.
    """
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"--out {out} is a file; give a folder (the run writes run.json, predictions, metrics)")
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        path = Path(given).resolve()
        if path == target or target in path.parents:
            raise BenchmarkError(
                f"--out {out} holds the input {given}: the run's files could overwrite it; pick a separate folder "
                "for --out"
            )
        if path.is_dir() and path in target.parents:
            raise BenchmarkError(
                f"--out {out} lies inside the input folder {given}: the run would write into its data; pick a "
                "folder outside it for --out"
            )
    for parent in dict.fromkeys(Path(p).parent for p in images):
        where = parent.resolve()
        if where == target or target in where.parents:
            raise BenchmarkError(
                f"--out {out} holds the benchmark's images ({parent}): the run's files could overwrite them; pick "
                "a separate folder for --out"
            )
    if out.is_dir() and not (out / "run.json").exists():
        foreign = sorted(
            p.name for p in out.iterdir() if not p.name.startswith(".causalmm") and p.name != "run.json.tmp"
        )
        if foreign:
            raise BenchmarkError(
                f"--out {out} is not empty and is not a run folder (no run.json; it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): a run never overwrites files it did not write; "
                "pick a new or empty folder"
            )


@contextmanager
def lock_run_folder(out: Path) -> Iterator[int | None]:
    """Hold the run folder's writer lock; yields its file descriptor (``None`` when a launcher holds it for us).

    ``fcntl.flock`` on ``out/.causalmm.lock``, non-blocking: a second writer gets :class:`RunLockedError`
    naming the holder's pid (written into the file). The kernel releases the lock when the holder dies, so a
    killed run leaves nothing stale. ``CAUSALMM_RUN_LOCK`` naming this lock means the launcher of this
    process holds it (``causalmm eval --num-processes``). Creating the lock file and a probe file also checks
    that ``out`` is writable, so a read-only folder fails here with one line rather than at the first write.
    Where ``fcntl`` does not exist (Windows) the folder is not locked.
    """
    lock = out / LOCK_NAME
    if os.environ.get(LOCK_ENV) and os.path.realpath(os.environ[LOCK_ENV]) == os.path.realpath(lock):
        yield None
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield None
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unwritable(out, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise RunLockedError(
                f"{out} is in use by another causalmm eval ({who}); one run writes into a folder at a time: wait "
                "for it to finish (or stop it), or pick another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            probe = out / f"{LOCK_NAME}.probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise _unwritable(out, err) from None
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _unwritable(out: Path, err: OSError) -> BenchmarkError:
    return BenchmarkError(
        f"cannot write to --out {out} ({err.strerror or err}); a run folder must be writable (the run locks it "
        "and writes predictions and metrics there): make it writable, or copy it and pass the copy"
    )


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


def check_done(
    samples: Sequence[Sample], done: dict[tuple[str, int], dict[str, Any]], out: Path, digests: dict[str, str]
) -> None:
    """Refuse to reuse a finished record whose sample now has another prompt or image (see the module notes).

    ``digests`` maps sample id to :func:`image_digest`. A record without ``prompt``/``image_digest`` comes from
    a causalmm that did not record them, and cannot be checked: refused too. A changed label is no reason to
    refuse (:func:`finalize` re-scores with the current one).
    """
    by_id = {s.id: s for s in samples}
    changed: list[tuple[str, str]] = []
    unchecked = 0
    for (sid, _seed), rec in done.items():
        s = by_id.get(sid)
        if s is None:
            continue
        if "prompt" not in rec or "image_digest" not in rec:
            unchecked += 1
        elif rec["prompt"] != s.prompt:
            changed.append((sid, f"its prompt was {_short(rec['prompt'])}, --data now gives {_short(s.prompt)}"))
        elif rec["image_digest"] != digests[sid]:
            changed.append((sid, f"its image {s.image if not isinstance(s.image, bytes) else '(bytes)'} changed"))
    if unchecked:
        raise RunMismatchError(
            f"{out}: {unchecked} prediction(s) do not record the prompt and image they answer (an older causalmm "
            "wrote them), so they cannot be checked against --data; pick another --out"
        )
    if changed:
        ids = list(dict.fromkeys(sid for sid, _ in changed))
        raise RunMismatchError(
            f"{out}: {len(ids)} sample(s) of --data differ from what their predictions were made for (id "
            f"{ids[0]!r}: {changed[0][1]}); the data changed since the run started: rerun with the original "
            "--data, or pick another --out for this data"
        )


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


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
        raise _unwritable(out, err) from None
    with fh, _progress(label, mine_total, mine_done, show) as advance:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [digests[s.id] if digests else image_digest(s, memo) for _, s in chunk]
            sample_seeds = [derive_seed(seed, s.id) for seed, s in chunk]
            image_seeds = [derive_seed(seed, "image", d) for (seed, _), d in zip(chunk, images, strict=True)]
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


def bytes_digest(data: bytes) -> str:
    """The digest images are known by (seeds, identity): blake2b, 16 bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_digest(sample: Sample, memo: dict[Any, str] | None = None) -> str:
    """A digest of a sample's image file (or encoded bytes): equal images get equal image seeds, wherever the
    files lie. ``memo`` caches it per path."""
    image = sample.image
    if image is None:
        return "no image"
    key = image if isinstance(image, bytes) else str(image)
    if memo is not None and key in memo:
        return memo[key]
    digest = bytes_digest(image if isinstance(image, bytes) else Path(image).read_bytes())
    if memo is not None and not isinstance(image, bytes):
        memo[key] = digest
    return digest


def sample_digest(sample: Sample, image: str) -> str:
    """A digest of everything about a sample: id, prompt, image (its digest ``image``) and metadata (labels)."""
    payload = _canon([sample.id, sample.prompt, image, sample.meta])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def data_digest(samples: Sequence[Sample], digests: dict[str, str]) -> str:
    """One digest of a run's sample set (order-free: a reordered file is the same data)."""
    parts = sorted(f"{s.id}\t{sample_digest(s, digests[s.id])}" for s in samples)
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


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
    _atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    _atomic_write(out / "report.md", render_report(bench, summary))
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
        raise _unwritable(out, err) from None
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _unwritable(path.parent, err) from None
