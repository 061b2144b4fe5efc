"""RITUAL, Random Image Transformations as a Universal Anti-hallucination Lever: a branch that sees the image under a
random transform, added to the factual logits (a complement, not a contrast).

Woo et al., 2024; official code github.com/sangminwoo/RITUAL. The branch (``eval_bench/pope_eval_llava.py``):
one of six ``torchvision.transforms.v2`` transforms drawn uniformly per sample (``aug_dict``: horizontal and
vertical flip, a rotation of up to 180 degrees, colour jitter, a 13-tap Gaussian blur, a random resized crop to 336)
and applied to the raw image, here with PIL (:mod:`causalmm.transforms`) and drawn from the sample's seed. The rule
(``ritual_utils/ritual_sample.py``): ``l + alpha_pos * l_pos`` on the raw logits, ``-inf`` where the factual
logit is below ``log(beta)`` plus its maximum; ``ritual_alpha_pos 3``, ``ritual_beta 0.1``; sampling with
temperature 1 and top-p 1 (the official scripts sample; give ``--do-sample``). The branch keeps its own KV cache, as
there. ``alpha`` 0 returns the factual logits whole (no cut), so that it is regular decoding in every mode.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .. import seeds as streams
from ..transforms import random_transform
from .base import Branch, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["RITUAL", "ritual_scores"]

TRANSFORMED = Branch("transformed", transform=True, prompt="transformed")


def ritual_scores(factual: torch.Tensor, transformed: torch.Tensor, *, alpha: float, epsilon: float) -> torch.Tensor:
    """``l + alpha * l_pos`` in float32, ``-inf`` where ``l`` is below ``log(epsilon)`` plus its maximum; ``alpha`` 0
    returns ``l`` whole.

    >>> ritual_scores(torch.tensor([2.0, 1.0, -5.0]), torch.tensor([0.0, 1.0, 9.0]), alpha=3.0, epsilon=0.1)
    tensor([2., 4., -inf])
    """
    if alpha == 0:
        return factual.float()
    z = factual.float() + alpha * transformed.float()
    if epsilon > 0:
        z = z.masked_fill(factual.float() < factual.float().max() + math.log(epsilon), float("-inf"))
    return z


@register
class RITUAL(Method):
    name = "ritual"
    summary = "add a branch that sees the image under a random transform (flip, rotation, jitter, blur or crop)"
    reference = (
        "Woo et al., 2024; github.com/sangminwoo/RITUAL, eval_bench/pope_eval_llava.py, ritual_utils/ritual_sample.py"
    )
    params = (
        Param("epsilon", 0.1, "ritual_beta 0.1 (pope_eval_llava.py)", grid=(0.01, 0.1)),
        Param("alpha", 3.0, "ritual_alpha_pos 3 (pope_eval_llava.py; 0: no branch term)",
              check=Range(0, 100, note="0 = the factual logits alone"), grid=(1.0, 3.0, 5.0)),
        Param("size", 336, "RandomResizedCrop(size=336): LLaVA-1.5's input side",
              check=Range(1, 4096, note="the crop's output side, in pixels")),
    )  # fmt: skip

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (TRANSFORMED,)

    def branch_image(
        self, branch: Branch, image: Image.Image, seed: int, config: Settings, prompt: str, adapter: Any = None
    ) -> Image.Image:
        g = streams.generator("cpu", seed, streams.TRANSFORM)
        return random_transform(image, g, size=config.param("size"))[1]

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return ritual_scores(
            factual, counterfactuals["transformed"], alpha=config.param("alpha"), epsilon=config.epsilon
        )
