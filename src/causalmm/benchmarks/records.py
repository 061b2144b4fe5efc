"""The prediction records of a run folder: reading them (torn last lines repaired), which (sample, seed) pairs
are done, and the digests that tie each record to the sample it answers.

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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..seeds import file_digest
from .base import BenchmarkError, Sample
from .run_folder import RunMismatchError, canon

__all__ = [
    "GENERATED",
    "OUTSIDE",
    "check_done",
    "data_digest",
    "image_digest",
    "load_done",
    "load_records",
    "pending",
    "sample_digest",
    "shard_files",
    "shard_path",
]

#: finished records that are not part of the current run (kept, so a later larger run reuses them)
OUTSIDE = "predictions.outside-run.jsonl"


#: record fields the generator writes; a sample's metadata never overrides them
GENERATED = frozenset({"id", "seed", "sample_seed", "image_seed", "prompt", "image_digest", "sample_digest", "text",
                       "finish_reason", "n_tokens"})  # fmt: skip


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
        try:
            key = (str(rec["id"]), int(rec["seed"]))
        except (KeyError, TypeError, ValueError):
            raise BenchmarkError(
                f"{path}: line {i + 1} is not a prediction record (it needs an 'id' and an integer 'seed'); the "
                "file was edited or corrupted (fix or delete that line to resume)"
            ) from None
        records.setdefault(key, rec)
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


def image_digest(sample: Sample, memo: dict[Any, str] | None = None) -> str:
    """A digest of a sample's image file (or encoded bytes): equal images get equal image seeds, wherever the
    files lie. ``memo`` caches it per path."""
    image = sample.image
    if image is None:
        return "no image"
    key = image if isinstance(image, bytes) else str(image)
    if memo is not None and key in memo:
        return memo[key]
    digest = file_digest(image)
    if memo is not None and not isinstance(image, bytes):
        memo[key] = digest
    return digest


def sample_digest(sample: Sample, image: str) -> str:
    """A digest of everything about a sample: id, prompt, image (its digest ``image``) and metadata (labels)."""
    payload = canon([sample.id, sample.prompt, image, sample.meta])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def data_digest(samples: Sequence[Sample], digests: dict[str, str]) -> str:
    """One digest of a run's sample set (order-free: a reordered file is the same data)."""
    parts = sorted(f"{s.id}\t{sample_digest(s, digests[s.id])}" for s in samples)
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()
