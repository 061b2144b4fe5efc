"""VCD, Visual Contrastive Decoding: the contrast with a branch that sees a diffusion-noised image.

Leng et al., CVPR 2024; official code github.com/DAMO-NLP-SG/VCD: the rule ``(1 + alpha) l - alpha l_cd`` under
the ``beta`` cut-off on the factual probabilities (``vcd_utils/vcd_sample.py``), the noise in
``vcd_utils/vcd_add_noise.py``, the defaults in ``experiments/eval/object_hallucination_vqa_llava.py``. Our rule
is the same with ``gamma = alpha`` and ``epsilon = beta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contrast import contrast
from .base import Branch, Method, Param
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["NOISE", "VCD"]

NOISE = Branch("noise", noise=True)


@register
class VCD(Method):
    name = "vcd"
    summary = "contrast with a branch that sees the image under diffusion noise"
    reference = "Leng et al., CVPR 2024; github.com/DAMO-NLP-SG/VCD, vcd_utils/vcd_sample.py"
    params = (
        Param("gamma", 1.0, "alpha = 1 (object_hallucination_vqa_llava.py's argparse default)", grid=(1.0, 2.0, 4.0)),
        Param("epsilon", 0.1, "beta = 0.1 (its argparse default; its bash scripts use 0.2)", grid=(0.01, 0.1)),
        Param("noise_step", 500, "noise step 500 of 1000 (its argparse default)", grid=(500, 999)),
        Param("noise_schedule", "linear", "'sigmoid' is the schedule in vcd_add_noise.py"),
        Param("num_cf_samples", 1, "one noised image per step, as the official code draws it; K > 1 averages K noises"),
    )
    plausible_only = True

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (NOISE,)

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return contrast(factual, list(counterfactuals.values()), gamma=config.gamma, epsilon=config.epsilon)
