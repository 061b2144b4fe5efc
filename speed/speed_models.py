"""The presets of the speed scripts: the model, image and prompt each measures on, and the device it runs on.

``cpu``, ``llava7b`` and ``tiny`` are LLaVA-architecture models with random weights (no download; speed does not
depend on the weights), ``toyworld`` the embedded toy-world model with its trained weights.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from PIL import Image

from causalmm import CausalMM, CausalMMConfig

PRESETS = ("cpu", "toyworld", "llava7b", "tiny")

#: the random presets' shapes: vision and text (hidden, layers, heads, MLP width), vocabulary, image size, patch
SHAPES: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14-336 + Vicuna-7B, as published in llava-hf/llava-1.5-7b-hf's config
    "llava7b": dict(v=(1024, 24, 16, 4096), t=(4096, 32, 32, 11008), vocab=32064, image=336, patch=14),
    # ~50M parameters, 576 image tokens (24x24 patches of 14 px), answer 64 tokens
    "cpu": dict(v=(256, 4, 4, 1024), t=(512, 8, 8, 1408), vocab=32064, image=336, patch=14),
    # seconds-long smoke run
    "tiny": dict(v=(64, 2, 2, 128), t=(128, 2, 4, 256), vocab=1024, image=112, patch=14),
}


def build_llava(preset: str, device: str, dtype: torch.dtype) -> CausalMM:
    """A LLaVA-architecture model with random weights, shaped by ``preset``, wrapped with CausalMM."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from causalmm.tiny import build_tokenizer
    from causalmm.tiny.chat_templates import LLAVA as _LLAVA_CHAT_TEMPLATE

    tok = build_tokenizer("llava")
    image_token = tok.convert_tokens_to_ids("<image>")
    shapes = SHAPES[preset]
    vh, vl, vheads, vff = shapes["v"]
    th, tl, theads, tff = shapes["t"]
    vision = CLIPVisionConfig(
        hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads, intermediate_size=vff,
        image_size=shapes["image"], patch_size=shapes["patch"], projection_dim=th,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=th, num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=theads,
        intermediate_size=tff, vocab_size=shapes["vocab"], max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
        # A trained model's next-token distribution is peaked: a handful of tokens pass the plausibility cut.
        # Random weights of the usual scale give logits of std ~0.5, so nearly the whole vocabulary would, and
        # the counterfactual logits could not be computed on the plausible tokens only. Logits of std 3
        # (hidden states of unit RMS after the final norm) leave about ten of 32k at epsilon 0.1.
        torch.nn.init.normal_(model.lm_head.weight, std=3.0 / th**0.5)
    model.generation_config.eos_token_id = None
    size = shapes["image"]
    improc = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=improc, tokenizer=tok, patch_size=shapes["patch"], vision_feature_select_strategy="default",
        chat_template=_LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    return CausalMM(model, processor, CausalMMConfig(method="regular"), base="sdpa")


def build_toyworld(device: str) -> tuple[CausalMM, Image.Image, str]:
    """The embedded toy-world model (trained weights, shipped in the package), a test-split scene of the world it
    was trained on, and the caption prompt it was trained with."""
    from causalmm.toyworld.demo import trained_world
    from causalmm.toyworld.model import shipped_model_path
    from causalmm.toyworld.render import render
    from causalmm.toyworld.splits import eval_scenes
    from causalmm.toyworld.texts import CAPTION_PROMPT

    path = shipped_model_path()
    cm = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"), base="sdpa")
    cm.model.to(device)
    world = trained_world(path)
    return cm, render(world, eval_scenes(world, "test", 1)[0]), CAPTION_PROMPT


def build(preset: str, device: str, dtype: torch.dtype) -> tuple[CausalMM, Image.Image, str]:
    """(model, image, prompt) of a preset; generation is forced to the full length by the runners (eos off)."""
    if preset == "toyworld":
        return build_toyworld(device)
    image = Image.radial_gradient("L").resize((400, 300)).convert("RGB")
    return build_llava(preset, device, dtype), image, "Please describe this image in detail."


def resolve_device(preset: str, device: str | None) -> tuple[str, torch.dtype] | None:
    """(device, dtype) of a preset (the 7B preset: CUDA, bf16); None, after saying why, when CUDA is missing."""
    device = device or ("cuda" if preset == "llava7b" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {preset} needs a CUDA GPU; none is available here", file=sys.stderr)
        return None
    return device, torch.bfloat16 if preset == "llava7b" else torch.float32
