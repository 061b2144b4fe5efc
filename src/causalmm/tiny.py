"""Tiny random-weight vision-language models for offline tests.

The CausalMM code paths (attention hooks on the vision tower and on the language model, counterfactual
decoding, batching with left padding) must be exercised on the real ``transformers`` model classes, but
the real checkpoints are gigabytes and the test machines have no network.  This module therefore builds,
in well under a second per family, a *structurally faithful* miniature of each supported family:

* the real model class (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
  ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``) with a tiny config that
  still has several layers, grouped-query attention, CLS tokens / anyres crops / window attention, so
  every branch the real models take is taken here too;
* a real processor class with the PIL image processor (torchvision is deliberately absent) and a byte-level
  BPE tokenizer trained on a small built-in English corpus, with the family's special tokens and a chat
  template mimicking the real checkpoint's;
* weights drawn from ``torch.manual_seed(seed)`` with a deliberately large ``initializer_range`` (0.2) so
  the logits are not flat and greedy outputs depend on the prompt and on the image.

Everything is written with ``save_pretrained`` so it loads back with ``AutoProcessor.from_pretrained`` and
``AutoModelForImageTextToText.from_pretrained``.

Qwen2-VL / Qwen2.5-VL caveat: their stock processors require a video processor, and every video processor
in ``transformers`` 5 needs torchvision.  We save an image-only subclass (``TinyQwen2VLProcessor`` /
``TinyQwen2_5_VLProcessor``).  ``AutoProcessor`` finds it by name once this module is imported (it is
registered at import time, and ``causalmm``'s loader imports it); :func:`load_processor` does that for you.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import logging as hf_logging

__all__ = [
    "FAMILIES",
    "TinyQwen2VLProcessor",
    "TinyQwen2_5_VLProcessor",
    "build_tiny_model",
    "build_tokenizer",
    "load_processor",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------

# A small English corpus: enough for a few hundred byte-level BPE merges, so ordinary prompts tokenize into
# word-ish pieces (as with a real tokenizer) instead of single bytes.  Byte-level BPE round-trips any text
# regardless; the corpus only shapes how compact the encoding is.
_CORPUS: tuple[str, ...] = (
    "Is there a cat in the image? Answer yes or no.",
    "Is there a dog in the image? Answer yes or no.",
    "Is there a person in the picture? Please answer yes or no.",
    "Yes, there is a cat sitting on the red sofa.",
    "No, there is no dog in this image.",
    "Describe the image in detail.",
    "Please describe this picture in as much detail as you can.",
    "What is the color of the car? The car is red.",
    "What color is the sky? The sky is blue and the clouds are white.",
    "The image shows a small brown dog playing with a green ball on the grass.",
    "A black cat is sleeping next to a white cup on the wooden table.",
    "There are two people walking along the street near a yellow bus.",
    "The man is holding an umbrella because it is raining.",
    "A woman is riding a bicycle in the park under the trees.",
    "How many apples are on the plate? There are three apples.",
    "The kitchen has a sink, a window, and an orange chair.",
    "Is the light on? Yes, the lamp is on.",
    "Is the door open? No, the door is closed.",
    "What animal is in the photo? It is a horse standing in a field.",
    "The bird on the fence is small and gray.",
    "Can you see a clock on the wall? Yes, the clock shows ten o'clock.",
    "Describe the colors: red, green, blue, yellow, black, white, brown, pink, purple, and gray.",
    "The boy is wearing a blue shirt and the girl is wearing a pink dress.",
    "A plate of food with bread, cheese, and fruit is on the table.",
    "You are a helpful assistant.",
    "The user asks a question and the assistant gives a short answer.",
    "There is a laptop, a phone, and a book on the desk.",
    "The train is at the station and many people are waiting.",
    "Is there a boat on the water? Yes, there is a white boat.",
    "Is there a giraffe in the image? No, there is not.",
    "What is on the left side of the image? A tree is on the left.",
    "What is on the right side of the image? A house is on the right.",
    "The picture was taken at night, so the image is dark.",
    "This is a photo of a beach with sand, waves, and a bright sun.",
    "Answer the question using a single word or phrase.",
    "The snow covers the mountains and the road.",
    "Two cats and one dog are lying on the floor together.",
    "The sign says stop, and the car has stopped.",
    "Look at the image carefully before you answer.",
    "I think the answer is yes, but I am not sure.",
    # Chat-template scaffolding, so role names become single tokens as in real tokenizers.
    "USER: Is there a cat in the image? ASSISTANT: Yes.",
    "USER: Describe the image. ASSISTANT: A dog is on the grass.",
    "USER: What color is the car? ASSISTANT: Red.",
    "system\nYou are a helpful assistant.",
    "user\nIs there a dog in the image?",
    "assistant\nNo, there is a cat.",
    "system\nAnswer the question.",
    "user\nDescribe the picture.",
    "assistant\nThe picture shows a dog.",
)

# Special tokens per family, in the order they get the lowest ids.  LLaVA(-NeXT) mimics llava-hf's Llama
# tokenizer (<s>, </s>, <unk>, <pad>, <image>); Qwen mimics Qwen2-VL's (no bos/unk in the real one; we use
# <|endoftext|> as bos/unk so that every id in the configs is defined).
_LLAVA_SPECIALS: dict[str, str] = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
_LLAVA_EXTRA: tuple[str, ...] = ("<image>",)
_QWEN_SPECIALS: dict[str, str] = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
}
_QWEN_EXTRA: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_VOCAB_SIZE = 512

# LLaVA-1.5 / LLaVA-NeXT-vicuna style: "USER: <image>\n... ASSISTANT:" (images first, as in llava-hf).
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL-Instruct's template (Qwen2.5-VL uses the same one).
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _is_qwen(family: str) -> bool:
    return family in ("qwen2_vl", "qwen2_5_vl")


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with ``family``'s special tokens and chat template.

    Byte-level BPE is used (rather than a word-level vocabulary) so that *any* prompt a test writes
    round-trips exactly, never producing ``<unk>``.  Training is deterministic for a fixed corpus.
    LLaVA prepends ``<s>`` like the Llama tokenizer; Qwen adds no bos, like the real Qwen2 tokenizer.
    """
    _check_family(family)
    specials = _QWEN_SPECIALS if _is_qwen(family) else _LLAVA_SPECIALS
    extra = _QWEN_EXTRA if _is_qwen(family) else _LLAVA_EXTRA
    ordered_specials = list(dict.fromkeys([*specials.values(), *extra]))

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=ordered_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)

    chat_template = _QWEN_CHAT_TEMPLATE if _is_qwen(family) else _LLAVA_CHAT_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=list(extra),
        add_bos_token=not _is_qwen(family),
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # Left padding by default: these models are used for batched generation.
        padding_side="left",
        model_max_length=2048,
        chat_template=chat_template,
        **specials,
    )
    return tokenizer


