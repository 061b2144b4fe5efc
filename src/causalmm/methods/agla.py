"""AGLA, Assembly of Global and Local Attention: a branch that sees only the part of the image the prompt is about
(found by an image-text matching model), its logits added to the factual ones.

An et al., 2024; official code github.com/Lackel/AGLA, ``eval/augmentation.py`` (the local image:
:mod:`causalmm.matcher`), ``eval/sample.py`` (the rule: ``l + alpha * l_local`` where ``l`` is at least
``log(beta)`` below its maximum, else ``-inf``, on raw logits), ``eval/run_llava.py`` and
``eval/llava1.5_pope.bash`` (``--alpha 2``, ``--beta 0.5``, sampling at temperature 1: give ``--do-sample`` for
that protocol; greedy here by default). The matcher reads the sample's prompt as it is (the official POPE script
gives it the question before the one-word instruction is appended). The official code inherits VCD's sampling
loop, which copies ``model_kwargs`` into the local branch at every step: after the first token the local branch reads
the global branch's KV cache, so its logits are nearly the global ones; here the local branch keeps its own cache,
as the method intends. The official code runs one sample at a time; the local image is a function of the sample
alone, so batching changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..matcher import DEFAULT_MATCHER, load_matcher
from .base import Branch, Method, Param, Range
from .registry import register
from .ritual import ritual_scores

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["AGLA"]

LOCAL = Branch("local", transform=True, prompt="local")


@register
class AGLA(Method):
    name = "agla"
    summary = "add a branch that sees only the part of the image the prompt is about (BLIP ITM's GradCAM)"
    reference = "An et al., 2024; github.com/Lackel/AGLA, eval/augmentation.py, eval/sample.py"
    random_transform = False
    params = (
        Param("epsilon", 0.5, "--beta 0.5 (llava1.5_pope.bash, instructblip_pope.bash)"),
        Param("alpha", 2.0, "--alpha 2 (llava1.5_pope.bash, instructblip_pope.bash; 0: no branch term)",
              check=Range(0, 100, note="0 = the factual logits alone")),
        Param("matcher", DEFAULT_MATCHER, "LAVIS blip_image_text_matching large (COCO retrieval), in transformers",
              accepts="a hub id or a local BlipForImageTextRetrieval folder"),
        Param("gradcam_layer", 6, "compute_gradcam(block_num=6)",
              check=Range(0, 64, note="the matcher's text-encoder block whose cross-attention gives the map")),
    )  # fmt: skip

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (LOCAL,)

    def prepare(self, config: Settings, device: Any) -> None:
        load_matcher(config.param("matcher"), config.param("gradcam_layer"), str(device))

    def branch_image(
        self, branch: Branch, image: Image.Image, seed: int, config: Settings, prompt: str, device: Any = "cpu"
    ) -> Image.Image:
        return load_matcher(config.param("matcher"), config.param("gradcam_layer"), str(device)).local(image, prompt)

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return ritual_scores(factual, counterfactuals["local"], alpha=config.param("alpha"), epsilon=config.epsilon)
