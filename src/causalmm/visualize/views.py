"""The image as the model sees it: the processor's pixel values turned back into an RGB picture (the first crop of
LLaVA-NeXT, the first frame of Qwen's packed patches), for the panels to lay the maps over."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["merge_size", "model_view"]


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


def model_view(ad: Any, imgs: dict[str, torch.Tensor], image: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` floats in [0, 1]: the image of ``imgs`` (one image's processor outputs) as the tower sees it."""
    pv = imgs.get("pixel_values")
    if ad.packed and "image_grid_thw" in imgs:
        return _packed_view(pv, imgs["image_grid_thw"][0].tolist(), merge_size(ad), ad.processor)
    if isinstance(pv, torch.Tensor) and pv.dim() in (4, 5):
        first = pv[0, 0] if pv.dim() == 5 else pv[0]
        return _denorm(first.float().cpu().numpy(), ad.processor)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def merge_size(ad: Any) -> int:
    """How many patches a side one LLM image token merges (Qwen: 2; 1 where the tower merges none)."""
    vc = getattr(ad.model.config, "vision_config", None)
    return int(getattr(ad.tower, "spatial_merge_size", None) or getattr(vc, "spatial_merge_size", 1) or 1)
