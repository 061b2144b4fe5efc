"""SID, Self-Introspective Decoding: the contrast with a branch that, from an early LLM layer on, sees only the
image tokens the model finds least important, so its output carries the hallucinations the model is prone to.

Huo et al., ICLR 2025 (arXiv 2408.02032); official code github.com/huofushuo/SID, its patched
``transformers/models/llama/modeling_llama.py`` ("fast_v", l.769-852): at layer ``layer`` (2), the attention of
the last query in the layer before, averaged over heads, ranks the image tokens; the branch keeps the ``keep``
(100) least attended and hides the other image keys from every query from that layer on (masked, not dropped:
positions and cache unchanged), chosen again at every step from the newest token's attention. The rule is
``(1 + alpha) l - alpha l_sid`` on raw logits (``vcd_sample.py`` l.177-194): ``alpha = 0.5``, what runs (the
scripts' ``--cd-alpha 1`` is not passed on, so ``vcd_sample.py``'s fallback 0.5 applies), ``beta = 0.1``. Its
default greedy path takes the argmax before the ``beta`` cut (``epsilon=0`` reproduces that); sampling applies it.
The official code reads LLaVA-1.5's fixed span of 576 image tokens at batch size 1; here each row's own. Up to
the choosing layer the branch row is its factual row, so the engine runs those layers once for both
(``Switches.share_layers``) and the choice reads the factual row's attention there, which is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contrast import contrast
from .base import Branch, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["SID", "SID_BRANCH"]

SID_BRANCH = Branch("sid", prune=True)


@register
class SID(Method):
    name = "sid"
    summary = "contrast with a branch that sees only the least-attended image tokens after an early layer"
    reference = "Huo et al., ICLR 2025; github.com/huofushuo/SID, modeling_llama.py (fast_v) and vcd_sample.py"
    params = (
        Param("gamma", 0.5, "alpha = 0.5, vcd_sample.py's fallback (pope_eval.py's --cd-alpha 1 is not passed on)",
              grid=(0.5, 1.0, 2.0)),
        Param("epsilon", 0.1, "cd_beta = 0.1 (the official greedy path skips the cut: epsilon=0)"),
        Param("layer", 2, "fast_v_agg_layer = 2: hidden from layer 2 on, chosen in layer 1",
              check=Range(1, note="the keys are chosen in the layer before"),
              accepts="[1, LLM layers - 1] (checked with the model)"),
        Param("keep", 100, "fast_v_attention_rank = 100 (pope_eval.py; 50 in chair_eval.py)",
              check=Range(0, note="as many as the image has tokens or more: every key is kept, no contrast"),
              grid=(50, 100, 200)),
    )  # fmt: skip
    plausible_only = True

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (SID_BRANCH,)

    def prune_at(self, config: Settings) -> tuple[int, int]:
        return config.param("layer") - 1, config.param("keep")

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return contrast(factual, [counterfactuals["sid"]], gamma=config.gamma, epsilon=config.epsilon)
