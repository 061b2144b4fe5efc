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
alone, so batching changes nothing. ``--param matcher=self`` reads the map from the model's own attention
(:func:`causalmm.matcher.self_saliency`) and keeps the share ``keep`` of the pixels, for images no BLIP matcher
fits (the toy worlds); it is not the official matcher.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..errors import ConfigError
from ..matcher import DEFAULT_MATCHER, SIDE, att_map, keep_mask, load_matcher, local_image, self_saliency
from ..seeds import pixel_digest
from .base import Branch, Method, Param, Range
from .registry import register
from .ritual import ritual_scores

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..settings import Settings

__all__ = ["AGLA"]

LOCAL = Branch("local", transform=True, prompt="local")
#: matcher=self's maps on the image, per model (gone with it) by (image pixels, prompt): a sweep over alpha, the cut
#: or the share kept probes each question once (small tensors; the oldest dropped past 65536)
_SELF_MAPS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


@register
class AGLA(Method):
    name = "agla"
    summary = "add a branch that sees only the part of the image the prompt is about (BLIP ITM's GradCAM)"
    reference = "An et al., 2024; github.com/Lackel/AGLA, eval/augmentation.py, eval/sample.py"
    random_transform = False
    params = (
        Param("epsilon", 0.5, "--beta 0.5 (llava1.5_pope.bash, instructblip_pope.bash)", grid=(0.1, 0.5)),
        Param("alpha", 2.0, "--alpha 2 (llava1.5_pope.bash, instructblip_pope.bash; 0: no branch term)",
              check=Range(0, 100, note="0 = the factual logits alone"), grid=(1.0, 2.0, 3.0)),
        Param("matcher", DEFAULT_MATCHER, "LAVIS blip_image_text_matching large (COCO retrieval), in transformers",
              accepts="a hub id or a local BlipForImageTextRetrieval folder, or self (the model's own attention)"),
        Param("keep", 0.75, "none: the official ITC rule keeps 1 - ITC/2; with matcher=self, which has no ITC, this "
              "share (0.75: the rule at a cosine of 0.5)",
              check=Range(0.01, 1, note="the share of pixels kept, matcher=self only"), grid=(0.5, 0.75)),
        Param("gradcam_layer", 6, "compute_gradcam(block_num=6)",
              check=Range(0, 64, note="the matcher's text-encoder block whose cross-attention gives the map")),
    )  # fmt: skip

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (LOCAL,)

    def tunable(self, settings: Mapping[str, Any]) -> tuple[Param, ...]:
        """``keep`` only with ``matcher=self``: the BLIP matcher's own ITC rule sets the share kept."""
        own = settings.get("params", {}).get("matcher", self.default("matcher", None)) == "self"
        return tuple(p for p in super().tunable(settings) if own or p.field != "keep")

    def prepare(self, config: Settings, device: Any) -> None:
        own = "self" if config.param("matcher") == "self" else "BLIP"
        unread = {"self": ("gradcam_layer", "the BLIP matcher's"), "BLIP": ("keep", "matcher=self's")}[own]
        if config.param(unread[0]) != self.default(unread[0], None):
            raise ConfigError(
                f"agla: {unread[0]} is {unread[1]} setting and does not apply with "
                f"matcher={config.param('matcher')!r}; leave it unset"
                + (" (the BLIP matcher keeps 1 - ITC/2 of the pixels)" if own == "BLIP" else "")
            )
        if own == "BLIP":
            load_matcher(config.param("matcher"), config.param("gradcam_layer"), str(device))

    def branch_image(
        self, branch: Branch, image: Image.Image, seed: int, config: Settings, prompt: str, adapter: Any = None
    ) -> Image.Image:
        if config.param("matcher") == "self":
            maps = _SELF_MAPS.setdefault(adapter.model, {})
            key = (pixel_digest(image), prompt)
            if key not in maps:  # one probe per image and prompt, whatever the other settings
                if len(maps) >= 65536:
                    maps.pop(next(iter(maps)))
                maps[key] = att_map(self_saliency(adapter, image, prompt), SIDE)
            return local_image(image, keep_mask(maps[key], config.param("keep")))
        device = str(adapter.device) if adapter is not None else "cpu"
        return load_matcher(config.param("matcher"), config.param("gradcam_layer"), device).local(image, prompt)

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return ritual_scores(factual, counterfactuals["local"], alpha=config.param("alpha"), epsilon=config.epsilon)
