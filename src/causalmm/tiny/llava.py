"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: their tokenizers and builders."""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from . import chat_templates
from .parts import Built, siglip_vision_config, small_text_config, small_vision_kwargs
from .processors import processor_class
from .tokenizer import LLAVA_SPECIALS, QWEN_SPECIALS, TokenizerSpec

__all__ = ["LLAVA_TOKENS", "ONEVISION_TOKENS", "llava", "llava_next", "llava_onevision"]

#: LLaVA(-NeXT) mimics llava-hf's Llama tokenizer, with <image>.
LLAVA_TOKENS = TokenizerSpec(LLAVA_SPECIALS, ("<image>",), chat_templates.LLAVA)
ONEVISION_TOKENS = TokenizerSpec(
    QWEN_SPECIALS,
    ("<|im_start|>", "<|im_end|>"),
    chat_templates.LLAVA_ONEVISION,
    add_bos=False,
    named={"image_token": "<image>", "video_token": "<video>"},
)

# Vision tower of LLaVA(-NeXT): 32x32 input, 8x8 patches -> 4x4 = 16 patches + CLS.
_CLIP_IMAGE = 32
_CLIP_PATCH = 8
# LLaVA-NeXT anyres grid: a ~1:2 image picks 32x64 / 64x32 (2 crops + the base image); most others pick
# 64x64 (4 crops + base, e.g. 40x48 -> 70 image tokens); a <=32 px square one picks 32x32 (1 crop + base).
_PINPOINTS: list[list[int]] = [[32, 32], [32, 64], [64, 32], [64, 64]]
# LLaVA-OneVision: SigLIP tower (32 px crops, 8 px patches, no CLS) on an AnyRes grid, Qwen2 LM.
_ONEVISION_PINPOINTS: list[list[int]] = [[32, 32], [32, 64], [64, 32]]


def llava(tokenizer: PreTrainedTokenizerFast) -> Built:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _CLIP_IMAGE},
        crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE},
    )
    return _clip_llava(tokenizer, "LlavaProcessor", LlavaConfig, image_processor)


def llava_next(tokenizer: PreTrainedTokenizerFast) -> Built:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _CLIP_IMAGE},
        crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE},
        image_grid_pinpoints=_PINPOINTS,
    )
    return _clip_llava(
        tokenizer, "LlavaNextProcessor", LlavaNextConfig, image_processor, image_grid_pinpoints=_PINPOINTS
    )


def _clip_llava(
    tokenizer: PreTrainedTokenizerFast, processor: str, config_cls: type, image_processor: Any, **extra: Any
) -> Built:
    """LLaVA-1.5 or LLaVA-NeXT around ``image_processor``: CLIP tower (CLS dropped), Llama LM."""
    built = processor_class(processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_CLIP_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=tokenizer.chat_template,
    )
    vision = CLIPVisionConfig(
        **small_vision_kwargs(3, image_size=_CLIP_IMAGE, patch_size=_CLIP_PATCH, projection_dim=32)
    )
    config = config_cls(
        vision_config=vision,
        text_config=small_text_config(LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(_CLIP_IMAGE // _CLIP_PATCH) ** 2,
        tie_word_embeddings=False,
        **extra,
    )
    return Built(built, config, tokenizer.eos_token_id)


def llava_onevision(tokenizer: PreTrainedTokenizerFast) -> Built:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE}, image_grid_pinpoints=_ONEVISION_PINPOINTS
    )
    processor = processor_class("LlavaOnevisionProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        num_image_tokens=(_CLIP_IMAGE // 8) ** 2,
        vision_feature_select_strategy="full",
    )
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision_config(_CLIP_IMAGE, layers=3),
        text_config=small_text_config(Qwen2Config, tokenizer),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return Built(processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")])
