"""Tiny Mistral 3: Pixtral tower (8 px patches, 2-D RoPE, every image of a call in ONE sequence with a block
mask), 2x2 patch merger, Mistral LM; its tokenizer and builder."""

from __future__ import annotations

from transformers import (
    Mistral3Config,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)

from . import chat_templates
from .parts import Built, small_text_config, small_vision_kwargs
from .processors import processor_class
from .tokenizer import LLAVA_SPECIALS, TokenizerSpec

__all__ = ["MISTRAL3_TOKENS", "mistral3"]

MISTRAL3_TOKENS = TokenizerSpec(
    LLAVA_SPECIALS,
    ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    chat_templates.MISTRAL3,
)

# Longest edge 48 px -> at most 3x3 merged tokens (+ breaks) per image.
_PATCH = 8
_LONGEST = 48


def mistral3(tokenizer: PreTrainedTokenizerFast) -> Built:
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": _LONGEST}, patch_size={"height": _PATCH, "width": _PATCH}
    )
    processor = processor_class("PixtralProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        spatial_merge_size=2,
        chat_template=tokenizer.chat_template,
    )
    vision = PixtralVisionConfig(**small_vision_kwargs(2, head_dim=8, image_size=_LONGEST, patch_size=_PATCH))
    config = Mistral3Config(
        vision_config=vision,
        text_config=small_text_config(MistralConfig, tokenizer, head_dim=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return Built(processor, config, [tokenizer.eos_token_id])
