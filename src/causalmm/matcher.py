"""AGLA's image-prompt matcher: which part of an image a prompt is about, from BLIP's image-text matching model, and
the local image that keeps that part alone.

Official code github.com/Lackel/AGLA, ``eval/augmentation.py`` and the LAVIS it vendors
(``lavis/models/blip_models/blip_image_text_matching.py``, ``compute_gradcam``; ``lavis/common/gradcam.py``,
``getAttMap``; ``lavis/processors/blip_processors.py``, ``pre_caption``); the matcher is BLIP ITM-large fine-tuned
for COCO retrieval, here through ``transformers``' ``BlipForImageTextRetrieval`` (``Salesforce/blip-itm-large-coco``).

1. **GradCAM** at the text encoder's cross-attention of block ``layer`` (6): the image-text-matching head's "match"
   logit is back-propagated; per head, the attention on each image patch times its positive gradient, averaged over
   heads, then over the prompt's tokens (the first and the last, [CLS] and [SEP], left out): a map on the patch grid
   (24 x 24 for a 384-pixel input with 16-pixel patches).
2. **The map on the image** (``getAttMap``): normalised to [0, 1], resized to the matcher's input side (384), blurred
   with a Gaussian of sigma ``0.02 * 384`` = 7.68 pixels, normalised again. LAVIS resizes with scikit-image's cubic
   spline; here a bicubic resize (``torch``), a difference the blur smooths away.
3. **The keep ratio** ``min(1 - ITC / 2, 1 - 1e-5)``, ITC the cosine similarity of the image's and the prompt's
   projected features: the better the prompt matches the whole image, the less of it is kept.
4. **The local image**: the image resized to 384 x 384, every pixel whose map value is below the
   ``int(384 * 384 * ratio)``-th largest set to black.

``matcher=self`` (:func:`self_saliency`) reads the map from the vision-language model itself, where no BLIP matcher
fits the images (the toy worlds): one probe prefill of the prompt, the last prompt token's attention on each image
token averaged over heads and layers (as mitigv's AGLA reads it), on the image tokens' square grid (LLaVA's); steps
2 and 4 as above, and a fixed keep ratio in place of step 3 (there is no ITC score).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, UnsupportedModelError
from .sites import Intervention, intervene
from .sites.edits import Watch

__all__ = [
    "ITMMatcher", "att_map", "gaussian_blur", "keep_mask", "load_matcher", "local_image", "pre_caption",
    "self_saliency",
]  # fmt: skip

#: the input side of the official matcher, where the local image is made
SIDE = 384
#: the official matcher: LAVIS ``blip_image_text_matching`` "large" (COCO retrieval), as transformers ships it
DEFAULT_MATCHER = "Salesforce/blip-itm-large-coco"


def pre_caption(text: str, max_words: int = 50) -> str:
    """LAVIS's ``BlipCaptionProcessor`` text cleaning (its ``pre_caption``): lower case, the punctuation
    ``.!"()*#:;~`` and runs of spaces made single spaces, at most ``max_words`` words.

    >>> pre_caption("Is there a  DOG in the image?  Answer: yes.")
    'is there a dog in the image? answer yes'
    """
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``(height, width)`` filtered by a Gaussian of ``sigma`` pixels, as ``scipy.ndimage.gaussian_filter``
    does it (separable, the kernel cut at 4 sigma, the border mirrored with the edge pixel repeated: ``reflect``),
    as two matrix products with the filter's matrix along each side."""
    rows = _blur_matrix(x.shape[0], sigma).to(x.dtype)
    cols = _blur_matrix(x.shape[1], sigma).to(x.dtype)
    return rows @ x @ cols.T


@functools.lru_cache(maxsize=8)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """The ``(n, n)`` matrix of the 1-D filter: row ``i`` holds the kernel's weights at the positions it reads,
    mirrored at the borders (``d c b a | a b c d``) however far the kernel reaches."""
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    pos = torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)[None, :]  # (n, taps)
    pos = torch.remainder(pos, 2 * n)
    pos = torch.where(pos >= n, 2 * n - 1 - pos, pos)
    out = torch.zeros(n, n, dtype=torch.float64)
    out.scatter_add_(1, pos, k.expand(n, -1).contiguous())
    return out


def att_map(cam: torch.Tensor, size: int) -> torch.Tensor:
    """LAVIS's ``getAttMap`` with ``blur=True``: ``cam`` (a patch grid) normalised to [0, 1], resized to ``size`` x
    ``size``, blurred with sigma ``0.02 * size``, normalised again (float32)."""
    m = cam.float()
    m = m - m.min()
    if m.max() > 0:
        m = m / m.max()
    m = torch.nn.functional.interpolate(m[None, None], size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    m = gaussian_blur(m, 0.02 * size)
    m = m - m.min()
    return m / m.max() if m.max() > 0 else m


def keep_mask(saliency: torch.Tensor, ratio: float) -> torch.Tensor:
    """The pixels AGLA keeps: those whose ``saliency`` is at least the ``int(n * ratio)``-th largest of the ``n``
    (0-based, as the official ``temp[int(384 * 384 * ratio)]``)."""
    ranked = saliency.flatten().sort(descending=True).values
    return saliency >= ranked[min(int(saliency.numel() * ratio), saliency.numel() - 1)]


def local_image(image: Image.Image, keep: torch.Tensor) -> Image.Image:
    """``image`` resized to ``keep``'s side (bilinear, as PIL's default), the pixels outside ``keep`` black."""
    side = keep.shape[0]
    arr = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.uint8).copy()
    arr[~keep.numpy()] = 0
    return Image.fromarray(arr)


