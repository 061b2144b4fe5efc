"""The one registry of tiny families: ``{family: TinyFamily}``, each entry all that :func:`build_tiny_model`
needs to build that family (tokenizer, processor + config builder, model class)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    Gemma3ForConditionalGeneration,
    Idefics3ForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Mistral3ForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from .gemma import GEMMA3_TOKENS, PALIGEMMA_TOKENS, gemma3, paligemma
from .llava import LLAVA_TOKENS, ONEVISION_TOKENS, llava, llava_next, llava_onevision
from .mistral3 import MISTRAL3_TOKENS, mistral3
from .parts import Built
from .qwen import QWEN2_VL_TOKENS, QWEN3_VL_TOKENS, qwen2_5_vl, qwen2_vl, qwen3_vl
from .tiled import IDEFICS3_TOKENS, INTERNVL_TOKENS, idefics3, internvl
from .tokenizer import TokenizerSpec

__all__ = ["ALL_FAMILIES", "FAMILIES", "GENERIC_FAMILIES", "REGISTRY", "TinyFamily", "tiny_family"]


@dataclass(frozen=True)
class TinyFamily:
    """One family's tiny model.

    ``build`` makes the processor, the config and the eos id(s) around the tokenizer trained from ``tokenizer``;
    ``model`` is the real ``transformers`` class the weights are drawn for; ``adapter`` says whether the family
    has an adapter of its own in :mod:`causalmm.adapters` (else the generic one serves it).
    """

    tokenizer: TokenizerSpec
    build: Callable[[PreTrainedTokenizerFast], Built]
    model: type[PreTrainedModel]
    adapter: bool = False


#: Every tiny family, in the order the tests list them (those with an adapter of their own first).
REGISTRY: dict[str, TinyFamily] = {
    "llava": TinyFamily(LLAVA_TOKENS, llava, LlavaForConditionalGeneration, adapter=True),
    "llava_next": TinyFamily(LLAVA_TOKENS, llava_next, LlavaNextForConditionalGeneration, adapter=True),
    "qwen2_vl": TinyFamily(QWEN2_VL_TOKENS, qwen2_vl, Qwen2VLForConditionalGeneration, adapter=True),
    "qwen2_5_vl": TinyFamily(QWEN2_VL_TOKENS, qwen2_5_vl, Qwen2_5_VLForConditionalGeneration, adapter=True),
    "gemma3": TinyFamily(GEMMA3_TOKENS, gemma3, Gemma3ForConditionalGeneration),
    "llava_onevision": TinyFamily(ONEVISION_TOKENS, llava_onevision, LlavaOnevisionForConditionalGeneration),
    "mistral3": TinyFamily(MISTRAL3_TOKENS, mistral3, Mistral3ForConditionalGeneration),
    "idefics3": TinyFamily(IDEFICS3_TOKENS, idefics3, Idefics3ForConditionalGeneration),
    "paligemma": TinyFamily(PALIGEMMA_TOKENS, paligemma, PaliGemmaForConditionalGeneration),
    "qwen3_vl": TinyFamily(QWEN3_VL_TOKENS, qwen3_vl, Qwen3VLForConditionalGeneration),
    "internvl": TinyFamily(INTERNVL_TOKENS, internvl, InternVLForConditionalGeneration),
}

#: Families with an adapter of their own (the demo CLI offers these).
FAMILIES: tuple[str, ...] = tuple(name for name, family in REGISTRY.items() if family.adapter)
#: Families no adapter names: they run through the generic :class:`causalmm.adapters.Adapter`.
GENERIC_FAMILIES: tuple[str, ...] = tuple(name for name, family in REGISTRY.items() if not family.adapter)
ALL_FAMILIES: tuple[str, ...] = FAMILIES + GENERIC_FAMILIES


def tiny_family(name: str) -> TinyFamily:
    """The registry entry of family ``name``; a ``ValueError`` naming the families for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown family {name!r}; expected one of {ALL_FAMILIES}")
    return REGISTRY[name]
