"""Qwen2-VL and Qwen2.5-VL: all images run as one packed sequence; the LLM uses 3-D (M-RoPE) positions."""

from __future__ import annotations

import torch

from .base import Adapter


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL.

    The vision tower splits its packed sequence per image (per window in Qwen2.5-VL's windowed blocks) and
    calls attention once per chunk; an image occupies ``t*h*w`` tokens of it. Decode steps get explicit
    M-RoPE positions: the model's cached ``rope_deltas`` would otherwise be shared state between calls.
    """

    family = "qwen2_vl"
    batched_vision_interventions = True
    supports_prefix_reuse = True
    supports_layer_sharing = True
    plain_lm_head = True

    def prefill_positions(self, batch: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = self.model.model
        pos, _ = inner.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=images.get("image_grid_thw"),  # none where every row is text-only
            attention_mask=batch["attention_mask"],
        )
        return pos


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
