"""The state one forward reads: which rows each site acts on, with which randomness and which per-row values.

A method never touches a module: the engine builds an :class:`Intervention` per forward and activates it with
:func:`intervene`; the hooks (:mod:`causalmm.sites.attention`, :mod:`causalmm.sites.mlp`) read it through
:func:`active` and act only where it asks. Outside an :func:`intervene` block every hook leaves the model's own
computation untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .tags import SITE_ATTR, Site

__all__ = ["Draws", "Intervention", "SiteRule", "active", "intervene"]


@dataclass(frozen=True)
class SiteRule:
    """What to do at one kind of site: the method, which layers and which heads (``None`` = all)."""

    method: str
    layers: frozenset[int]
    heads: tuple[int, ...] | None = None
    renormalize: bool = True
    #: ``False``: only report the factual maps of the selected rows to ``on_probs`` (the feature gate).
    edit: bool = True


@dataclass(frozen=True)
class Draws:
    """The randomness of one LLM row, split at its image prefix.

    The maps of queries among the row's first ``prefix`` real tokens (the prompt up to its last image token) are
    drawn from ``prefix_gen``, those of every later query from ``gen``. Seed ``prefix_gen`` per image and ``gen``
    per sample, and the questions on one image draw the same maps over their common image prefix, so that prefix
    can be prefilled once for all of them; each later query still draws from its own sample's stream. Both
    streams are consumed in call order, so the maps do not depend on how the prompt is split across forwards.
    """

    gen: torch.Generator | None
    prefix_gen: torch.Generator | None = None
    prefix: int = 0


@dataclass
class Intervention:
    """The state one forward pass reads: which rows are counterfactual, and with which randomness.

    ``vision_targets`` maps ranges of vision *units* (rows of the vision tower's batch, or tokens of a packed
    tower) to the generator that draws that image's counterfactual maps; ``language_rows`` maps LLM batch
    rows to theirs (a generator, or :class:`Draws` to split a row's draws at its image prefix). Generators are
    consumed in call order, which is the same whatever else is in the batch.
    ``on_probs`` (optional) receives ``(site, rows, factual, counterfactual)`` for analysis.
    """

    vision: SiteRule | None = None
    language: SiteRule | None = None
    vision_targets: list[tuple[int, int, torch.Generator | None]] = field(default_factory=list)
    language_rows: dict[int, torch.Generator | Draws | None] = field(default_factory=dict)
    on_probs: Callable[..., None] | None = None
    #: the baselines' edits of the LLM's attention on rows no counterfactual rule touches
    #: (:mod:`causalmm.sites.edits`): an edit of the pre-softmax scores (PAI's boost, VAF's scaling), SID's key
    #: pruning, AvisC's and OPERA's watch of the attention
    scores: Any = None
    prune: Any = None
    watch: Any = None
    #: a side computation at one LLM layer's attention carried past the forward (ONLY's
    #: :class:`~causalmm.sites.edits.SideOutput`)
    side: Any = None
    #: an edit of MLP outputs (:mod:`causalmm.sites.mlp`), called at every tagged MLP as ``mlp(site, x, out)`` with
    #: the MLP's input and output, returning the output to use
    mlp: Any = None
    #: a reader of each LLM decoder layer's output (:mod:`causalmm.sites.mlp`), called as ``layers(site, hidden)``;
    #: it may decide what a later site of the same forward does (MemVR's trigger)
    layers: Any = None
    # Per-module offsets of the packed/batched vision calls seen in the current tower forward.
    _offsets: dict[int, int] = field(default_factory=dict)

    def reset_vision_offsets(self) -> None:
        self._offsets.clear()

    def _vision_rows(self, module: torch.nn.Module, site: Site, batch: int, q: int):
        """The (row, generator) pairs of this vision call that are counterfactual."""
        start = self._offsets.get(id(module), 0)
        size = q if site.packed else batch
        self._offsets[id(module)] = start + size
        rows = []
        for lo, hi, gen in self.vision_targets:
            if site.packed:
                if lo <= start < hi:
                    rows.append((0, gen))
            else:
                rows.extend((r - start, gen) for r in range(max(lo, start), min(hi, start + size)))
        return rows

    def rows_for(self, module: torch.nn.Module, batch: int, q: int):
        site: Site | None = getattr(module, SITE_ATTR, None)
        if site is None:
            return None, []
        rule = self.vision if site.kind == "vision" else self.language
        if site.kind == "vision":
            rows = self._vision_rows(module, site, batch, q)  # advance offsets even if the layer is skipped
        else:
            rows = sorted(self.language_rows.items())
        if rule is None or site.layer not in rule.layers:
            return None, []
        return rule, rows


_ACTIVE: contextvars.ContextVar[Intervention | None] = contextvars.ContextVar("causalmm_intervention", default=None)


@contextlib.contextmanager
def intervene(state: Intervention) -> Iterator[Intervention]:
    """Activate ``state`` for the forward passes run inside the block."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active() -> Intervention | None:
    """The intervention in force, if any."""
    return _ACTIVE.get()
