"""Tiny random-weight vision-language models for offline tests (test support: no core module imports this).

The CausalMM code paths (attention hooks on the vision tower and on the language model, counterfactual
decoding, batching with left padding) must be exercised on the real ``transformers`` model classes, but
the real checkpoints are gigabytes and the test machines have no network.  This package therefore builds,
in well under a second per family, a *structurally faithful* miniature of each supported family:

* the real model class (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
  ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``; and, for the families no
  adapter names (:data:`GENERIC_FAMILIES`, served by the generic adapter), Gemma 3, LLaVA-OneVision,
  Mistral 3, Idefics3, PaliGemma, Qwen3-VL and InternVL) with a tiny config that still has several layers,
  grouped-query attention, CLS tokens / anyres crops / tiles / window and sliding-window attention, so
  every branch the real models take is taken here too;
* a real processor class with the PIL image processor (torchvision is deliberately absent; see
  :mod:`causalmm.tiny.processors`) and a byte-level BPE tokenizer trained on a small built-in English corpus,
  with the family's special tokens and a chat template mimicking the real checkpoint's;
* weights drawn from ``torch.manual_seed(seed)`` with a deliberately large ``initializer_range`` (0.2) so
  the logits are not flat and greedy outputs depend on the prompt and on the image (weight matrices a
  family initialises to zero, like Gemma 3's image projection, are drawn too, or the image would not reach
  the LLM).

Everything is written with ``save_pretrained`` so it loads back with ``CausalMM.from_pretrained``.

Layout: :mod:`~causalmm.tiny.registry` (the one ``{family: TinyFamily}`` registry), :mod:`~causalmm.tiny.build`
(build, save, load back), :mod:`~causalmm.tiny.tokenizer`, :mod:`~causalmm.tiny.chat_templates`,
:mod:`~causalmm.tiny.processors` (the processor classes, resolved by an explicit call),
:mod:`~causalmm.tiny.parts` (shapes the builders share) and one module per family group: ``llava``, ``qwen``,
``gemma``, ``mistral3``, ``tiled`` (Idefics3, InternVL).
"""

from .build import build_tiny_model, build_tokenizer, load_processor
from .chat_templates import llava_chat_template
from .processors import register_processors
from .registry import ALL_FAMILIES, FAMILIES, GENERIC_FAMILIES, REGISTRY, TinyFamily, tiny_family

__all__ = [
    "ALL_FAMILIES",
    "FAMILIES",
    "GENERIC_FAMILIES",
    "REGISTRY",
    "TinyFamily",
    "build_tiny_model",
    "build_tokenizer",
    "llava_chat_template",
    "load_processor",
    "register_processors",
    "tiny_family",
]
