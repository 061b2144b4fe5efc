"""Tiny Gemma 3 and PaliGemma (SigLIP tower, Gemma LM): their tokenizers and builders."""

from __future__ import annotations

from transformers import (
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
)

from . import chat_templates
from .parts import TEXT_INIT_RANGE, Built, siglip_vision_config, small_text_config
from .processors import processor_class
from .tokenizer import TokenizerSpec

__all__ = ["GEMMA3_TOKENS", "PALIGEMMA_TOKENS", "gemma3", "paligemma"]

# gemma's ids: pad 0, eos 1, bos 2, unk 3
_GEMMA_SPECIALS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
GEMMA3_TOKENS = TokenizerSpec(
    _GEMMA_SPECIALS,
    ("<start_of_turn>", "<end_of_turn>"),
    chat_templates.GEMMA3,
    named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    corpus=("user\nIs there a cat?", "model\nYes, there is a cat.", "model\nNo."),
)
#: PaliGemma has no chat template.
PALIGEMMA_TOKENS = TokenizerSpec(_GEMMA_SPECIALS, (), "", named={"image_token": "<image>"})

# Gemma 3: SigLIP tower (32 px, 8 px patches -> 16 patches, average-pooled 2x2 -> 4 image tokens), a Gemma 3
# LM with sliding-window layers (window 8 < prompt length, so it actually cuts) and bidirectional attention
# inside the image block (``token_type_ids``).
_GEMMA3_IMAGE = 32
_GEMMA3_TOKENS = 4
# PaliGemma: SigLIP at 32 px with 8 px patches -> 16 image tokens; Gemma LM that attends bidirectionally over
# the whole prefix.
_PALIGEMMA_IMAGE = 32


def gemma3(tokenizer: PreTrainedTokenizerFast) -> Built:
    processor = processor_class("Gemma3Processor")(
        image_processor=Gemma3ImageProcessorPil(size={"height": _GEMMA3_IMAGE, "width": _GEMMA3_IMAGE}),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=_GEMMA3_TOKENS,
    )
    # untied (the real one is tied): a tied random LM mostly repeats the last input token
    text = small_text_config(
        Gemma3TextConfig,
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=siglip_vision_config(_GEMMA3_IMAGE),
        mm_tokens_per_image=_GEMMA3_TOKENS,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=TEXT_INIT_RANGE,
        tie_word_embeddings=False,
    )
    # gemma-3-*-it stops on <eos> and on <end_of_turn>
    return Built(processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")])


def paligemma(tokenizer: PreTrainedTokenizerFast) -> Built:
    image_processor = SiglipImageProcessorPil(
        size={"height": _PALIGEMMA_IMAGE, "width": _PALIGEMMA_IMAGE},
        image_seq_length=(_PALIGEMMA_IMAGE // 8) ** 2,
    )
    # The processor adds PaliGemma's 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer, so the vocabulary
    # size is read after it.
    processor = processor_class("PaliGemmaProcessor")(image_processor=image_processor, tokenizer=tokenizer)
    text = small_text_config(GemmaConfig, tokenizer, head_dim=16)
    config = PaliGemmaConfig(
        vision_config=siglip_vision_config(_PALIGEMMA_IMAGE),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
        tie_word_embeddings=False,
    )
    return Built(processor, config, [tokenizer.eos_token_id])
