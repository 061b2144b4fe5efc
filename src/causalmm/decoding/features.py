"""Image features of every row kind, computed once per image and kind at prefill: factual, vision-intervened
(draw k of the tower's counterfactual attention, or of the original's feature gate) and noised (VCD, draw k).
The LLM then receives them through the forward's precomputed-features input."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from PIL import Image

from .. import seeds as streams
from ..adapters import Adapter
from ..config import CausalMMConfig
from ..interventions import diffusion_noise
from ..sites import Intervention, SiteRule

__all__ = ["ImageFeatures", "first_equal", "image_digest", "inputs_digest", "zero_image_tokens"]

Features = dict[tuple[int, int], Any]


def image_digest(image: Image.Image, memo: dict[int, str]) -> str:
    """A digest of an image's pixels: equal pixels (or the same object) mean equal image features."""
    if id(image) not in memo:
        memo[id(image)] = streams.pixel_digest(image)
    return memo[id(image)]


def inputs_digest(inputs: dict[str, torch.Tensor]) -> str:
    """A digest of one image's processor inputs (pixels, sizes, grids): equal inputs mean equal image features.
    For prompts that arrive already through the processor, where no PIL image is at hand."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(inputs):
        t = inputs[key].detach().cpu().contiguous()
        h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def first_equal(keys: list[Any]) -> list[int]:
    """For each item, the index of the first item equal to it."""
    first: dict[Any, int] = {}
    return [first.setdefault(k, i) for i, k in enumerate(keys)]


def zero_image_tokens(feature: Any, zero: torch.Tensor, model: str) -> Any:
    """One image's features with the rows of the image tokens ``zero`` marks set to zero (AvisC's branch): the
    LLM places feature rows at its image tokens in order, so row ``i`` is the ``i``-th image token's. Further
    per-token fields (Qwen3-VL's deepstack features) are zeroed at the same rows.

    Raises:
        UnsupportedModelError: the features do not hold one row per image token.
    """
    from ..adapters import UnsupportedModelError
    from ..adapters.base import ImageFeatures as Carried

    def zeroed(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        if flat.shape[0] != zero.numel():
            raise UnsupportedModelError(
                f"{model}: its image features hold {flat.shape[0]} rows for {zero.numel()} image tokens, so the "
                "features of single image tokens cannot be zeroed (AvisC)"
            )
        return flat.masked_fill(zero.to(flat.device)[:, None], 0.0).reshape(t.shape)

    if isinstance(feature, Carried):
        extra = {
            k: zeroed(v) if isinstance(v, torch.Tensor) else [zeroed(x) for x in v] for k, v in feature.extra.items()
        }
        return Carried(zeroed(feature.pooled), extra)
    return zeroed(feature)


class ImageFeatures:
    """Image features of one model under one config: ``features(imgs, kind, image_seeds, draws, same)``.
    ``factual_state``: the state the factual features are computed under (VTI's shift of the tower; ``None``: the
    tower's own run)."""

    def __init__(
        self,
        adapter: Adapter,
        config: CausalMMConfig,
        vision_rule: SiteRule | None,
        factual_state: Intervention | None = None,
    ) -> None:
        self.adapter, self.config, self.vision_rule = adapter, config, vision_rule
        self.factual_state = factual_state

    def __call__(
        self, imgs: list[dict[str, torch.Tensor]], kind: str, image_seeds: list[int], draws: int, same: list[int]
    ) -> Features:
        """Features ``{(prompt, draw): features}`` of ``kind`` for every prompt, computed only for the first prompt
        of each set of equal ones (``same[p]``: the first prompt whose features equal prompt ``p``'s) and handed
        to the others."""
        uniq = sorted(set(same))
        at = {q: j for j, q in enumerate(uniq)}
        sub = self.compute([imgs[q] for q in uniq], kind, [image_seeds[q] for q in uniq], draws)
        ks = [0] if kind == "factual" else range(draws)
        return {(p, k): sub[(at[same[p]], k)] for p in range(len(imgs)) for k in ks}

    def compute(self, imgs: list[dict[str, torch.Tensor]], kind: str, image_seeds: list[int], draws: int) -> Features:
        """Features ``{(prompt, draw): features}`` of ``kind`` for every prompt of ``imgs``."""
        ad, config = self.adapter, self.config
        if kind == "factual":
            return {(p, 0): f for p, f in enumerate(ad.image_features(ad.collate_images(imgs), self.factual_state))}
        keys = [(p, k) for p in range(len(imgs)) for k in range(draws)]
        if kind == "noise":
            noised = []
            for p, k in keys:
                item = dict(imgs[p])
                item["pixel_values"] = diffusion_noise(
                    item["pixel_values"].to(ad.device),
                    config.noise_step,
                    generator=streams.generator(ad.device, image_seeds[p], streams.NOISE, k),
                    schedule=config.noise_schedule,
                )
                noised.append(item)
            return dict(zip(keys, ad.image_features(ad.collate_images(noised)), strict=True))
        batch = ad.collate_images([imgs[p] for p, _ in keys])
        targets, off = [], 0
        for (p, k), units in zip(keys, ad.vision_units(batch), strict=True):
            targets.append((off, off + units, streams.generator(ad.device, image_seeds[p], streams.VISION, k)))
            off += units
        if config.vision_style == "gate":
            return dict(zip(keys, ad.gated_image_features(batch, self.vision_rule, targets), strict=True))
        state = Intervention(vision=self.vision_rule, vision_targets=targets)
        return dict(zip(keys, ad.image_features(batch, state), strict=True))
