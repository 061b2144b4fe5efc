"""Tiny random-weight vision-language models for offline tests.

The CausalMM code paths (attention hooks on the vision tower and on the language model, counterfactual
decoding, batching with left padding) must be exercised on the real ``transformers`` model classes, but
the real checkpoints are gigabytes and the test machines have no network.  This module therefore builds,
in well under a second per family, a *structurally faithful* miniature of each supported family:

* the real model class (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
  ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``; and, for the families no
  adapter names (:data:`GENERIC_FAMILIES`, served by the generic adapter), Gemma 3, LLaVA-OneVision,
  Mistral 3, Idefics3, PaliGemma, Qwen3-VL and InternVL) with a tiny config that still has several layers,
  grouped-query attention, CLS tokens / anyres crops / tiles / window and sliding-window attention, so
  every branch the real models take is taken here too;
* a real processor class with the PIL image processor (torchvision is deliberately absent) and a byte-level
  BPE tokenizer trained on a small built-in English corpus, with the family's special tokens and a chat
  template mimicking the real checkpoint's;
* weights drawn from ``torch.manual_seed(seed)`` with a deliberately large ``initializer_range`` (0.2) so
  the logits are not flat and greedy outputs depend on the prompt and on the image (weight matrices a
  family initialises to zero, like Gemma 3's image projection, are drawn too, or the image would not reach
  the LLM).

Everything is written with ``save_pretrained`` so it loads back with ``CausalMM.from_pretrained``.

Processors without torchvision: the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and InternVL
take a video processor, and every video processor in ``transformers`` 5 needs torchvision.  They are built with
the image-only variant of the real class (:func:`causalmm.loading.image_only_processor`), which saves under the
real class name, so a tiny checkpoint names ``Qwen2VLProcessor`` as a hub one does, minus the video processor
config; :func:`causalmm.loading.load_processor` (which ``CausalMM.from_pretrained`` uses) loads it back the same
way.  Mistral 3's ``PixtralProcessor`` comes from :func:`causalmm.loading.pixtral_processor_class`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.utils import logging as hf_logging

from .loading import image_only_processor, pixtral_processor_class
from .loading import load_processor as _load_processor

__all__ = [
    "ALL_FAMILIES",
    "FAMILIES",
    "GENERIC_FAMILIES",
    "build_tiny_model",
    "build_tokenizer",
    "load_processor",
]

#: Families with an adapter of their own (the demo CLI offers these).
FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
#: Families no adapter names: they run through the generic :class:`causalmm.adapters.Adapter`.
GENERIC_FAMILIES: tuple[str, ...] = (
    "gemma3",
    "llava_onevision",
    "mistral3",
    "idefics3",
    "paligemma",
    "qwen3_vl",
    "internvl",
)
ALL_FAMILIES: tuple[str, ...] = FAMILIES + GENERIC_FAMILIES

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


def llava_chat_template(eos_after_answer: bool = False) -> str:
    """LLaVA-1.5 / LLaVA-NeXT-vicuna style: "USER: <image>\n... ASSISTANT:" (images first, as in llava-hf).
    ``eos_after_answer`` closes each assistant turn with the eos token, for models trained to stop there."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
        "{% else %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}{% endfor %}"
        "{% endif %}"
        + ("{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}" if eos_after_answer else "")
        + "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


_LLAVA_CHAT_TEMPLATE = llava_chat_template()

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


@dataclass(frozen=True)
class _TokenizerSpec:
    """A family's tokenizer facts: special tokens, extra tokens, bos behaviour and chat template.

    ``named`` are model-specific special tokens the processor reads as attributes (``tokenizer.image_token``,
    ``tokenizer.boi_token``...); ``extra`` are further special tokens (chat-turn markers and the like).
    """

    specials: dict[str, str]
    extra: tuple[str, ...]
    chat_template: str
    add_bos: bool = True
    named: dict[str, str] = field(default_factory=dict)
    #: extra training lines (the family's chat scaffolding), so role names become single tokens
    corpus: tuple[str, ...] = ()


