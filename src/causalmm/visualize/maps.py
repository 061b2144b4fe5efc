"""The numbers behind the figure: :func:`attention_maps` checks the request (image, prompt, layers, methods),
captures the maps (:mod:`.capture`) and gathers them, titled, in a :class:`VisualizeResult`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ConfigError, resolve_layers
from ..images import load_image
from ..inputs import InputError
from ..interventions import COUNTERFACTUALS as METHODS
from .capture import language_maps, vision_maps
from .views import model_view

__all__ = ["DEFAULT_METHODS", "VisualizeResult", "attention_maps"]

#: The counterfactual methods shown by default (the paper's four).
DEFAULT_METHODS: tuple[str, ...] = ("random", "uniform", "reversed", "shuffle")


@dataclass
class VisualizeResult:
    """The numbers behind the figure.

    ``maps`` holds 2-D arrays keyed ``"vision/factual"``, ``"vision/<method>"``, ``"language/factual"``,
    ``"language/<method>"``, on the grids ``vision_grid`` / ``language_grid`` (rows, columns). ``vision_view``
    and ``language_view`` are the images the grids cover, as the model sees them (``(H, W, 3)`` floats in
    [0, 1]). ``path`` is set once the figure is written.
    """

    maps: dict[str, np.ndarray]
    titles: dict[str, str]
    methods: tuple[str, ...]
    vision_layers: list[int]
    language_layers: list[int]
    vision_grid: tuple[int, int]
    language_grid: tuple[int, int]
    vision_view: np.ndarray
    language_view: np.ndarray
    image: Image.Image
    prompt: str
    first_token: str
    first_token_id: int
    family: str
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def _methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    items = [m for m in items if m]
    if not items:
        raise ConfigError(f"no counterfactual method given; choose from: {', '.join(METHODS)}")
    bad = [m for m in items if m not in METHODS]
    if bad:
        raise ConfigError(
            f"unknown counterfactual method(s) {', '.join(map(repr, bad))}; choose from: {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(items))


def _vision_layers(cm: Any, layers: Any) -> list[int]:
    ad = cm.adapter
    spec = layers if layers is not None else cm.config.vision_layers
    if spec is None:
        return ad.default_vision_layers()
    try:
        return resolve_layers(spec, ad.n_vision_layers, what="vision layer")
    except ConfigError as err:
        raise ConfigError(
            f"{err}; only the vision layers up to the one that feeds the LLM count (the tower has "
            f"{len(ad.vision_attn)})"
        ) from None


def _language_layers(cm: Any, layers: Any) -> list[int]:
    spec = layers if layers is not None else cm.config.language_layers
    return resolve_layers("middle" if spec is None else spec, cm.adapter.n_language_layers, what="language layer")


def _tags(how: str, lang_note: str, n_crops: int) -> tuple[str, str, str, str]:
    """Notes for the figure and short tags for the panel titles (crops and token grids named)."""
    vis_note, vis_tag = how, ""
    if n_crops > 1:
        vis_note = f"{how}; base crop (1 of {n_crops} crops)"
        vis_tag = f" base crop 1/{n_crops}"
    lang_tag = " base-image tokens" if lang_note.startswith("base-image") else ""
    if "merged" in lang_note:
        lang_tag = " " + lang_note.split(",")[0]
    return vis_note, vis_tag, lang_note, lang_tag


def attention_maps(
    cm: Any,
    image: Any,
    prompt: str,
    *,
    layers: str | int | Sequence[int] | None = None,
    language_layers: str | int | Sequence[int] | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    seed: int | None = 0,
) -> VisualizeResult:
    """Compute the factual and counterfactual attention maps of ``(image, prompt)`` (no figure).

    Args:
        cm: a :class:`causalmm.api.CausalMM` (its config gives heads, ``renormalize`` and default layers).
        image: a path or a PIL image.
        prompt: the question or instruction.
        layers: vision layers (``"2"``, ``"0-3"``, ``[1, 2]``, ``"deep"``...); ``None``: the config's
            ``vision_layers``, else the layer that feeds the LLM.
        language_layers: LLM layers; ``None``: the config's ``language_layers``, else ``middle``.
        methods: counterfactual methods (a sequence or a comma-separated string).
        seed: seeds the random/shuffle draws as the engine seeds a sample's first draw (``None``: config seed).

    Raises:
        InputError: missing/unreadable image or empty prompt. ConfigError: unknown method, layer out of range.
    """
    meths = _methods(methods)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; give a question or instruction about the image")
    pil = load_image(image)
    vlayers = _vision_layers(cm, layers)
    llayers = _language_layers(cm, language_layers)
    ad = cm.adapter
    enc = ad.encode(pil, prompt)
    imgs = ad.image_inputs(enc)
    vmaps, how = vision_maps(cm, imgs, vlayers, meths, seed)
    lmaps, lgrid, lnote, first = language_maps(cm, imgs, enc, llayers, meths, seed)
    n_crops = int(imgs["pixel_values"].shape[1]) if imgs["pixel_values"].dim() == 5 else 1
    vis_note, vis_tag, lang_note, lang_tag = _tags(how, lnote, n_crops)
    maps = {f"vision/{k}": v for k, v in vmaps.items()} | {f"language/{k}": v for k, v in lmaps.items()}
    vl = ",".join(map(str, vlayers))
    ll = ",".join(map(str, llayers))
    titles = {}
    for k in ("factual", *meths):
        titles[f"vision/{k}"] = f"vision L{vl}{vis_tag}: {k}"
        titles[f"language/{k}"] = f"LLM L{ll}{lang_tag}: {k}"
    view = model_view(ad, imgs, pil)
    tok = getattr(ad.processor, "tokenizer", ad.processor)
    return VisualizeResult(
        maps=maps,
        titles=titles,
        methods=meths,
        vision_layers=vlayers,
        language_layers=llayers,
        vision_grid=tuple(vmaps["factual"].shape),
        language_grid=lgrid,
        vision_view=view,
        language_view=view,
        image=pil,
        prompt=prompt,
        first_token=tok.decode([first]),
        first_token_id=first,
        family=ad.family,
        notes=[f"vision: {vis_note}", f"LLM: first-token query -> {lang_note}"],
    )
