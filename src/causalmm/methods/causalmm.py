"""CausalMM: counterfactual attention in the vision encoder, the LLM, or both (``docs/method.md``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..contrast import contrast
from .base import Branch, Method, Param
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["MODES", "CausalMM"]

V = Branch("V", vision=True)
L = Branch("L", language=True)
J = Branch("J", vision=True, language=True)

#: mode -> the branches beside the factual one (``docs/method.md#3-branches-and-modes``)
MODES: dict[str, tuple[Branch, ...]] = {"vision": (V,), "language": (L,), "multimodal": (V, L), "joint": (J,)}
#: the fields only a vision branch reads, and only a language branch
VISION_FIELDS = frozenset({"vision_cf", "vision_layers", "vision_heads", "vision_style"})
LANGUAGE_FIELDS = frozenset({"language_cf", "language_layers", "language_heads"})

_CODE = "github.com/The-Martyr/CausalMM"


@register
class CausalMM(Method):
    name = "causalmm"
    summary = "contrast with counterfactual attention (random, uniform, reversed, shuffled) in the tower and/or LLM"
    reference = f"Zhou et al., ICLR 2025 (arXiv 2410.04780); {_CODE}"
    #: the paper's three branches as rows of their own, and the original release's feature gate
    variants = {
        "vision": {"mode": "vision"},
        "language": {"mode": "language"},
        "multimodal": {"mode": "multimodal"},
        "gate": {"mode": "vision", "vision_style": "gate"},
    }
    params = (
        Param("mode", "multimodal", "the original code's 'mm' rule: both branches"),
        Param("vision_cf", "random", "the paper's ablation: random attention works best"),
        Param("language_cf", "random", "the paper's ablation"),
        Param(
            "vision_layers",
            None,
            "the layer that feeds the LLM (the original edits the penultimate CLIP layer)",
            grid=(None, "all"),
        ),
        Param(
            "language_layers",
            None,
            "the middle third of the LLM (the paper's ablation favours middle layers)",
            grid=(None, "all", "shallow", "deep"),
        ),
        Param("vision_heads", None, "every head (the original intervenes on whole layers)"),
        Param("language_heads", None, "every head"),
        Param("gamma", 1.0, "the original scripts use 0.5 and 1.0", grid=(1.0, 2.0, 4.0)),
        Param("epsilon", 0.1, "the original scripts use 0.1 and 0.6; 0.6 often leaves one token", grid=(0.01, 0.1)),
        Param("num_cf_samples", 1, "the original draws once"),
        Param("legacy", False, "True: the original's shared cache (contrast on the first token only)"),
        Param("vision_style", "attention", "'gate': the original's feature gate"),
        Param("renormalize", True, "False: the original's raw maps"),
    )
    plausible_only = True

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return MODES[config.mode]

    def reads(self, settings: Mapping[str, Any]) -> frozenset[str]:
        """Its settings, less the vision ones in ``language`` mode and the language ones in ``vision`` mode (that
        mode has no such branch to apply them to)."""
        fields = super().reads(settings)
        mode = settings.get("mode")
        if mode == "language":
            return fields - VISION_FIELDS
        return fields - LANGUAGE_FIELDS if mode == "vision" else fields

    def unread_reason(self, name: str, settings: Mapping[str, Any], spell: Callable[[str], str] = str) -> str:
        mode = settings.get("mode")
        if (name in VISION_FIELDS and mode == "language") or (name in LANGUAGE_FIELDS and mode == "vision"):
            side = "vision" if name in VISION_FIELDS else "language"
            modes = " / ".join(m for m, bs in MODES.items() if any(getattr(b, side) for b in bs))
            return (
                f"does not apply in {spell('mode')} {mode}, which runs no {side} branch; choose {spell('mode')} "
                f"{modes}, or leave {spell(name)} unset"
            )
        return super().unread_reason(name, settings, spell)

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return contrast(factual, list(counterfactuals.values()), gamma=config.gamma, epsilon=config.epsilon)
