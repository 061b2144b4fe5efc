"""Tiny Idefics3 and InternVL, the families that cut an image into tiles plus a global view: their tokenizers
and builders."""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from . import chat_templates
from .parts import Built, small_text_config, small_vision_kwargs
from .processors import processor_class
from .tokenizer import QWEN_SPECIALS, TokenizerSpec

__all__ = ["IDEFICS3_TOKENS", "INTERNVL_TOKENS", "idefics3", "internvl"]

_IDEFICS3_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
IDEFICS3_TOKENS = TokenizerSpec(
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IDEFICS3_ROW_COL),
    chat_templates.IDEFICS3,
    corpus=("User: Is there a cat? Assistant: Yes.", "User: Describe the image. Assistant: A dog."),
)
INTERNVL_TOKENS = TokenizerSpec(
    QWEN_SPECIALS,
    ("<|im_start|>", "<|im_end|>"),
    chat_templates.INTERNVL,
    add_bos=False,
    named={
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
)

# Idefics3: the image is split into sub-images of 32 px (up to 2x2, longest edge 64) plus a global one, each
# through a SigLIP-like tower (8 px patches -> 16) and a 2x2 pixel-shuffle connector (-> 4 tokens).
_IDEFICS3_TILE = 32
# InternVL: the image is cut into 32 px tiles (up to 4, plus a thumbnail), each through an InternViT-like tower
# (8 px patches + CLS) and a 0.5 pixel shuffle -> 4 tokens per tile.
_INTERNVL_TILE = 32


def idefics3(tokenizer: PreTrainedTokenizerFast) -> Built:
    scale = 2
    seq_len = (_IDEFICS3_TILE // 8) ** 2 // scale**2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * _IDEFICS3_TILE}, max_image_size={"longest_edge": _IDEFICS3_TILE}
    )
    processor = processor_class("Idefics3Processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=tokenizer.chat_template,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**small_vision_kwargs(2, image_size=_IDEFICS3_TILE, patch_size=8)),
        text_config=small_text_config(LlamaConfig, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
    )
    return Built(processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")])


def internvl(tokenizer: PreTrainedTokenizerFast) -> Built:
    seq_len = (_INTERNVL_TILE // 8) ** 2 // 4
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": _INTERNVL_TILE, "width": _INTERNVL_TILE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = processor_class("InternVLProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=seq_len,
        chat_template=tokenizer.chat_template,
    )
    tile = [_INTERNVL_TILE, _INTERNVL_TILE]
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**small_vision_kwargs(2, image_size=tile, patch_size=[8, 8])),
        text_config=small_text_config(Qwen2Config, tokenizer),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=seq_len,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return Built(processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")])
