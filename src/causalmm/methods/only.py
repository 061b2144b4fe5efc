"""ONLY, One-Layer Intervention: one layer's attention, with its outliers and its text-dominated heads zeroed,
carried through the last layer's MLP to a second set of logits, fused with the factual ones adaptively; one pass.

Wan et al., ICCV 2025; official code github.com/zifuwan/ONLY, in its vendored
``transformers/src/transformers/models/llama/modeling_llama.py`` (``LlamaAttention``, ``LlamaDecoderLayer``,
``LlamaModel.forward``), ``experiments/llava/model/language_model/llava_llama.py`` and
``only_utils/only_sample.py``. At layer ``layer`` (0) the attention map ``softmax(QK^T / sqrt(d) + mask)`` is
recomputed on the side; in its text and image columns the entries above the group's mean plus one standard
deviation become 0 (no renormalisation); on the last query each group is renormalised and the heads whose
text-to-visual entropy ratio is below the mean over heads are zeroed; ``A = o_proj(P V)``, no residual. At the last
layer (31 in the official code) ``x = input_norm(A) + 0.2 h_in`` goes through that layer's MLP (attention not
re-run), the final norm, plus half the final normed hidden state, then the LM head: ``l_cd``. The fusion
(``only_sample.py``): ``d = sum |softmax(l) - softmax(l_cd)|``; if ``d < gamma`` then ``l + alpha_pos l_cd``,
else ``(1 + alpha_neg) l - alpha_neg l_cd``; ``-inf`` where ``l`` is below ``log(beta)`` plus its maximum; then
sampling (temperature 1, no top-k/top-p). Settings (``eval_bench/scripts/pope_eval.sh``, ``chair_eval.sh``,
``experiments/cd_scripts/mme_eval.sh``): ``a_pos 3``, ``a_neg 1``, layer 0; ``gamma`` 0.2 for POPE (the default
here), 0.25 CHAIR and MME; ``beta`` 0.1, 0.4 for MME.

Where this differs: the official code takes LLaVA-1.5's fixed spans (text ``[1:35]`` and ``[611:]``, image
``[35:611]``); here each row's spans come from its tokens (its first real key, BOS there, left out of the text
group as there). It computes ``d`` over the whole batch and picks heads with indices that mix batch and head when
the batch holds more than one sample; here both are per row. It runs in float16 (the model's dtype); here the side
map, its statistics and the fusion run in float32. Only the newest query's side output is computed, the only one
the next token reads. mitigv's ONLY runs a second full forward with its own KV cache and the chosen heads' weights
zeroed at ``layer``, with no outlier zeroing in the map, no last-layer shortcut and no 0.2/0.5 mixing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .base import Method, Param, Range, SideLogits
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ONLY", "only_scores"]


def only_scores(
    factual: torch.Tensor, side: torch.Tensor, *, gamma: float, alpha_pos: float, alpha_neg: float, epsilon: float
) -> torch.Tensor:
    """ONLY's fusion in float32: ``l + alpha_pos l_cd`` where the total variation ``sum |softmax(l) -
    softmax(l_cd)|`` is below ``gamma`` (collaborative), else ``(1 + alpha_neg) l - alpha_neg l_cd``
    (contrastive); ``-inf`` where ``l`` is below ``log(epsilon)`` plus its maximum. Both alphas 0 return ``l``
    whole.

    >>> l, s = torch.tensor([2.0, 1.0, -3.0]), torch.tensor([1.0, 2.0, 0.0])
    >>> only_scores(l, s, gamma=2.0, alpha_pos=3.0, alpha_neg=1.0, epsilon=0.1)  # d < 2: collaborative
    tensor([5., 7., -inf])
    >>> only_scores(l, s, gamma=0.1, alpha_pos=3.0, alpha_neg=1.0, epsilon=0.1)  # d >= 0.1: contrastive
    tensor([3., 0., -inf])
    """
    lf = factual.float()
    if alpha_pos == 0 and alpha_neg == 0:
        return lf
    ls = side.float()
    d = (torch.softmax(lf, -1) - torch.softmax(ls, -1)).abs().sum()
    z = lf + alpha_pos * ls if d < gamma else (1 + alpha_neg) * lf - alpha_neg * ls
    if epsilon > 0:
        z = z.masked_fill(lf < lf.max() + math.log(epsilon), float("-inf"))
    return z


@register
class ONLY(Method):
    name = "only"
    summary = "one layer's attention without its text-dominated heads, through the last MLP, fused adaptively"
    reference = "Wan et al., ICCV 2025; github.com/zifuwan/ONLY, vendored modeling_llama.py, only_utils/only_sample.py"
    params = (
        Param("gamma", 0.2, "js_gamma 0.2 (pope_eval.sh; CHAIR, MME 0.25): below it the fusion adds the side logits",
              grid=(0.2, 0.25, 0.6)),
        Param("epsilon", 0.1, "ritual_beta 0.1 (pope_eval.sh, chair_eval.sh; MME 0.4)", grid=(0.1, 0.4)),
        Param("alpha_pos", 3.0, "ritual_alpha_pos 3 (every script)", check=Range(0, 100, note="0 = none")),
        Param("alpha_neg", 1.0, "ritual_alpha_neg 1 (every script)", check=Range(0, 100, note="0 = none")),
        Param("layer", 0, "enhance_layer_index 0 (every script)",
              check=Range(0, note="an LLM layer index"), accepts="[0, LLM layers - 1] (checked with the model)"),
    )  # fmt: skip

    def factual_edit(self, config: Settings) -> SideLogits | None:
        if config.param("alpha_pos") == 0 and config.param("alpha_neg") == 0:
            return None  # the rule reads no side logits: the model's own run
        return SideLogits(config.param("layer"))

    def combine(
        self,
        factual: torch.Tensor,
        counterfactuals: dict[str, torch.Tensor],
        config: Settings,
        step: int,
        exits: dict | None = None,
    ) -> torch.Tensor:
        if not exits:
            return factual
        return only_scores(
            factual, exits["side"], gamma=config.gamma, alpha_pos=config.param("alpha_pos"),
            alpha_neg=config.param("alpha_neg"), epsilon=config.epsilon,
        )  # fmt: skip
