"""The toy world's model: a word-level tokenizer, a LLaVA-1.5-shaped processor and a tiny LLaVA config.

The model is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer MLP projector, Llama
LM), so everything ``causalmm`` does to it is what it does to llava-hf checkpoints; only the sizes are small
enough to train on two CPU cores. The tokenizer is word-level over :func:`~causalmm.toyworld.texts.vocabulary`
(every word any toy-world task or benchmark prompt can hold), lower-cases its input and splits like
:func:`~causalmm.toyworld.texts.split_words`; words outside the world become ``<unk>``.

The chat template is llava-1.5's ("USER: <image>\\n... ASSISTANT:") with ``</s>`` closing each assistant turn,
so a multi-turn training conversation is the concatenation of single-turn prompts and answers, and a
one-turn inference prompt is exactly the prefix the model was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..chat_templates import llava_chat_template
from .texts import vocabulary
from .world import SPECIAL_TOKENS, WorldConfig

__all__ = [
    "CHAT_TEMPLATE",
    "ModelSize",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "shipped_model_path",
]

#: llava-1.5's template with an end-of-turn ``</s>`` after each answer (the model learns to stop)
CHAT_TEMPLATE = llava_chat_template(eos_after_answer=True)

# CLIP's normalisation (what llava-1.5's processor uses)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSize:
    """The tiny model's shape. The defaults give about 0.9M parameters (3.6 MB in float32)."""

    patch: int = 12
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 2

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_tokenizer(config: WorldConfig) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of ``config``'s world (deterministic: the vocabulary is sorted)."""
    words = vocabulary(config)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"<[a-z/]+>|[a-z]+|[0-9]+|[^\sa-z0-9]"), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ,"
    pad, unk, bos, eos, image = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_special_tokens=[image],
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )


def image_tokens(config: WorldConfig, size: ModelSize) -> int:
    """Image tokens per image in the LLM: the patch grid (the CLS position is dropped, llava's ``default``)."""
    return (config.image_size // size.patch) ** 2


def build_processor(config: WorldConfig, size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A llava-1.5 processor at the world's image size (images are already that size: no resize, no crop)."""
    side = config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def build_config(config: WorldConfig, size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The LLaVA config: CLIP tower (its last layer feeds the LLM), gelu MLP projector, Llama LM."""
    if config.image_size % size.patch:
        raise ValueError(f"image_size {config.image_size} must be a multiple of the patch {size.patch}")
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * size.mlp_ratio,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=config.image_size,
        patch_size=size.patch,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_hidden * size.mlp_ratio,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=image_tokens(config, size),
        tie_word_embeddings=False,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, stopping at ``</s>``; answers are short."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )


def shipped_model_path(world: str = "default") -> Path:
    """The directory of ``world``'s trained model shipped inside the package (see :mod:`.worlds`)."""
    from .worlds import shipped_model_path as path_of

    return path_of(world)


def describe(model: Any) -> dict[str, Any]:
    """Parameter counts of the parts of a LLaVA model (for the training record)."""
    parts = {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        for part in parts:
            if f"{part}." in name or name.startswith(part):
                parts[part] += p.numel()
                break
    return {"parameters": sum(p.numel() for p in model.parameters()), **parts}
