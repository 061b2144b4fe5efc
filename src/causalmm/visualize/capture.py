"""Attention-map capture: the factual and counterfactual maps of one layer, read from the real forward.

A forward pass runs with an :class:`~causalmm.sites.Intervention` that edits one layer, and its ``on_probs``
callback receives that layer's factual post-softmax map and the counterfactual map the hook computed from it
(same key mask, same heads, same seeded generator as the engine's first draw). One pass per (method, layer)
keeps every captured factual map genuinely factual: nothing upstream of it is edited. The maps come back
head-averaged, on the grid of the image's patches (vision) or of its LLM tokens (language), averaged over the
layers.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from .. import seeds as streams
from ..decoding import cache_kwargs
from ..sites import Intervention, SiteRule, intervene
from .views import merge_size

__all__ = ["language_maps", "vision_maps"]


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
    m = merge_size(ad)
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


def vision_maps(cm, imgs, layers, methods, seed) -> tuple[dict[str, np.ndarray], str]:
    """``factual`` and each method's counterfactual map of the vision ``layers`` for one image's inputs ``imgs``,
    and how the map reads (the CLS query's attention, or the attention each patch receives)."""
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
        m = merge_size(ad)
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


def language_maps(cm, imgs, enc, layers, methods, seed):
    """``factual`` and each method's counterfactual map of the LLM ``layers``: the attention of the query that emits
    the first generated token over the image tokens. Also the maps' grid, a note on it and that first token."""
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
