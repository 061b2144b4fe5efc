"""LLaVA-1.5 and LLaVA-NeXT: a CLIP-style tower that runs images (or crops) as batch rows."""

from __future__ import annotations

import dataclasses

import torch

from ..interventions import feature_gate
from ..sites import Intervention, SiteRule
from .base import Adapter


class LlavaAdapter(Adapter):
    """LLaVA-1.5: one image is one row of the vision tower; features come from ``vision_feature_layer``."""

    family = "llava"
    supports_gate = True
    batched_vision_interventions = True
    supports_prefix_reuse = True
    supports_layer_sharing = True
    plain_lm_head = True

    @property
    def n_vision_layers(self) -> int:
        layer = self.model.config.vision_feature_layer
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        total = len(self.vision_attn)
        # hidden_states[h] is the output of layer h-1, so layers 0..h-1 can reach the LLM.
        return max(h % (total + 1) for h in layers)

    def gated_image_features(
        self, images: dict[str, torch.Tensor], rule: SiteRule, targets: list[tuple[int, int, torch.Generator | None]]
    ) -> list[torch.Tensor]:
        """The original feature gate: the feature layer's attention map, edited without renormalisation,
        resized to the patch grid and head-averaged, multiplies the patch features before the projector.

        The gate layer is the last of ``rule.layers``; attention itself is left factual.
        """
        layer = max(rule.layers)
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError("the feature gate needs a single vision_feature_layer")
        captured: dict[int, torch.Tensor] = {}

        def keep(site, rows, probs, _):
            for i, r in enumerate(rows):
                captured[r] = probs[i : i + 1]

        gens = {}
        for lo, hi, gen in targets:
            gens.update({r: gen for r in range(lo, hi)})

        def gate(module, args, output):
            hs = list(output.hidden_states)
            h = hs[layer + 1].clone()  # hidden_states[i + 1] is the output of layer i
            for r, probs in sorted(captured.items()):
                h[r : r + 1, 1:] = feature_gate(h[r : r + 1, 1:], probs, rule.method, generator=gens[r])
            hs[layer + 1] = h
            output.hidden_states = tuple(hs)
            return output

        capture = dataclasses.replace(rule, layers=frozenset({layer}), edit=False)
        handle = self.tower.register_forward_hook(gate)
        try:
            return self.image_features(images, Intervention(vision=capture, vision_targets=targets, on_probs=keep))
        finally:
            handle.remove()


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
