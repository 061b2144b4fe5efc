"""Benchmarks: POPE, MME, CHAIR and VLind-Bench — loaders, parsers, metrics, and the resumable runner.

``get_benchmark(name, **options)`` gives a configured :class:`Benchmark`; :func:`evaluate` runs one on a
model into a run folder; :mod:`.stats` and :mod:`.compare` say whether differences between runs are real.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Benchmark, BenchmarkError, Sample

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "Sample", "get_benchmark"]

#: benchmark name -> "module:Class" (imported on use, so one benchmark's dependencies never block another)
BENCHMARKS: dict[str, str] = {
    "pope": "pope:Pope",
    "mme": "mme:Mme",
    "chair": "chair:Chair",
    "vlind": "vlind:VLind",
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
