"""The figure: one PNG of panels, the image and the vision maps in the first row, the model's view and the LLM
maps in the second (factual, then each method), each map laid over the image it covers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..inputs import check_output_file, write_failed

if TYPE_CHECKING:
    from .maps import VisualizeResult

__all__ = ["DPI", "PANEL_INCHES", "figure_size", "render"]

#: Size of one panel of the figure, in inches, and the default resolution: a panel is 300 x 300 pixels.
PANEL_INCHES = 3.0
DPI = 100


def figure_size(result: VisualizeResult, dpi: int = DPI) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of the figure :func:`render` writes for ``result``."""
    cols = 2 + len(result.methods)
    return int(round(cols * PANEL_INCHES * dpi)), int(round(2 * PANEL_INCHES * dpi))


def _panel(ax, view: np.ndarray, amap: np.ndarray, title: str) -> None:
    h, w = view.shape[:2]
    ax.imshow(view, extent=(0, w, h, 0))
    lo, hi = float(np.min(amap)), float(np.max(amap))
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):  # a flat map: show it mid-scale, not as noise
        lo, hi = hi - max(abs(hi), 1e-12), hi + max(abs(hi), 1e-12)
    ax.imshow(amap, extent=(0, w, h, 0), cmap="jet", alpha=0.55, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(f"{title}\n[{np.min(amap):.3g}, {np.max(amap):.3g}]", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def render(result: VisualizeResult, out: str | Path, *, dpi: int = DPI) -> Path:
    """Write ``result`` as one PNG: row 1 the image and the vision maps, row 2 the model's view and the LLM
    maps (factual, then each method). Returns the path (also stored in ``result.path``)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    out = check_output_file(out, "figure", "attention.png")
    cols = 2 + len(result.methods)
    fig = Figure(figsize=(cols * PANEL_INCHES, 2 * PANEL_INCHES), dpi=dpi)
    axes = fig.subplots(2, cols, squeeze=False)
    ax = axes[0, 0]
    ax.imshow(np.asarray(result.image))
    ax.set_title(f"image ({result.image.width}x{result.image.height})\n{result.family}", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax = axes[1, 0]
    ax.imshow(result.language_view)
    prompt = result.prompt if len(result.prompt) <= 40 else result.prompt[:37] + "..."
    ax.set_title(f"model input\nfirst token: {result.first_token!r}", fontsize=7)
    ax.set_xlabel(prompt, fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
    names = ("factual", *result.methods)
    for j, name in enumerate(names, start=1):
        _panel(axes[0, j], result.vision_view, result.maps[f"vision/{name}"], result.titles[f"vision/{name}"])
        _panel(axes[1, j], result.language_view, result.maps[f"language/{name}"], result.titles[f"language/{name}"])
    fig.suptitle(" | ".join(result.notes), fontsize=7)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=dpi)
    except OSError as err:
        raise write_failed(err, out, "figure") from err
    result.path = out
    return out
