"""M3ID, Multi-Modal Mutual-Information Decoding: the contrast with the text-only prompt, weighted more as the
answer grows (the image's influence fades with the generated tokens).

Favero et al., CVPR 2024 (arXiv 2403.14003). No official code exists; we follow the paper's rule and the two
re-implementations: with ``gamma_t = exp(-lambda t)`` at the ``t``-th generated token (from 1), the scores are
``lc + (1 - gamma_t) / gamma_t * (lc - lu)`` on log-probabilities (``lc`` factual, ``lu`` text-only), applied only
where the factual top probability is below ``alpha`` (the model is unsure), the factual logits elsewhere. The
weight, the log-probabilities and ``t`` counted from 1 are sangminwoo/AvisC ``avisc_utils/avisc_sample.py``
(l.246-268, ``lamda = 0.02``), with its ``cd_beta = 0.1`` plausibility cut (``epsilon``; 0 turns it off); the
``alpha = 0.3`` gate is the paper's and mitigv's (``mitigv/algorithms/m3id.py``), which AvisC leaves out. The
text-only prompt is the chat template with the image left out. AvisC's version updates the wrong cache for its
text-only branch (its logits never see the answer); here the branch keeps its own cache like every branch.

A stable form where the official one overflows (:func:`m3id_weight`): the weight grows as ``e^{lamb t}``, so with a
large ``lamb`` or a long answer ``e^{-lamb t}`` underflows to 0 and the official division fails
(``ZeroDivisionError`` from ``lamb t`` near 745), and well before that the weighted scores overflow float32 to
``inf`` (``inf - inf`` is ``nan``, and the choice noise). Wherever the official scores are finite they are
computed exactly as there; where they are not, the weight is lowered to the largest one that keeps the plausible
tokens' scores below ``1e30`` (the weight's limit ranks them by ``lc - lu``, as this does), so every ``lamb`` >= 0
and every answer length decodes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..contrast import plausible
from .base import Branch, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["M3ID", "TEXT", "m3id_scores", "m3id_weight"]

TEXT = Branch("text", prompt="text")

#: the largest score the stable form lets a plausible token reach: far enough below float32's 3.4e38 that a
#: repetition penalty (at most 100) and the sampling warpers keep it finite
SCORE_LIMIT = 1e30


def m3id_weight(lamb: float, t: int) -> float:
    """``w_t = (1 - e^{-lamb t}) / e^{-lamb t}`` as the official code computes it, and ``inf`` (its limit) where
    ``e^{-lamb t}`` underflows to 0 and that division would raise ``ZeroDivisionError``.

    >>> m3id_weight(math.log(2), 1), m3id_weight(0.02, 10**6)
    (1.0, inf)
    """
    keep = math.exp(-lamb * t)
    return (1.0 - keep) / keep if keep > 0.0 else math.inf


def m3id_scores(
    factual: torch.Tensor, text: torch.Tensor, *, t: int, lamb: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """The M3ID rule for the ``t``-th generated token (``t >= 1``), in float32: where ``max p_factual < alpha``,
    ``lc + w_t (lc - lu)`` with ``w_t = (1 - e^{-lamb t}) / e^{-lamb t}`` and ``-inf`` outside the ``epsilon`` cut;
    elsewhere ``lc`` (the factual log-probabilities, which select the same token as the logits).

    >>> lc = torch.tensor([0.5, 0.25, 0.25]).log(); lu = torch.tensor([0.25, 0.5, 0.25]).log()
    >>> m3id_scores(lc, lu, t=1, lamb=math.log(2), alpha=0.6, epsilon=0.1)  # w_1 = (1 - 1/2) / (1/2) = 1: 2 lc - lu
    tensor([ 0.0000, -2.0794, -1.3863])
    """
    lc = torch.log_softmax(factual.float(), -1)
    lu = torch.log_softmax(text.float(), -1)
    w = m3id_weight(lamb, t)
    if w == 0.0:  # no contrast (lamb = 0), so no cut: regular decoding in every mode, beam search included
        return lc
    kept = plausible(factual, epsilon)
    z = (lc + w * (lc - lu)).masked_fill(~kept, float("-inf"))
    if not torch.isfinite(z[kept]).all():  # the official form overflows here: the stable form (module notes)
        d = (lc - lu).masked_fill(~kept, 0.0)
        span = float(d.abs().amax())
        w = min(w, SCORE_LIMIT / span) if span > 0 else 0.0
        z = (lc + w * d).masked_fill(~kept, float("-inf"))
    unsure = lc.amax(-1, keepdim=True) < math.log(alpha) if alpha < 1 else torch.ones_like(lc[..., :1], dtype=bool)
    return torch.where(unsure, z, lc)


@register
class M3ID(Method):
    name = "m3id"
    summary = "contrast with the text-only prompt, weighted up as the answer grows, where the model is unsure"
    reference = "Favero et al., CVPR 2024 (no official code); sangminwoo/AvisC avisc_utils/avisc_sample.py"
    params = (
        Param("epsilon", 0.1, "AvisC's cd_beta = 0.1 cut (mitigv has none: epsilon=0)", grid=(0.01, 0.1)),
        Param("lamb", 0.02, "lambda = 0.02, the forgetting rate (AvisC's lamda, mitigv's forgetting_rate)",
              check=Range(0, note="0 = no contrast; any size decodes: the weight's stable form"),
              grid=(0.02, 0.2, 1.0)),
        Param("alpha", 0.3, "the paper's confidence gate (mitigv's alpha = 0.3; AvisC has none: alpha=1)",
              check=Range(0, 1, low_open=True, note="1 = contrast at every step"), grid=(0.3, 1.0)),
    )  # fmt: skip

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (TEXT,)

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return m3id_scores(
            factual, counterfactuals["text"], t=step + 1, lamb=config.param("lamb"), alpha=config.param("alpha"),
            epsilon=config.epsilon,
        )  # fmt: skip
