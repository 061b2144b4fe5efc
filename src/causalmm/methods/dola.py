"""DoLa, Decoding by Contrasting Layers: the final layer's log-probabilities against those of a premature layer
chosen at each step as the one whose distribution is furthest from the final one (Jensen-Shannon divergence).

Chuang et al., ICLR 2024; official code github.com/voidism/DoLa, as ``transformers`` carried it up to 4.52
(``generation/utils.py``: ``_dola_decoding``, ``_dola_select_contrast``, ``_relative_top_filter``; now the Hub
repository ``transformers-community/dola``). Early-exit logits are the LM head on a layer's hidden state with no
final norm, as there. Candidates (``layers``): ``low`` = ``hidden_states`` indices ``start, start+2, ... < N/2``,
``high`` = ``N/2, N/2+2, ... < N`` (the last 20 layers' even ones above 40 layers), with ``start`` 0, or 2 where
the embeddings are tied (an early exit from them would be the identity); or a list of indices. The rule:
``log_softmax(final) - log_softmax(premature)``, ``-inf`` where the final probability is below ``epsilon``
(``relative_top = 0.1``) times its maximum. The official code picks one premature layer per step for the whole
batch (the divergence averaged over it); here each prompt picks its own, so no answer depends on its batch.
``gamma`` weighs the premature term (``gamma = 1`` is the official rule, 0 regular decoding). The authors pair
DoLa with ``repetition_penalty = 1.2``; that is the caller's choice, as in ``transformers``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..settings import resolve_layers
from .base import Method, Param, layer_spec_check
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["DoLa", "candidate_layers", "dola_scores", "jensen_shannon"]


def candidate_layers(spec: str, n_layers: int, tied: bool) -> tuple[int, ...]:
    """The premature candidates ``spec`` names among ``hidden_states`` indices of an ``n_layers``-layer LLM.

    >>> candidate_layers("low", 32, tied=False), candidate_layers("high", 32, tied=False)[:3]
    ((0, 2, 4, 6, 8, 10, 12, 14), (16, 18, 20))
    """
    if spec in ("low", "high"):
        start = 0 if not tied else (2 if n_layers > 2 else 1 if n_layers == 2 else 0)
        if spec == "low":
            if start == n_layers // 2:
                return (start,)
            return tuple(range(start, n_layers // 2 if n_layers <= 40 else 20, 2))
        return tuple(range(n_layers // 2, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
    return tuple(resolve_layers(spec, n_layers, what="DoLa candidate layer"))


def jensen_shannon(final: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """``0.5 * (KL(M || p_final) + KL(M || p_premature))`` with ``M`` their mean, each KL averaged over the
    vocabulary, as ``_dola_select_contrast`` computes it; ``premature`` is ``(layers, vocab)``, the result
    ``(layers,)``."""
    lf, lp = F.log_softmax(final.float(), -1), F.log_softmax(premature.float(), -1)
    m = 0.5 * (lf.exp() + lp.exp())
    kl_f = F.kl_div(lf.expand_as(lp), m, reduction="none").mean(-1)
    kl_p = F.kl_div(lp, m, reduction="none").mean(-1)
    return 0.5 * (kl_f + kl_p)


def dola_scores(final: torch.Tensor, premature: torch.Tensor, *, epsilon: float, gamma: float = 1.0) -> torch.Tensor:
    """``log_softmax(final) - gamma * log_softmax(premature)``, ``-inf`` where the final log-probability is below
    its maximum plus ``log(epsilon)`` (the relative-top filter; at least the top token is kept).

    >>> dola_scores(torch.tensor([0.5, 0.25, 0.25]).log(), torch.tensor([0.25, 0.5, 0.25]).log(), epsilon=0.1)
    tensor([ 0.6931, -0.6931,  0.0000])
    """
    lf, lp = F.log_softmax(final.float(), -1), F.log_softmax(premature.float(), -1)
    if gamma == 0:  # no contrast, so no filter: regular decoding in every mode, beam search included
        return lf
    if epsilon > 0:
        lf = lf.masked_fill(lf < lf.max(-1, keepdim=True).values + math.log(epsilon), float("-inf"))
    return lf - gamma * lp


@register
class DoLa(Method):
    name = "dola"
    summary = "contrast the final layer with the premature layer furthest from it (no extra branch)"
    reference = "Chuang et al., ICLR 2024; github.com/voidism/DoLa, transformers<=4.52 _dola_decoding"
    params = (
        Param("gamma", 1.0, "the official rule subtracts the premature log-probabilities once (0: regular)"),
        Param("epsilon", 0.1, "relative_top = 0.1 (transformers' fixed value, the paper's alpha)", grid=(0.01, 0.1)),
        Param("layers", "low", "hidden_states 0, 2, ..., 14 of a 32-layer LLM (the DoLa README; transformers' "
              "dola_layers='low'; 'high' is its choice for short answers)",
              check=layer_spec_check("DoLa candidate layer", ("low", "high")),
              accepts="low | high | layer indices and ranges of hidden_states (0 = the embeddings), checked with the "
              "model", grid=("low", "high")),
    )  # fmt: skip

    def exit_layers(self, config: Settings, n_layers: int, tied: bool) -> tuple[int, ...]:
        return candidate_layers(config.param("layers"), n_layers, tied)

    def combine(
        self,
        factual: torch.Tensor,
        counterfactuals: dict[str, torch.Tensor],
        config: Settings,
        step: int,
        exits: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        layers = sorted(exits)
        premature = torch.stack([exits[i] for i in layers])
        pick = 0 if len(layers) == 1 else int(jensen_shannon(factual, premature).argmax())
        return dola_scores(factual, premature[pick], epsilon=config.epsilon, gamma=config.gamma)
