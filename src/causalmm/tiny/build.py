"""Building, saving and loading back a tiny model of a registered family."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from ..loading import load_processor as _load_processor
from ..loading import save_quietly
from .parts import TEXT_INIT_RANGE
from .registry import tiny_family
from .tokenizer import train_tokenizer

__all__ = ["build_tiny_model", "build_tokenizer", "load_processor"]


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer of ``family`` (:func:`causalmm.tiny.tokenizer.train_tokenizer` on its
    spec): LLaVA prepends ``<s>`` like the Llama tokenizer; Qwen adds no bos, like the real Qwen2 tokenizer."""
    return train_tokenizer(tiny_family(family).tokenizer)


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build, save and return the directory of a tiny random-weight model + processor of `family`.

    The directory loads with ``CausalMM.from_pretrained`` (``AutoModelForImageTextToText`` and
    :func:`causalmm.loading.load_processor`; plain ``AutoProcessor`` too for the families whose processor takes
    no video processor).  The same ``seed`` gives
    bit-identical weights; the tokenizer is deterministic regardless of the seed.
    """
    entry = tiny_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(entry.tokenizer)
    processor, config, eos = entry.build(tokenizer)

    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.model(config).eval()
        _redraw_zero_matrices(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    save_quietly(model, processor, out)
    return out


def _redraw_zero_matrices(model: PreTrainedModel) -> None:
    """Draw any weight matrix the family's init leaves at zero (Gemma 3's image projection starts at 0, which
    would cut the image off from the LLM in an untrained model): normal with the text init range."""
    std = getattr(model.config.get_text_config(), "initializer_range", TEXT_INIT_RANGE)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load the processor saved by :func:`build_tiny_model` (:func:`causalmm.loading.load_processor`, which loads
    the image-only variant where the real class needs a video processor)."""
    return _load_processor(str(path))
