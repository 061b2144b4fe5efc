"""A tiny random-weight BLIP image-text matching model (``BlipForImageTextRetrieval``) with a real
``BlipProcessor`` (a WordPiece tokenizer over a small lower-case vocabulary), AGLA's matcher in offline tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from .tokenizer import _CORPUS

__all__ = ["build_tiny_matcher"]


def build_tiny_matcher(out_dir: str | Path, *, seed: int = 0, image_size: int = 96, layers: int = 8) -> Path:
    """Write a tiny BLIP ITM model and its processor to ``out_dir`` (``from_pretrained`` loads it): an image side of
    ``image_size`` pixels in 16-pixel patches, ``layers`` text blocks, each with cross-attention."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,?!:;").lower() for line in _CORPUS for w in line.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz?", *words]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    image = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    config = BlipConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "intermediate_size": 64, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3,
                     "initializer_range": 0.2},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "image_size": image_size, "patch_size": 16, "initializer_range": 0.2},
        projection_dim=16, image_text_hidden_size=16, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(out)
    return out