class ITMMatcher:
    """BLIP's image-text matching model and its processor, for GradCAM maps and ITC scores."""

    def __init__(self, model: Any, processor: Any, layer: int = 6) -> None:
        self.model, self.processor = model.eval(), processor
        layers = model.text_encoder.encoder.layer
        if not 0 <= layer < len(layers) or getattr(layers[layer], "crossattention", None) is None:
            raise ConfigError(
                f"agla: the matcher's text encoder has {len(layers)} blocks (0..{len(layers) - 1}); its GradCAM block "
                f"{layer} does not exist: give --param gradcam_layer=0..{len(layers) - 1}"
            )
        self.cross = layers[layer].crossattention.self
        vision = model.config.vision_config
        self.size, self.grid = int(vision.image_size), int(vision.image_size) // int(vision.patch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        enc = self.processor(images=image.convert("RGB"), text=pre_caption(text), return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def saliency(self, image: Image.Image, text: str) -> tuple[torch.Tensor, float]:
        """The GradCAM map on the patch grid ``(grid, grid)`` for ``text`` on ``image``, and their ITC score."""
        enc = self._inputs(image, text)
        seen: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: tuple, out: tuple) -> None:
            out[1].retain_grad()
            seen.append(out[1])

        handle = self.cross.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                self.model.zero_grad(set_to_none=True)
                itm = self.model(**enc, use_itm_head=True).itm_score
                itm[:, 1].sum().backward()
        finally:
            handle.remove()
            self.model.zero_grad(set_to_none=True)
        probs = seen[-1].detach()  # (1, heads, tokens, 1 + patches)
        grads = seen[-1].grad.detach().clamp(min=0)
        cam = (probs[..., 1:] * grads[..., 1:]).mean(1)[0]  # (tokens, patches): the heads' mean
        n = int(enc["attention_mask"][0].sum()) - 2  # the prompt's tokens, [CLS] and [SEP] left out
        cam = cam[1 : n + 1].sum(0) / max(n, 1)
        with torch.no_grad():
            itc = float(self.model(**enc, use_itm_head=False).itm_score.reshape(-1)[0])
        return cam.reshape(self.grid, self.grid).float().cpu(), itc

    def local(self, image: Image.Image, text: str) -> Image.Image:
        """AGLA's local image of ``image`` for ``text`` (the module's steps 1-4)."""
        cam, itc = self.saliency(image, text)
        ratio = min(1.0 - itc / 2.0, 1.0 - 1e-5)  # the official keep ratio
        if not math.isfinite(ratio):
            raise ConfigError("agla: the matcher's ITC score is not finite; check the matcher's weights")
        return local_image(image, keep_mask(att_map(cam, self.size), ratio))


@functools.lru_cache(maxsize=2)
def load_matcher(path: str, layer: int, device: str) -> ITMMatcher:
    """The matcher at ``path`` (a hub id or a local ``BlipForImageTextRetrieval`` folder) on ``device``, loaded once.

    Raises:
        ConfigError: nothing loadable there, naming the fix.
    """
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    try:
        model = BlipForImageTextRetrieval.from_pretrained(path)
        processor = BlipProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "folder" if Path(path).exists() else "hub id"
        raise ConfigError(
            f"agla: cannot load the matcher {path!r} ({where}: {str(err).splitlines()[0]}); give --param matcher=DIR, "
            f"a BlipForImageTextRetrieval folder ({DEFAULT_MATCHER}, downloaded where the hub cannot be reached)"
        ) from None
    return ITMMatcher(model.to(device), processor, layer)


@torch.no_grad()
def self_saliency(adapter: Any, image: Image.Image, prompt: str) -> torch.Tensor:
    """The vision-language model's own map of where ``prompt`` looks in ``image``: one probe prefill, the last
    prompt token's attention on each image token (mean over heads, then over layers), on the image tokens' square
    grid ``(grid, grid)``.

    Raises:
        UnsupportedModelError: the image tokens do not form one square grid (LLaVA's do; tiled, cropped or
            dynamic-resolution families' do not): use a BLIP matcher there.
    """
    enc = adapter.encode(image, prompt)
    ids = enc["input_ids"][0]
    image_cols = torch.isin(ids, adapter.image_token_ids.to(ids.device))
    n = int(image_cols.sum())
    grid = math.isqrt(n)
    if n == 0 or grid * grid != n:
        raise UnsupportedModelError(
            f"agla: matcher=self maps the image tokens back onto the image as one square grid, and "
            f"{type(adapter.model).__name__} gives {n} image tokens; use a BLIP matcher (--param matcher=DIR)"
        )
    watch = Watch([0])
    inputs = {k: v.to(adapter.device) for k, v in enc.items() if k != "labels"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(adapter.dtype)
    with intervene(Intervention(watch=watch)):
        adapter.model(**inputs)
    maps = torch.stack([seen[0].float().cpu()[image_cols.cpu()] for seen in watch.seen.values()])
    return maps.mean(0).reshape(grid, grid)
