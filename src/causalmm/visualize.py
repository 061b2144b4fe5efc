"""Seeing the causality: factual and counterfactual attention maps of one (image, prompt), as one figure.

Every map comes from the real attention hook (:mod:`causalmm.attention`): a forward pass runs with an
:class:`~causalmm.attention.Intervention` that edits one layer, and its ``on_probs`` callback receives that
layer's factual post-softmax map and the counterfactual map the hook computed from it (same key mask, same
heads, same seeded generator as the engine's first draw). No model code is forked. One pass per (method,
layer) keeps every captured factual map genuinely factual: nothing upstream of it is edited.

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

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from . import seeds as streams
from .attention import Intervention, SiteRule, intervene
from .config import ConfigError, resolve_layers
from .decoding import cache_kwargs
from .interventions import COUNTERFACTUALS as METHODS

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

#: The counterfactual methods shown by default (the paper's four).
DEFAULT_METHODS: tuple[str, ...] = ("random", "uniform", "reversed", "shuffle")
#: Size of one panel of the figure, in inches, and the default resolution: a panel is 300 x 300 pixels.
PANEL_INCHES = 3.0
DPI = 100


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


# -- inputs ------------------------------------------------------------------------------------------------


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


# -- views: the image as the model sees it ------------------------------------------------------------------


def _stats(processor: Any) -> tuple[np.ndarray, np.ndarray]:
    ip = getattr(processor, "image_processor", processor)
    mean = np.asarray(getattr(ip, "image_mean", None) or (0.5, 0.5, 0.5), dtype=np.float32)
    std = np.asarray(getattr(ip, "image_std", None) or (0.5, 0.5, 0.5), dtype=np.float32)
    return mean, std


def _denorm(chw: np.ndarray, processor: Any) -> np.ndarray:
    mean, std = _stats(processor)
    c = chw.shape[0]
    img = chw * std[:c, None, None] + mean[:c, None, None]
    if c == 1:
        img = np.repeat(img, 3, 0)
    return np.clip(img[:3].transpose(1, 2, 0), 0.0, 1.0)


def _packed_view(pixels: torch.Tensor, thw: list[int], merge: int, processor: Any) -> np.ndarray:
    """Qwen's flat patches ``(t*h*w, C*tp*p*p)``, laid out (t, h/m, w/m, m, m), back to the first frame."""
    t, h, w = thw
    ip = getattr(processor, "image_processor", processor)
    tp = int(getattr(ip, "temporal_patch_size", 2) or 1)
    n, dim = pixels.shape
    p = int(round(math.sqrt(dim / (3 * tp))))
    if n != t * h * w or 3 * tp * p * p != dim:
        return np.full((h * 14, w * 14, 3), 0.5, dtype=np.float32)
    x = pixels.float().reshape(t, h // merge, w // merge, merge, merge, 3, tp, p, p)[0, :, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
    return _denorm(x.cpu().numpy(), processor)


def _view(ad: Any, imgs: dict[str, torch.Tensor], image: Image.Image) -> np.ndarray:
    pv = imgs.get("pixel_values")
    if ad.packed and "image_grid_thw" in imgs:
        return _packed_view(pv, imgs["image_grid_thw"][0].tolist(), _merge_size(ad), ad.processor)
    if isinstance(pv, torch.Tensor) and pv.dim() in (4, 5):
        first = pv[0, 0] if pv.dim() == 5 else pv[0]
        return _denorm(first.float().cpu().numpy(), ad.processor)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _merge_size(ad: Any) -> int:
    vc = getattr(ad.model.config, "vision_config", None)
    return int(getattr(ad.tower, "spatial_merge_size", None) or getattr(vc, "spatial_merge_size", 1) or 1)


# -- vision capture ----------------------------------------------------------------------------------------


class _VisionCapture:
    """``on_probs`` callback: per call of the captured layer, the head-mean CLS row and the per-key attention
    received (summed over queries), of the factual and the counterfactual map. Reduced at once: a long
    packed sequence's full maps never pile up."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, site, rows, probs, cf) -> None:
        if site.kind != "vision" or site.layer != self.layer:
            return
        entry: dict[str, Any] = {"rows": list(rows), "q": probs.shape[2], "packed": site.packed}
        for name, t in (("factual", probs), ("cf", cf)):
            # float64 sums: a constant column (uniform) stays exactly constant whatever the reduction order
            entry[name + "_cls"] = t[:, :, 0, :].double().mean(1).cpu()  # (rows, keys)
            entry[name + "_recv"] = t.sum(2, dtype=torch.float64).mean(1).cpu()  # (rows, keys)
        self.calls.append(entry)


def _square(n: int) -> int | None:
    s = int(round(math.sqrt(n)))
    return s if s * s == n else None


def _vision_map(ad: Any, cap: _VisionCapture, imgs: dict[str, torch.Tensor], which: str) -> tuple[np.ndarray, str]:
    if not cap.calls:
        raise RuntimeError(
            f"vision layer {cap.layer} was never captured: the tower's attention did not route through the hook"
        )
    if cap.calls[0]["packed"]:
        return _packed_vision_map(ad, cap, imgs, which)
    first = cap.calls[0]
    i = first["rows"].index(0) if 0 in first["rows"] else 0
    keys = first[which + "_cls"].shape[-1]
    side = _square(keys - 1)
    if side is not None and keys > 1:
        return first[which + "_cls"][i, 1:].reshape(side, side).numpy(), "CLS query -> patches"
    side = _square(keys)
    if side is not None:
        recv = first[which + "_recv"][i] / first["q"]
        return recv.reshape(side, side).numpy(), "mean attention received per patch"
    raise ValueError(f"cannot lay the {keys} vision tokens of {type(ad.model).__name__} out on a square patch grid")


def _packed_vision_map(ad: Any, cap: _VisionCapture, imgs: dict[str, torch.Tensor], which: str):
    """Qwen-style packed tower: chunks (the image, or its windows) in tower order, back to the patch grid."""
    t, h, w = imgs["image_grid_thw"][0].tolist()
    m = _merge_size(ad)
    n = t * h * w
    parts = []
    for call in cap.calls:
        parts.append(call[which + "_recv"][0] / call["q"])  # mean over the queries that may attend to the key
    seq = torch.cat(parts)[:n]
    if seq.numel() != n:
        raise RuntimeError(f"captured {seq.numel()} vision tokens, expected {n} (t*h*w = {t}*{h}*{w})")
    order = torch.arange(n // (m * m))
    tower = ad.tower
    if hasattr(tower, "window_size") and hasattr(tower, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(
            imgs["image_grid_thw"][:1].cpu(),
            spatial_merge_size=m,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
        )
    units = seq.reshape(-1, m * m)
    orig = torch.empty_like(units)
    orig[order.long()] = units  # tower unit u holds original unit order[u]
    grid = orig.reshape(t, h // m, w // m, m, m).permute(0, 1, 3, 2, 4).reshape(t, h, w).mean(0)
    return grid.numpy(), "mean attention received per patch"


def _vision_maps(cm, imgs, layers, methods, seed) -> tuple[dict[str, np.ndarray], str]:
    ad, cfg = cm.adapter, cm.config
    out: dict[str, list[np.ndarray]] = {}
    how = ""
    batch = ad.collate_images([imgs])
    hi = 1 if not ad.packed else sys.maxsize  # LLaVA-NeXT: only the base crop (row 0) is needed
    for method in methods:
        for layer in layers:
            rule = SiteRule(method, frozenset({layer}), cfg.vision_heads, cfg.renormalize)
            gen = torch.Generator(device=ad.device).manual_seed(
                streams.derive_seed(cfg.seed if seed is None else seed, streams.VISION, 0)
            )
            cap = _VisionCapture(layer)
            ad.image_features(batch, Intervention(vision=rule, vision_targets=[(0, hi, gen)], on_probs=cap))
            if method == methods[0]:
                fmap, how = _vision_map(ad, cap, imgs, "factual")
                out.setdefault("factual", []).append(fmap)
            out.setdefault(method, []).append(_vision_map(ad, cap, imgs, "cf")[0])
    return {k: np.mean(v, axis=0) for k, v in out.items()}, how


# -- language capture --------------------------------------------------------------------------------------


def _image_token_id(cfg: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{type(cfg).__name__} names no image token id")


def _language_grid(ad: Any, imgs: dict[str, torch.Tensor], n_tokens: int) -> tuple[slice, tuple[int, int], str]:
    """Which of the image tokens to show and on what grid."""
    cfg = ad.model.config
    if ad.packed and "image_grid_thw" in imgs:
        t, h, w = imgs["image_grid_thw"][0].tolist()
        m = _merge_size(ad)
        return slice(0, n_tokens), (h // m, w // m), f"{m}x{m}-merged patches, t={t} averaged"
    vc = getattr(cfg, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        side = size // patch
        skip = 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0
        if n_tokens >= side * side + skip:
            note = "base-image tokens" if n_tokens > side * side + skip else "patch tokens"
            return slice(skip, skip + side * side), (side, side), note
    side = _square(n_tokens)
    if side is not None:
        return slice(0, n_tokens), (side, side), "image tokens"
    return slice(0, n_tokens), (1, n_tokens), "image tokens (one row)"


class _LanguageCapture:
    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, site, rows, probs, cf) -> None:
        if site.kind == "language" and site.layer == self.layer:
            self.rows["factual"] = probs[0, :, -1].double().mean(0).cpu()
            self.rows["cf"] = cf[0, :, -1].double().mean(0).cpu()


def _language_maps(cm, imgs, enc, layers, methods, seed):
    ad, cfg = cm.adapter, cm.config
    dev = ad.device
    batch = {
        k: enc[k].to(dev) for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids") if k in enc
    }
    feats = ad.image_features(ad.collate_images([imgs]))
    meta = ad.collate_images([{k: v for k, v in imgs.items() if k != "pixel_values"}])
    positions = ad.prefill_positions(batch, {k: v.to(dev) for k, v in meta.items()})
    extra = {k: v for k, v in batch.items() if k in ("token_type_ids", "mm_token_type_ids")}

    def forward(state: Intervention) -> torch.Tensor:
        with torch.no_grad(), intervene(state):
            out = ad.model(
                input_ids=batch["input_ids"],
                **extra,
                **ad.features_input(feats),
                attention_mask=batch["attention_mask"],
                position_ids=positions,
                **cache_kwargs(ad.model, DynamicCache(config=ad.model.config.get_text_config())),
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[0, -1]

    first = int(forward(Intervention()).argmax())
    image_pos = (batch["input_ids"][0] == _image_token_id(ad.model.config)).nonzero().flatten().cpu()
    if image_pos.numel() == 0:
        raise ValueError("the prompt holds no image token: the processor did not insert the image")
    sel, grid, note = _language_grid(ad, imgs, int(image_pos.numel()))
    pos = image_pos[sel]
    out: dict[str, list[np.ndarray]] = {}
    base_seed = cfg.seed if seed is None else seed
    for method in methods:
        for layer in layers:
            rule = SiteRule(method, frozenset({layer}), cfg.language_heads, cfg.renormalize)
            gen = streams.generator(dev, base_seed, streams.LANGUAGE, "L", 0)
            cap = _LanguageCapture(layer)
            forward(Intervention(language=rule, language_rows={0: gen}, on_probs=cap))
            if not cap.rows:
                raise RuntimeError(
                    f"LLM layer {layer} was never captured: its attention did not route through the hook"
                )
            if method == methods[0]:
                out.setdefault("factual", []).append(_to_grid(cap.rows["factual"][pos], grid))
            out.setdefault(method, []).append(_to_grid(cap.rows["cf"][pos], grid))
    maps = {k: np.mean(v, axis=0) for k, v in out.items()}
    return maps, grid, note, first


def _to_grid(values: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    n = grid[0] * grid[1]
    v = values.numpy()
    if v.size % n == 0 and v.size != n:  # several frames (t > 1): average them
        return v.reshape(-1, *grid).mean(0)
    return v.reshape(grid)


# -- public ------------------------------------------------------------------------------------------------


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
    from .api import InputError, load_image

    meths = _methods(methods)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; give a question or instruction about the image")
    pil = load_image(image)
    vlayers = _vision_layers(cm, layers)
    llayers = _language_layers(cm, language_layers)
    ad = cm.adapter
    enc = ad.encode(pil, prompt)
    imgs = ad.image_inputs(enc)
    vmaps, how = _vision_maps(cm, imgs, vlayers, meths, seed)
    lmaps, lgrid, lnote, first = _language_maps(cm, imgs, enc, llayers, meths, seed)
    n_crops = int(imgs["pixel_values"].shape[1]) if imgs["pixel_values"].dim() == 5 else 1
    vis_note, vis_tag, lang_note, lang_tag = _tags(how, lnote, n_crops)
    maps = {f"vision/{k}": v for k, v in vmaps.items()} | {f"language/{k}": v for k, v in lmaps.items()}
    vl = ",".join(map(str, vlayers))
    ll = ",".join(map(str, llayers))
    titles = {}
    for k in ("factual", *meths):
        titles[f"vision/{k}"] = f"vision L{vl}{vis_tag}: {k}"
        titles[f"language/{k}"] = f"LLM L{ll}{lang_tag}: {k}"
    view = _view(ad, imgs, pil)
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

    from .api import check_output_file, write_failed

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


def visualize(
    cm: Any,
    image: Any,
    prompt: str,
    *,
    layers: str | int | Sequence[int] | None = None,
    language_layers: str | int | Sequence[int] | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    seed: int | None = 0,
    out: str | Path,
    dpi: int = DPI,
) -> Path:
    """Compute :func:`attention_maps` and :func:`render` them to ``out`` (a PNG). Returns ``out``."""
    return render(
        attention_maps(cm, image, prompt, layers=layers, language_layers=language_layers, methods=methods, seed=seed),
        out,
        dpi=dpi,
    )
