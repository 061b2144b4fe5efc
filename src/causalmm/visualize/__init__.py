"""Seeing the causality: factual and counterfactual attention maps of one (image, prompt), as one figure.

Every map comes from the real attention hook (:mod:`causalmm.sites.attention`), read during the real forward
(:mod:`.capture`); no model code is forked. :func:`attention_maps` gives the numbers (:mod:`.maps`),
:func:`render` draws them (:mod:`.figure`), :func:`visualize` does both.

What a panel shows:

* **vision**: the chosen vision layer(s) of the tower, head-averaged. A tower with a CLS token (CLIP, LLaVA)
  shows the CLS query's attention over the patches; one without (Qwen2-VL / 2.5-VL, SigLIP) shows the mean
  attention each patch receives from the queries that may attend to it. LLaVA-NeXT shows the base crop (the
  whole image at the tower's resolution, the first of its crops). Qwen2.5-VL's window permutation is undone.
* **language**: the chosen LLM layer(s) (default: the config's ``language_layers``, else ``middle``), the
  attention of the query that emits the first generated token (the last prompt position) over the image
  tokens, head-averaged, on the LLM's token grid: LLaVA's patch grid, LLaVA-NeXT's base-image tokens, Qwen's
  merged ``(h/m, w/m)`` grid.

Maps of several layers are averaged over the layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .figure import DPI, PANEL_INCHES, figure_size, render
from .maps import DEFAULT_METHODS, VisualizeResult, attention_maps

__all__ = [
    "DEFAULT_METHODS",
    "DPI",
    "PANEL_INCHES",
    "VisualizeResult",
    "attention_maps",
    "figure_size",
    "render",
    "visualize",
]


def visualize(cm: Any, image: Any, prompt: str, *, out: str | Path, dpi: int = DPI, **options: Any) -> Path:
    """Compute :func:`attention_maps` and :func:`render` them to ``out`` (a PNG). Returns ``out``.

    ``options``: the keyword arguments of :func:`attention_maps` (``layers``, ``language_layers``, ``methods``,
    ``seed``), with its defaults.
    """
    return render(attention_maps(cm, image, prompt, **options), out, dpi=dpi)
