"""The decoding rule's tensor functions: the plausibility cut and the CausalMM contrast of the factual and
counterfactual logits (``docs/method.md#4-the-decoding-rule``). Pure functions, below both the methods that
combine logits with them and the engine that selects tokens after them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["contrast", "plausible"]


def plausible(factual: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Bool mask ``(..., vocab)`` of the tokens whose factual probability is at least ``epsilon`` times the
    maximum (all tokens for ``epsilon = 0``). In logits: ``l_i >= max_j l_j + log(epsilon)``, since the softmax
    shares one normaliser.

    >>> plausible(torch.tensor([2.0, 1.0, -3.0]), 0.1)
    tensor([ True,  True, False])
    """
    fl = factual.float()
    return fl >= fl.amax(-1, keepdim=True) + (math.log(epsilon) if epsilon > 0 else -math.inf)


def contrast(
    factual: torch.Tensor, counterfactuals: list[torch.Tensor], *, gamma: float, epsilon: float
) -> torch.Tensor:
    """The CausalMM rule for next-token logits ``(..., vocab)``, in float32.

    ``z = l + gamma * sum_b (l - l_b)``, then ``z = -inf`` wherever the factual probability is below
    ``epsilon`` times the factual maximum. Taken on raw logits: on log-probabilities it would differ by one
    constant per row only (``docs/method.md#why-the-contrast-is-taken-on-raw-logits-only``). ``gamma = 0`` is no
    contrast, so no cut either: the factual logits as they are, so that sampling and beam search (which read the
    whole distribution, not only its top) reproduce regular decoding too.

    >>> l = torch.tensor([2.0, 1.0, -3.0]); lb = torch.tensor([1.0, 1.5, -3.0])
    >>> contrast(l, [lb], gamma=1.0, epsilon=0.1)
    tensor([3.0000, 0.5000,   -inf])
    """
    fl = factual.float()
    if gamma == 0:
        return fl
    z = fl + gamma * sum((fl - c.float() for c in counterfactuals), torch.zeros_like(fl))
    return z.masked_fill(~plausible(factual, epsilon), float("-inf"))
