"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL: their tokenizers and builders (multimodal RoPE, patch merging,
window attention in Qwen2.5-VL's tower, deepstack features in Qwen3-VL's)."""

from __future__ import annotations

from typing import Any

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
)

from . import chat_templates
from .parts import VISION_INIT_RANGE, Built, text_kwargs
from .processors import processor_class
from .tokenizer import QWEN_EXTRA, QWEN_SPECIALS, TokenizerSpec

__all__ = ["QWEN2_VL_TOKENS", "QWEN3_VL_TOKENS", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]

#: Qwen2-VL's tokenizer adds no bos, like the real Qwen2 tokenizer (Qwen2.5-VL has the same).
QWEN2_VL_TOKENS = TokenizerSpec(QWEN_SPECIALS, QWEN_EXTRA, chat_templates.QWEN2_VL, add_bos=False)
QWEN3_VL_TOKENS = TokenizerSpec(QWEN_SPECIALS, QWEN_EXTRA, chat_templates.QWEN3_VL, add_bos=False)

# Qwen2-VL/2.5-VL: 14-px patches, 2x2 merge -> resized sides are multiples of 28.  min/max pixels keep a 40x48
# image at 84x112 (6x8 = 48 patches -> 12 tokens) and any image at <= 140x140 (<= 100 patches -> <= 25 tokens).
_PATCH = 14
_MIN_PIXELS = 84 * 84
_MAX_PIXELS = 140 * 140
# The vision options every Qwen tower shares: 2x2 spatial merge, 2-frame temporal patches.
_MERGE: dict[str, Any] = {
    "num_heads": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "initializer_range": VISION_INIT_RANGE,
}


def qwen2_vl(tokenizer: PreTrainedTokenizerFast) -> Built:
    text = _text(tokenizer)
    # the merger's output is the LLM's width
    vision = {"depth": 3, "embed_dim": 32, "hidden_size": text["hidden_size"], "mlp_ratio": 2, "patch_size": _PATCH}
    config = Qwen2VLConfig(text_config=text, vision_config={**vision, **_MERGE}, **_vision_tokens(tokenizer))
    return _built(tokenizer, "Qwen2VLProcessor", config)


def qwen2_5_vl(tokenizer: PreTrainedTokenizerFast) -> Built:
    text = _text(tokenizer)
    vision = _vision(
        depth=4,
        patch_size=_PATCH,
        out_hidden_size=text["hidden_size"],
        # 56 px = 2x2 merged tokens per window, so an 84x112 image (3x4 merged) spans 4 windows;
        # blocks 1 and 3 use full attention, blocks 0 and 2 window attention.
        window_size=56,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_vision_tokens(tokenizer))
    return _built(tokenizer, "Qwen2_5_VLProcessor", config)


def qwen3_vl(tokenizer: PreTrainedTokenizerFast) -> Built:
    # 8 px patches, 2x2 merge: sides are multiples of 16; 32..64 px per side -> 4..16 image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=8, temporal_patch_size=2, merge_size=2
    )
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = text_kwargs(tokenizer, head_dim=16, rope_parameters=rope)
    vision = _vision(
        depth=3,
        patch_size=8,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_vision_tokens(tokenizer))
    return _built(tokenizer, "Qwen3VLProcessor", config, image_processor)


def _text(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width) like Qwen's [16, 24, 24].
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    return text_kwargs(tokenizer, rope_parameters=rope)


def _vision(**options: Any) -> dict[str, Any]:
    """A Qwen2.5-VL / Qwen3-VL tower 32 wide (``depth``, ``patch_size`` and the rest in ``options``)."""
    return {"hidden_size": 32, "intermediate_size": 64, **_MERGE, **options}


def _vision_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The ids of the vision markers, and untied embeddings (the top-level config's own option)."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }


def _built(tokenizer: PreTrainedTokenizerFast, processor: str, config: Any, image_processor: Any = None) -> Built:
    """The image-only Qwen processor (by default Qwen2-VL's image processor, 14 px patches), stopping on
    <|im_end|> and <|endoftext|>."""
    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS, patch_size=_PATCH, temporal_patch_size=2, merge_size=2
        )
    built = processor_class(processor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return Built(built, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")])
