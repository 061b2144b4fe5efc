"""CausalMM: counterfactual attention in the vision encoder, the LLM, or both (``docs/method.md``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..decoding.rule import contrast
from .base import Branch, Method, Param
from .registry import register

if TYPE_CHECKING:
    from ..config import CausalMMConfig

__all__ = ["MODES", "CausalMM"]

V = Branch("V", vision=True)
L = Branch("L", language=True)
J = Branch("J", vision=True, language=True)

#: mode -> the branches beside the factual one (``docs/method.md#3-branches-and-modes``)
MODES: dict[str, tuple[Branch, ...]] = {"vision": (V,), "language": (L,), "multimodal": (V, L), "joint": (J,)}

_CODE = "github.com/The-Martyr/CausalMM"


@register
class CausalMM(Method):
    name = "causalmm"
    summary = "contrast with counterfactual attention (random, uniform, reversed, shuffled) in the tower and/or LLM"
    reference = f"Zhou et al., ICLR 2025 (arXiv 2410.04780); {_CODE}"
    params = (
        Param("mode", "multimodal", "the original code's 'mm' rule: both branches"),
        Param("vision_cf", "random", "the paper's ablation: random attention works best"),
        Param("language_cf", "random", "the paper's ablation"),
        Param("vision_layers", None, "the layer that feeds the LLM (the original edits the penultimate CLIP layer)"),
        Param("language_layers", None, "the middle third of the LLM (the paper's ablation favours middle layers)"),
        Param("gamma", 1.0, "the original scripts use 0.5 and 1.0"),
        Param("epsilon", 0.1, "the original scripts use 0.1 and 0.6; 0.6 often leaves one token"),
        Param("num_cf_samples", 1, "the original draws once"),
        Param("legacy", False, "True: the original's shared cache (contrast on the first token only)"),
        Param("vision_style", "attention", "'gate': the original's feature gate"),
        Param("renormalize", True, "False: the original's raw maps"),
    )
    plausible_only = True

    def branches(self, config: CausalMMConfig) -> tuple[Branch, ...]:
        return MODES[config.mode]

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: CausalMMConfig, step: int
    ) -> torch.Tensor:
        return contrast(factual, list(counterfactuals.values()), gamma=config.gamma, epsilon=config.epsilon)
