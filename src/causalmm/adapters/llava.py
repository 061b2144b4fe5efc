"""LLaVA-1.5 and LLaVA-NeXT: a CLIP-style tower that runs images (or crops) as batch rows."""

from __future__ import annotations

import torch

from .base import Adapter


class LlavaAdapter(Adapter):
    """LLaVA-1.5: one image is one row of the vision tower; features come from ``vision_feature_layer``."""

    family = "llava"

    @property
    def n_vision_layers(self) -> int:
        layer = self.model.config.vision_feature_layer
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        total = len(self.vision_attn)
        # hidden_states[h] is the output of layer h-1, so layers 0..h-1 can reach the LLM.
        return max(h % (total + 1) for h in layers)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: an image is split into crops (AnyRes), each crop a row of the vision tower."""

    family = "llava_next"

    def vision_units(self, images: dict[str, torch.Tensor]) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in images["image_sizes"].tolist()
        ]