# --------------------------------------------------------------------------------------------------------
# Qwen processors without a video processor
# --------------------------------------------------------------------------------------------------------


class _ImageOnly:
    """Image-only Qwen processor.

    The stock classes list ``video_processor`` in ``__init__``, and ``ProcessorMixin`` derives the required
    sub-processors from that signature; all ``transformers`` 5 video processors need torchvision, which is
    not installed.  Dropping the argument from the signature makes the processor image+text only while
    keeping every other behaviour (token expansion, ``mm_token_type_ids``, chat template) of the parent.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    """Image-only ``Qwen2VLProcessor`` (see :class:`_ImageOnly`)."""


class TinyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Image-only ``Qwen2_5_VLProcessor`` (see :class:`_ImageOnly`)."""


# ``processor_class_from_name`` (used by AutoProcessor) also searches registered classes by name.  A string
# key (not a config class) is used so that real Qwen2-VL checkpoints keep mapping to the stock processor.
for _cls in (TinyQwen2VLProcessor, TinyQwen2_5_VLProcessor):
    AutoProcessor.register(f"causalmm_tiny_{_cls.__name__}", _cls, exist_ok=True)

# --------------------------------------------------------------------------------------------------------
# Processors and configs
# --------------------------------------------------------------------------------------------------------

# Vision tower of LLaVA(-NeXT): 32x32 input, 8x8 patches -> 4x4 = 16 patches + CLS.
_CLIP_IMAGE = 32
_CLIP_PATCH = 8
# LLaVA-NeXT anyres grid: a ~1:2 image picks 32x64 / 64x32 (2 crops + the base image); most others pick
# 64x64 (4 crops + base, e.g. 40x48 -> 70 image tokens); a <=32 px square one picks 32x32 (1 crop + base).
_PINPOINTS: list[list[int]] = [[32, 32], [32, 64], [64, 32], [64, 64]]
# Qwen: 14-px patches, 2x2 merge -> resized sides are multiples of 28.  min/max pixels keep a 40x48 image at
# 84x112 (6x8 = 48 patches -> 12 tokens) and any image at <= 140x140 (<= 100 patches -> <= 25 tokens).
_QWEN_PATCH = 14
_QWEN_MIN_PIXELS = 84 * 84
_QWEN_MAX_PIXELS = 140 * 140