def _tokenizer_spec(family: str) -> _TokenizerSpec:
    if family in _GENERIC_TOKENIZERS:
        return _GENERIC_TOKENIZERS[family]
    if _is_qwen(family):
        return _TokenizerSpec(_QWEN_SPECIALS, _QWEN_EXTRA, _QWEN_CHAT_TEMPLATE, add_bos=False)
    return _TokenizerSpec(_LLAVA_SPECIALS, _LLAVA_EXTRA, _LLAVA_CHAT_TEMPLATE)


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with ``family``'s special tokens and chat template.

    Byte-level BPE is used (rather than a word-level vocabulary) so that *any* prompt a test writes
    round-trips exactly, never producing ``<unk>``.  Training is deterministic for a fixed corpus.
    LLaVA prepends ``<s>`` like the Llama tokenizer; Qwen adds no bos, like the real Qwen2 tokenizer.
    """
    _check_family(family)
    spec = _tokenizer_spec(family)
    ordered_specials = list(dict.fromkeys([*spec.specials.values(), *spec.extra, *spec.named.values()]))

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
    backend.train_from_iterator(_CORPUS + spec.corpus, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=list(spec.extra),
        add_bos_token=spec.add_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # Left padding by default: these models are used for batched generation.
        padding_side="left",
        model_max_length=2048,
        chat_template=spec.chat_template,
        **spec.specials,
        **spec.named,
    )
    return tokenizer


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
    cls = image_only_processor(Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor)
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
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")


# --------------------------------------------------------------------------------------------------------
# Families without an adapter of their own: they exercise the generic ``Adapter``
# --------------------------------------------------------------------------------------------------------

# Gemma 3: SigLIP tower (32 px, 8 px patches -> 16 patches, average-pooled 2x2 -> 4 image tokens), a Gemma 3
# LM with sliding-window layers (window 8 < prompt length, so it actually cuts) and bidirectional attention
# inside the image block (``token_type_ids``).
_GEMMA3_IMAGE = 32
_GEMMA3_TOKENS = 4

# gemma-3-*-it's template (the role-alternation check left out); it starts with bos, like the real one.
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# llava-onevision-qwen2-*-ov-hf's template: images first, then "\n" + text.
_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA-OneVision: SigLIP tower (32 px crops, 8 px patches, no CLS) on an AnyRes grid, Qwen2 LM.
_ONEVISION_PINPOINTS: list[list[int]] = [[32, 32], [32, 64], [64, 32]]

# Mistral-Small-3.1-Instruct's template, without its default system prompt: "[INST]...[/INST]", images as
# "[IMG]" where they stand in the content (the processor expands each into rows of [IMG] ending in
# [IMG_BREAK], the last in [IMG_END]).
_MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'][0]['text'] }}{% endif %}{{ '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}"
    "{% elif block['type'] in ['image', 'image_url'] %}{{ '[IMG]' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'][0]['text'] }}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
# Mistral 3: Pixtral tower (8 px patches, 2-D RoPE, every image of a call in ONE sequence with a block mask),
# 2x2 patch merger, Mistral LM. Longest edge 48 px -> at most 3x3 merged tokens (+ breaks) per image.
_PIXTRAL_PATCH = 8
_PIXTRAL_LONGEST = 48

# Idefics3-8B-Llama3's template ("User:<image>...<end_of_utterance>\nAssistant:"), starting with bos.
_IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Idefics3: the image is split into sub-images of 32 px (up to 2x2, longest edge 64) plus a global one, each
# through a SigLIP-like tower (8 px patches -> 16) and a 2x2 pixel-shuffle connector (-> 4 tokens).
_IDEFICS3_TILE = 32
_IDEFICS3_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))

# PaliGemma: no chat template (pt/mix checkpoints take "<image>" + a task prompt); SigLIP at 32 px with
# 8 px patches -> 16 image tokens; Gemma LM that attends bidirectionally over the whole prefix.
_PALIGEMMA_IMAGE = 32

# Qwen3-VL-Instruct's template (no default system prompt, unlike Qwen2-VL's).
_QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL3-*-hf's template without its default system prompt: the image is "<IMG_CONTEXT>\n", which the
# processor expands to <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>.
_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# InternVL: the image is cut into 32 px tiles (up to 4, plus a thumbnail), each through an InternViT-like tower
# (8 px patches + CLS) and a 0.5 pixel shuffle -> 4 tokens per tile.
_INTERNVL_TILE = 32

_GENERIC_TOKENIZERS: dict[str, _TokenizerSpec] = {
    "gemma3": _TokenizerSpec(
        # gemma's ids: pad 0, eos 1, bos 2, unk 3
        {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        ("<start_of_turn>", "<end_of_turn>"),
        _GEMMA3_CHAT_TEMPLATE,
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        corpus=("user\nIs there a cat?", "model\nYes, there is a cat.", "model\nNo."),
    ),
    "llava_onevision": _TokenizerSpec(
        _QWEN_SPECIALS,
        ("<|im_start|>", "<|im_end|>"),
        _ONEVISION_CHAT_TEMPLATE,
        add_bos=False,
        named={"image_token": "<image>", "video_token": "<video>"},
    ),
    "mistral3": _TokenizerSpec(
        _LLAVA_SPECIALS,
        ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        _MISTRAL3_CHAT_TEMPLATE,
    ),
    "idefics3": _TokenizerSpec(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<pad>", "unk_token": "<unk>"},
        ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IDEFICS3_ROW_COL),
        _IDEFICS3_CHAT_TEMPLATE,
        corpus=("User: Is there a cat? Assistant: Yes.", "User: Describe the image. Assistant: A dog."),
    ),
    "qwen3_vl": _TokenizerSpec(_QWEN_SPECIALS, _QWEN_EXTRA, _QWEN3_VL_CHAT_TEMPLATE, add_bos=False),
    "internvl": _TokenizerSpec(
        _QWEN_SPECIALS,
        ("<|im_start|>", "<|im_end|>"),
        _INTERNVL_CHAT_TEMPLATE,
        add_bos=False,
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    ),
    "paligemma": _TokenizerSpec(
        {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        (),
        "",
        named={"image_token": "<image>"},
    ),
}


def _gemma3(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": _GEMMA3_IMAGE, "width": _GEMMA3_IMAGE}),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=_GEMMA3_TOKENS,
    )
    vision = _siglip_vision_config(_GEMMA3_IMAGE)
    # untied (the real one is tied): a tied random LM mostly repeats the last input token
    text = _small_text_config(
        Gemma3TextConfig,
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=_GEMMA3_TOKENS,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=_TEXT_INIT_RANGE,
        tie_word_embeddings=False,
    )
    # gemma-3-*-it stops on <eos> and on <end_of_turn>
    return processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def _small_text_config(cls: type, tokenizer: PreTrainedTokenizerFast, **extra: Any) -> Any:
    """A 4-layer, 64-wide LM config of class ``cls`` with grouped-query attention, untied embeddings."""
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=_TEXT_INIT_RANGE,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
        **extra,
    )


def _siglip_vision_config(image_size: int, patch: int = 8, layers: int = 2) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
        initializer_range=_VISION_INIT_RANGE,
    )


def _llava_onevision(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE}, image_grid_pinpoints=_ONEVISION_PINPOINTS
    )
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        num_image_tokens=(_CLIP_IMAGE // 8) ** 2,
        vision_feature_select_strategy="full",
    )
    text = _small_text_config(Qwen2Config, tokenizer)
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision_config(_CLIP_IMAGE, layers=3),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def _mistral3(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": _PIXTRAL_LONGEST},
        patch_size={"height": _PIXTRAL_PATCH, "width": _PIXTRAL_PATCH},
    )
    processor = pixtral_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PIXTRAL_PATCH,
        spatial_merge_size=2,
        chat_template=tokenizer.chat_template,
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=8,
        image_size=_PIXTRAL_LONGEST,
        patch_size=_PIXTRAL_PATCH,
        initializer_range=_VISION_INIT_RANGE,
    )
    text = _small_text_config(MistralConfig, tokenizer, head_dim=16)
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id]


def _idefics3(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    scale = 2
    seq_len = (_IDEFICS3_TILE // 8) ** 2 // scale**2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * _IDEFICS3_TILE}, max_image_size={"longest_edge": _IDEFICS3_TILE}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=tokenizer.chat_template,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IDEFICS3_TILE,
        patch_size=8,
        initializer_range=_VISION_INIT_RANGE,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=_llama_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")]


def _paligemma(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    image_processor = SiglipImageProcessorPil(
        size={"height": _PALIGEMMA_IMAGE, "width": _PALIGEMMA_IMAGE},
        image_seq_length=(_PALIGEMMA_IMAGE // 8) ** 2,
    )
    # The processor adds PaliGemma's 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer, so the vocabulary
    # size is read after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _small_text_config(GemmaConfig, tokenizer, head_dim=16)
    config = PaliGemmaConfig(
        vision_config=_siglip_vision_config(_PALIGEMMA_IMAGE),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id]


def _qwen3_vl(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    # 8 px patches, 2x2 merge: sides are multiples of 16; 32..64 px per side -> 4..16 image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
        patch_size=8,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = image_only_processor(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "initializer_range": _TEXT_INIT_RANGE,
        "tie_word_embeddings": False,
        **_token_ids(tokenizer),
    }
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": _VISION_INIT_RANGE,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def _internvl(tokenizer: PreTrainedTokenizerFast) -> tuple[ProcessorMixin, Any, list[int]]:
    seq_len = (_INTERNVL_TILE // 8) ** 2 // 4
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": _INTERNVL_TILE, "width": _INTERNVL_TILE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = image_only_processor(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=seq_len,
        chat_template=tokenizer.chat_template,
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=[_INTERNVL_TILE, _INTERNVL_TILE],
        patch_size=[8, 8],
        initializer_range=_VISION_INIT_RANGE,
    )
    text = _small_text_config(Qwen2Config, tokenizer)
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=seq_len,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return processor, config, [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


_GENERIC_BUILDERS: dict[str, Any] = {
    "gemma3": _gemma3,
    "llava_onevision": _llava_onevision,
    "mistral3": _mistral3,
    "idefics3": _idefics3,
    "paligemma": _paligemma,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
}
_MODEL_CLASSES.update(
    {
        "gemma3": Gemma3ForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
        "mistral3": Mistral3ForConditionalGeneration,
        "idefics3": Idefics3ForConditionalGeneration,
        "paligemma": PaliGemmaForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
    }
)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build, save and return the directory of a tiny random-weight model + processor of `family`.

    The directory loads with ``CausalMM.from_pretrained`` (``AutoModelForImageTextToText`` and
    :func:`causalmm.loading.load_processor`; plain ``AutoProcessor`` too for the families whose processor takes
    no video processor).  The same ``seed`` gives
    bit-identical weights; the tokenizer is deterministic regardless of the seed.
    """
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family)
    if family in _GENERIC_BUILDERS:
        processor, config, eos = _GENERIC_BUILDERS[family](tokenizer)
    else:
        processor = _build_processor(family, tokenizer)
        config = _build_config(family, tokenizer)
        eos = tokenizer.eos_token_id
        if _is_qwen(family):
            eos = [eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]

    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config).eval()
        _redraw_zero_matrices(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    save_quietly(model, processor, out)
    return out


def save_quietly(model: PreTrainedModel, processor: ProcessorMixin, out: Path) -> None:
    """``save_pretrained`` model (safetensors) and processor without the per-shard tqdm bar in logs."""
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)


def _redraw_zero_matrices(model: PreTrainedModel) -> None:
    """Draw any weight matrix the family's init leaves at zero (Gemma 3's image projection starts at 0, which
    would cut the image off from the LLM in an untrained model): normal with the text init range."""
    std = getattr(model.config.get_text_config(), "initializer_range", _TEXT_INIT_RANGE)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load the processor saved by :func:`build_tiny_model` (:func:`causalmm.loading.load_processor`, which loads
    the image-only variant where the real class needs a video processor)."""
    return _load_processor(str(path))
