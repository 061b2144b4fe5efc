"""Benchmarks: POPE, MME, CHAIR, VLind-Bench and AMBER (discriminative) — loaders, parsers, metrics, and the
resumable runner.

``get_benchmark(name, **options)`` gives a configured :class:`Benchmark`; :func:`evaluate` runs one on a
model into a run folder; :mod:`.stats` and :mod:`.compare` say whether differences between runs are real.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from .base import Benchmark, BenchmarkError, Sample

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "Sample", "check_data_path", "get_benchmark"]

#: benchmark name -> "module:Class" (imported on use, so one benchmark's dependencies never block another)
BENCHMARKS: dict[str, str] = {
    "pope": "pope:Pope",
    "mme": "mme:Mme",
    "chair": "chair:Chair",
    "vlind": "vlind:VLind",
    "amber": "amber:Amber",
}


def get_benchmark(name: str, **options: Any) -> Benchmark:
    """A benchmark by name with its options; a clear error for an unknown name or option."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    module, cls_name = BENCHMARKS[name].split(":")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    try:
        return cls(**options)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise BenchmarkError(
            f"{name} does not take option(s) {', '.join(sorted(options))}: it accepts "
            f"{', '.join(accepted) or 'no options'} ({err})"
        ) from None


#: endings that make a name a file, never a hub dataset id
_FILE_SUFFIXES = frozenset({".json", ".jsonl", ".parquet", ".arrow", ".txt", ".csv", ".tsv", ".zip", ".gz", ".tar"})
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_data_path(data: str | Path, flag: str = "--data") -> None:
    """Refuse a path that does not exist, before a loader takes it for a hub dataset id.

    The loaders read ``owner/name`` that is not on disk from the hub, so a mistyped ``runs/q.json`` used to
    fail with "download the dataset". Only what has the shape of a hub id (two plain name parts, no leading
    ``/``, ``.`` or ``~``, no file ending such as ``.json``) goes on to the hub; anything else must exist.
    """
    text = str(data)
    if Path(text).exists():
        return
    parts = text.split("/")
    hub = len(parts) == 2 and all(_HUB_PART.fullmatch(p) for p in parts)
    if hub and Path(parts[1]).suffix.lower() not in _FILE_SUFFIXES:
        return
    raise BenchmarkError(f"{flag} {text}: no such file or folder; check the path")