# Init scale: at the usual 0.02 the last-position logits have std ~0.15 and greedy outputs often coincide
# across prompts/images (measured: 4 distinct of 9 for Qwen2-VL); at 0.2 the std is ~1.6, all 9 differ, and
# attention maps are peaked rather than uniform, so attention interventions have a visible effect.
_TEXT_INIT_RANGE = 0.2
_VISION_INIT_RANGE = 0.2


def _build_processor(family: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    """Build the family's processor around ``tokenizer`` with the PIL image processor."""
    chat_template = tokenizer.chat_template
    if family == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": _CLIP_IMAGE},
            crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE},
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=_CLIP_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=chat_template,
        )
    if family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": _CLIP_IMAGE},
            crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE},
            image_grid_pinpoints=_PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=_CLIP_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=chat_template,
        )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=_QWEN_MIN_PIXELS,
        max_pixels=_QWEN_MAX_PIXELS,
        patch_size=_QWEN_PATCH,
        temporal_patch_size=2,
        merge_size=2,
    )
    cls = TinyQwen2VLProcessor if family == "qwen2_vl" else TinyQwen2_5_VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as in most current LLMs
        max_position_embeddings=1024,
        initializer_range=_TEXT_INIT_RANGE,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )


def _clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=_CLIP_IMAGE,
        patch_size=_CLIP_PATCH,
        projection_dim=32,
        initializer_range=_VISION_INIT_RANGE,
    )


def _qwen_text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width) like Qwen's [16, 24, 24].
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": _TEXT_INIT_RANGE,
        "tie_word_embeddings": False,
        **_token_ids(tokenizer),
    }


def _build_config(family: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """Tiny but complete model config whose special-token ids match ``tokenizer``."""
    if family in ("llava", "llava_next"):
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        common: dict[str, Any] = {
            "vision_config": _clip_vision_config(),
            "text_config": _llama_text_config(tokenizer),
            "image_token_index": image_token_id,
            "projector_hidden_act": "gelu",
            "vision_feature_select_strategy": "default",
            "vision_feature_layer": -2,
            "image_seq_length": (_CLIP_IMAGE // _CLIP_PATCH) ** 2,
            "tie_word_embeddings": False,
        }
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(image_grid_pinpoints=_PINPOINTS, **common)

    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = _qwen_text_kwargs(tokenizer)
    if family == "qwen2_vl":
        vision = {
            "depth": 3,
            "embed_dim": 32,
            "hidden_size": text["hidden_size"],  # merger output = LLM width
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": _VISION_INIT_RANGE,
        }
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _QWEN_PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # 56 px = 2x2 merged tokens per window, so an 84x112 image (3x4 merged) spans 4 windows;
        # blocks 1 and 3 use full attention, blocks 0 and 2 window attention.
        "window_size": 56,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
        "initializer_range": _VISION_INIT_RANGE,
    }
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build, save and return the directory of a tiny random-weight model + processor of `family`.

    The directory loads with ``AutoModelForImageTextToText.from_pretrained`` and (with this module
    imported, or via :func:`load_processor`) ``AutoProcessor.from_pretrained``.  The same ``seed`` gives
    bit-identical weights; the tokenizer is deterministic regardless of the seed.
    """
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family)
    processor = _build_processor(family, tokenizer)
    config = _build_config(family, tokenizer)

    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config).eval()
    eos = tokenizer.eos_token_id
    if _is_qwen(family):
        eos = [eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    # Saving a ~1 MB shard would otherwise print a tqdm bar per model in test logs.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)
    return out


def load_processor(path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """Load the processor saved by :func:`build_tiny_model`.

    Equivalent to ``AutoProcessor.from_pretrained(path)``; it exists so callers get the image-only Qwen
    processors registered (by importing this module) without having to know about them.
    """
    return AutoProcessor.from_pretrained(str(path), **kwargs)
