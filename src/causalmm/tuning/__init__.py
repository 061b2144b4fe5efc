"""Tuning: each method's settings chosen on a benchmark's dev images, the same way for every method.

:mod:`.grid` builds each method's grid from the registry (every parameter's declared values, the official one
among them) under one budget; :mod:`.select` holds each benchmark's rule and the one selection code the toy world
shares; :mod:`.split` splits a benchmark's images into dev and test; :mod:`.tune` runs ``causalmm tune`` and reads
its ``tuning.json`` back for ``causalmm eval --tuned``.
"""

from __future__ import annotations

from .grid import Row, grid, parse_overrides, parse_rows, registry_rows, setting_config
from .select import Rule, rule_for, select
from .split import Split, split_by_image

__all__ = [
    "Row", "Rule", "Split", "grid", "parse_overrides", "parse_rows", "registry_rows", "rule_for", "select",
    "setting_config", "split_by_image",
]  # fmt: skip
