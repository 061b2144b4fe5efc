"""AvisC, Attentional Vision Calibration: the contrast with a branch that sees only the "blind" image tokens, the
few the model attends to far more than the rest, the others' features zeroed.

Woo et al., 2024 (arXiv 2405.17820); official code github.com/sangminwoo/AvisC. At the prefill
(``avisc_utils/avisc_sample.py`` l.151-179), the last prompt token's attention on the image tokens, averaged over
heads, is summed per layer; the layers holding the top ``layer_gamma`` (0.5) share of that attention are kept
(``count_top_p``), their maps averaged, and the image tokens below ``mean + lamb * std`` of them (``lamb = 1``, the
unbiased std over the image tokens) have their embeddings zeroed in the branch (``masking_scheme = "zeros"``,
``llava_llama.py`` l.93-112), which keeps its own cache from then on. The rule is VCD's ``(1 + alpha) l - alpha
l_blind`` on raw logits under the ``beta = 0.1`` cut (l.203-214), ``alpha = 1``; the defaults are
``eval_bench/scripts/pope_eval_batch.sh`` (``pope_eval_llavab.py``'s argparse has ``lamb = 0.99``). The official
code takes LLaVA-1.5's fixed image span at batch size 1; here each prompt's own image tokens, in any batch. The
attention is read in a probe prefill of the factual rows (one prefill more per call, no cost per token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contrast import contrast
from .base import Branch, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["AvisC", "BLIND", "zeroed_tokens"]

BLIND = Branch("blind", blind=True)


def zeroed_tokens(attention: dict[int, torch.Tensor], *, layer_gamma: float, lamb: float) -> torch.Tensor:
    """The image tokens AvisC's branch zeroes (a boolean mask): those whose attention, averaged over the layers
    that hold the top ``layer_gamma`` share of the attention on the image, is below ``mean + lamb * std``.

    ``attention[layer]``: the last prompt token's attention on each image token, averaged over heads.

    >>> a = {0: torch.tensor([0.1, 0.1, 0.1, 0.7]), 1: torch.tensor([0.0, 0.1, 0.0, 0.0])}
    >>> zeroed_tokens(a, layer_gamma=0.5, lamb=1.0)  # layer 0 holds 1.0 of 1.1: it alone; token 3 stands out
    tensor([ True,  True,  True, False])
    """
    layers = sorted(attention)
    held = torch.stack([attention[i].float().sum() for i in layers])
    share = held / held.sum().clamp_min(1e-12)
    order = share.argsort(descending=True, stable=True)
    k = int((share[order].cumsum(0) < layer_gamma).sum()) + 1
    mean_map = torch.stack([attention[layers[int(i)]].float() for i in order[:k]]).mean(0)
    spread = mean_map.std() if mean_map.numel() > 1 else mean_map.new_zeros(())
    return mean_map < mean_map.mean() + lamb * spread


@register
class AvisC(Method):
    name = "avisc"
    summary = "contrast with a branch that keeps only the image tokens attended far above the rest"
    reference = "Woo et al., 2024 (arXiv 2405.17820); github.com/sangminwoo/AvisC, avisc_utils/avisc_sample.py"
    params = (
        Param("gamma", 1.0, "cd_alpha = 1 (pope_eval_batch.sh; its unused alternative list has 3)",
              grid=(1.0, 2.0, 4.0)),
        Param("epsilon", 0.1, "cd_beta = 0.1"),
        Param("layer_gamma", 0.5, "layer_gamma = 0.5: the layers holding this share of the image attention",
              check=Range(0, 1, low_open=True)),
        Param("lamb", 1.0, "lamb = 1 (pope_eval_batch.sh): blind means above mean + lamb * std",
              check=Range(0, 100, note="no token stands more than sqrt(n) std above the mean of n, so from about "
                          "sqrt(image tokens) on every token is zeroed; 100 covers 10,000 image tokens"),
              grid=(0.5, 1.0)),
    )  # fmt: skip
    plausible_only = True

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (BLIND,)

    def blind_tokens(self, attention: dict[int, torch.Tensor], config: Settings) -> torch.Tensor:
        return zeroed_tokens(attention, layer_gamma=config.param("layer_gamma"), lamb=config.param("lamb"))

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return contrast(factual, [counterfactuals["blind"]], gamma=config.gamma, epsilon=config.epsilon)
