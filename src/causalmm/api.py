"""The public entry point: ``CausalMM(model, processor, config).generate(images, prompts)``.

The class loads and wraps a model and runs generation; the checks of what a caller gives it are in
:mod:`causalmm.inputs`, the reading of images in :mod:`causalmm.images`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .adapters import Adapter, check_base, get_adapter
from .config import CausalMMConfig
from .decoding import Engine, GenerationOptions, GenerationResult, Switches
from .images import load_image
from .inputs import InputError, checked_options, image_list, prompt_list, seed_list
from .loading import load_pretrained

__all__ = ["CausalMM"]


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
        switches: Switches | None = None,
        **switch_changes: bool,
    ) -> None:
        """``switches`` (or single ones by name, e.g. ``reuse_prefix=False``): the engine's optimisations, see
        :class:`~causalmm.decoding.Switches`."""
        self.config = config or CausalMMConfig()
        self.switches = (switches or Switches()).replace(**switch_changes)
        model.eval()
        self.adapter: Adapter = get_adapter(model, processor, base=base)
        self.engine = Engine(self.adapter, self.config, self.switches)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: CausalMMConfig | None = None,
        *,
        base: str = "sdpa",
        switches: Switches | None = None,
        **hf_kwargs: Any,
    ) -> CausalMM:
        """Load a model and its processor (local directory or hub id) and wrap them. Keyword arguments named
        after a :class:`~causalmm.decoding.Switches` field set that switch; the rest go to ``from_pretrained``.
        ``base`` is checked first, so a typo fails before a model is loaded."""
        check_base(base)
        names = set(Switches.__dataclass_fields__)
        changes = {k: hf_kwargs.pop(k) for k in list(hf_kwargs) if k in names}
        model, processor = load_pretrained(str(name_or_path), **hf_kwargs)
        return cls(model, processor, config, base=base, switches=switches, **changes)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def with_config(self, config: CausalMMConfig, **switch_changes: bool | None) -> CausalMM:
        """The same model under another config (no reload); switches given by name change, the rest are this
        one's (see :class:`~causalmm.decoding.Switches`)."""
        other = object.__new__(CausalMM)
        other.switches = self.switches.replace(**switch_changes)
        other.config, other.adapter = config, self.adapter
        other.engine = Engine(self.adapter, config, other.switches)
        return other

    def check_prompt(self, image: Any, prompt: str, max_new_tokens: int) -> None:
        """Encode one (image, prompt) as :meth:`generate` would under this config (the variants its method reads
        too, such as ICD's instruction), without generating: an :class:`InputError` where the prompt leaves no
        room for ``max_new_tokens`` in the model's positions, or the processor refuses the image. Lets a
        benchmark run refuse such a sample, by its id, before it writes anything."""
        pil = load_image(image)
        with self.adapter.reserving(int(max_new_tokens)):
            self.adapter.encode(pil, prompt)
            self.engine.needs.encode_variants([pil], [prompt])

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
        """Answer ``prompts`` about ``images`` (one image per prompt; anything :func:`load_image` accepts).

        ``images`` is one image (used for every prompt) or a list, one per prompt. ``generation_kwargs`` are
        :class:`GenerationOptions` fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``repetition_penalty``, ``stop_strings``, and beam search: ``num_beams``, ``length_penalty``,
        ``early_stopping``, ``no_repeat_ngram_size``). A single prompt gives a single result, a list gives a
        list. ``seeds`` / ``image_seeds``: lists of ints, one per prompt (see :meth:`Engine.generate`).

        Raises:
            InputError: no or empty prompts, an unreadable image, images and prompts or seeds that do not pair
                up, a prompt that leaves no room for ``max_new_tokens`` in the model's positions.
            ConfigError: an unknown or invalid generation option.
        """
        single = isinstance(prompts, str)
        texts = prompt_list(prompts)
        given = image_list(images, len(texts), single)
        row_seeds = seed_list("seeds", seeds, len(texts))
        row_image_seeds = seed_list("image_seeds", image_seeds, len(texts))
        known = [f.name for f in dataclasses.fields(GenerationOptions)]
        options = GenerationOptions(**checked_options(generation_kwargs, known))
        pil = []
        for i, im in enumerate(given):
            try:
                pil.append(load_image(im))
            except InputError as err:
                raise InputError(f"image {i}: {err}" if len(given) > 1 else str(err)) from err
        with self.adapter.reserving(options.max_new_tokens):  # a prompt must leave room for the answer
            results = self.engine.generate(
                pil,
                texts,
                options,
                seeds=row_seeds,
                image_seeds=row_image_seeds,
                return_branch_logits=return_branch_logits,
            )
        return results[0] if single else results
