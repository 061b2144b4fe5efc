"""The public entry point: ``CausalMM(model, processor, config).generate(images, prompts)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .adapters import Adapter, get_adapter
from .config import CausalMMConfig
from .decoding import Engine, GenerationOptions, GenerationResult

__all__ = ["CausalMM", "load_image", "InputError"]


class InputError(ValueError):
    """Bad user input (image, prompt, model path); the message says what and how to fix it."""


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image; a clear error for a missing or unreadable file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image not found: {path} (give the path of an existing image file)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {path}: not an image file PIL can open ({err})") from err


def _load_pretrained(name_or_path: str, **hf_kwargs: Any):
    """The model and processor, by :func:`causalmm.loading.load_pretrained` (imported here: it imports this
    module's :class:`InputError`)."""
    from .loading import load_pretrained

    return load_pretrained(name_or_path, **hf_kwargs)


class CausalMM:
    """A vision-language model wrapped for counterfactual-attention decoding.

    Example:
        >>> cfg = CausalMMConfig(mode="multimodal")  # doctest: +SKIP
        >>> cm = CausalMM.from_pretrained("llava-hf/llava-1.5-7b-hf", cfg)  # doctest: +SKIP
        >>> cm.generate("cat.jpg", "Is there a dog in the image?").text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        config: CausalMMConfig | None = None,
        *,
        base: str = "sdpa",
        reuse_prefix: bool = True,
        share_layers: bool = True,
        plausible_head: bool = True,
        preallocate_cache: bool = True,
    ) -> None:
        self.config = config or CausalMMConfig()
        #: the engine's optimisations (see :class:`Engine`), each proven token-identical to its reference path
        #: (``False``): ``reuse_prefix`` prefills a common prompt prefix once, ``share_layers`` runs the LLM layers
        #: below the first intervened one once for a language row and its factual row, ``plausible_head``
        #: computes counterfactual logits on the plausible tokens only, ``preallocate_cache`` writes each decode
        #: step's keys and values in place
        self.switches = {
            "reuse_prefix": reuse_prefix,
            "share_layers": share_layers,
            "plausible_head": plausible_head,
            "preallocate_cache": preallocate_cache,
        }
        model.eval()
        self.adapter: Adapter = get_adapter(model, processor, base=base)
        self.engine = Engine(self.adapter, self.config, **self.switches)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: CausalMMConfig | None = None,
        *,
        base: str = "sdpa",
        reuse_prefix: bool = True,
        share_layers: bool = True,
        plausible_head: bool = True,
        preallocate_cache: bool = True,
        **hf_kwargs: Any,
    ) -> CausalMM:
        """Load a model and its processor (local directory or hub id) and wrap them."""
        model, processor = _load_pretrained(str(name_or_path), **hf_kwargs)
        switches = {
            "reuse_prefix": reuse_prefix,
            "share_layers": share_layers,
            "plausible_head": plausible_head,
            "preallocate_cache": preallocate_cache,
        }
        return cls(model, processor, config, base=base, **switches)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def with_config(
        self,
        config: CausalMMConfig,
        *,
        reuse_prefix: bool | None = None,
        share_layers: bool | None = None,
        plausible_head: bool | None = None,
        preallocate_cache: bool | None = None,
    ) -> CausalMM:
        """The same model under another config (no reload); the switches (see :attr:`switches`) default to this
        one's."""
        other = object.__new__(CausalMM)
        given = {
            "reuse_prefix": reuse_prefix,
            "share_layers": share_layers,
            "plausible_head": plausible_head,
            "preallocate_cache": preallocate_cache,
        }
        other.switches = {k: self.switches[k] if v is None else v for k, v in given.items()}
        other.config, other.adapter = config, self.adapter
        other.engine = Engine(self.adapter, config, **other.switches)
        return other

    def generate(
        self,
        images: Any,
        prompts: str | list[str],
        *,
        seeds: list[int] | None = None,
        image_seeds: list[int] | None = None,
        return_branch_logits: bool = False,
        **generation_kwargs: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer ``prompts`` about ``images`` (one image per prompt; paths or PIL images).

        ``generation_kwargs`` are :class:`GenerationOptions` fields (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``stop_strings``). A single prompt
        gives a single result, a list gives a list. ``seeds`` / ``image_seeds``: see :meth:`Engine.generate`.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        image_list = [images] if single or isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if len(image_list) == 1 and len(prompt_list) > 1:
            image_list = image_list * len(prompt_list)
        for i, p in enumerate(prompt_list):
            if not isinstance(p, str) or not p.strip():
                raise InputError(f"prompt {i} is empty; give a question or instruction about the image")
        pil = [load_image(im) for im in image_list]
        try:
            options = GenerationOptions(**generation_kwargs)
        except TypeError as err:
            raise InputError(f"unknown generation option: {err}") from err
        results = self.engine.generate(
            pil, prompt_list, options, seeds=seeds, image_seeds=image_seeds, return_branch_logits=return_branch_logits
        )
        return results[0] if single else results
