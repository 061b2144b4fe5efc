"""Counterfactual next-token logits only where the plausibility cut lets them count.

The decoding rule (``docs/method.md``, section 4) sets the score to ``-inf`` wherever the factual probability is
below ``epsilon`` times its maximum, so a counterfactual row's logits matter on that plausible set only: usually a
handful of tokens out of a vocabulary of 32k-150k. During decoding the engine therefore runs the LM head on the factual
rows alone (:func:`head_on_rows` hands the head those rows' hidden states and keeps the whole batch's), and
:func:`plausible_logits` computes the counterfactual rows' logits on the union of the batch's plausible sets.
Outside that set a counterfactual row gets its factual row's logits, where the contrast is masked anyway.

Only a rule that reads the plausible tokens alone allows it (``Method.plausible_only``), and only a plain
``nn.Linear`` head whose output the model returns unchanged (no soft-capping or scaling after it): the engine
checks both (:attr:`causalmm.adapters.Adapter.plain_lm_head`). On a GPU at batch 2-3 the head is memory-bound
and this saves little; on a CPU whose BLAS pays per row it removes most of a counterfactual row's head cost
(``speed/README.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .rule import plausible

__all__ = ["DENSE_FRACTION", "dense_logits", "head_on_rows", "plausible_logits"]

#: above ``1 / DENSE_FRACTION`` of the vocabulary plausible, the counterfactual rows get the whole head: copying
#: that many rows of its weight would cost more than the product it saves
DENSE_FRACTION = 4


def dense_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a few rows ``(rows, d)``, laid out ``W @ hidden.T``: the same product, which a CPU
    BLAS runs several times faster for 2-8 rows than ``F.linear``'s ``hidden @ W.T`` (``speed/README.md``: one row
    costs the same either way; on a GPU both read the weight once)."""
    logits = (head.weight @ hidden.to(head.weight.dtype).T).T
    return logits if head.bias is None else logits + head.bias


@contextmanager
def head_on_rows(head: torch.nn.Module, rows: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, ``head`` computes only batch rows ``rows`` of its input (so the model returns logits of those rows,
    in that order); the yielded dict's ``"hidden"`` holds the whole input of the last call."""
    kept: dict[str, torch.Tensor] = {}

    def pre(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        kept["hidden"] = hidden
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        return (hidden.index_select(0, index), *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield kept
    finally:
        handle.remove()


def plausible_logits(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    factual: torch.Tensor,
    factual_of: list[int],
    counterfactual: list[int],
    epsilon: float,
) -> torch.Tensor:
    """Next-token logits ``(rows, vocab)`` (float32) of every row, exact wherever the contrast reads them.

    ``hidden``: every row's last hidden state ``(rows, d)``; ``factual``: the factual rows' logits ``(F, vocab)``;
    ``factual_of[j]``: the factual row (an index into ``factual``) of row ``j``'s prompt; ``counterfactual``: the
    rows whose logits are computed here, on the columns some factual row finds plausible (on all of them where
    more than ``1 / DENSE_FRACTION`` of the vocabulary is). Every other entry of a counterfactual row is its
    factual row's logit; a factual row gets its own logits whole.
    """
    fl = factual.float()
    out = fl[torch.tensor(factual_of, device=fl.device)]
    if not counterfactual:
        return out
    idx = torch.tensor(counterfactual, device=fl.device)
    h = hidden.index_select(0, idx.to(hidden.device))
    cols = plausible(fl, epsilon).any(0).nonzero().squeeze(1)
    if cols.numel() * DENSE_FRACTION > fl.shape[-1]:
        # a flat distribution keeps much of the vocabulary: slicing the weight would cost more than the head
        out[idx] = head(h).float().to(out.device)
        return out
    bias = None if head.bias is None else head.bias[cols]
    sub = F.linear(h, head.weight[cols], bias).float()
    out[idx[:, None], cols[None, :]] = sub.to(out.device)
    return out
