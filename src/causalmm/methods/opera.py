"""OPERA: beam search with an over-trust penalty on the column-wise pattern of the answer's self-attention, and
retrospection-allocation (a rollback to just after a token the answer keeps staring at).

Huang et al., CVPR 2024; official code github.com/shikiw/OPERA, ``transformers-4.29.2/src/transformers/
generation/utils.py``, ``opera_beam_search``. Each step, for each beam: the ``candidates`` tokens of highest logit;
for each, the last LLM layer's attention (maximum over heads, each row renormalised over all its keys) of the
answer so far and of the candidate, restricted to the answer's tokens (rows and columns from the first answer
token on), scaled by ``scale``; the over-trust score of column ``j`` is ``1e-7 * prod_{i >= j} w[i, j]``, held
in float16 as there (so it saturates to ``inf``: such a candidate is out), and the candidate's penalty is the
largest column score, or, while the answer has at most 10 tokens, minus its attention on the image tokens. A
candidate's score is its logit minus ``penalty`` times its penalty, every other token is ``-999``, and the beams
go on from the log-softmax of that. Each beam keeps, per step, the column its candidates' scores peak at (the
mode over candidates); when every beam's history holds the batch's current mode more than ``threshold`` times,
and it is at least token 10, the answer is rolled back to just after that token (a position is retried at most
``candidates`` times, then the one before it once more), the continuations chosen there are banned, and that
step is decided again from the model's whole distribution.

Defaults: 5 beams, scale 50, threshold 15, 5 candidates, penalty 1 (``chair_eval.py``, ``pope_eval.py``); the
fast setting its maintainers recommend is ``threshold=25``, ``candidates=1`` (README, issue #3). Where this
differs from the official code (README "Where the baselines differ"): beams are ``transformers`` 5's search
(its length penalty counts answer tokens; 4.29's counted the prompt too); a batch of prompts runs together,
each with its own rollback (the official code runs one prompt); the candidates' attention comes from one forward
in which each candidate sees the cache and itself; a rollback re-encodes the kept answer tokens on the cached
prompt instead of prefilling the image again; the bans of positions after a rollback point are cleared (the
official code clears list entries from the end of its 512-slot buffer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..settings import MAX_BEAMS
from .base import Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["OPERA", "opera_penalty", "over_trust", "rollback_position"]

#: the answer length up to which the penalty is the (negated) attention on the image instead of the over-trust
IMAGE_STEPS = 10
#: no rollback to a token before this one
MIN_ROLLBACK = 10
#: how many past steps a rollback can reach (the official history buffer)
HISTORY = 512
#: the most candidates per beam: each beam's are fed as a block of queries at every step (5 official, 1 fast)
MAX_CANDIDATES = 64


def over_trust(window: torch.Tensor, scale: float) -> torch.Tensor:
    """Column scores ``(..., n)`` of a lower-triangular attention window ``(..., n, n)`` (rows: queries, columns:
    keys, both the answer's tokens): ``1e-7 * prod_{i >= j} scale * w[i, j]``, in float16 as the official code
    keeps them.

    >>> w = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> over_trust(w, 10.0)  # column 0: 10 * 5 * 1e-7, column 1: 5 * 1e-7
    tensor([5.0068e-06, 5.0068e-07], dtype=torch.float16)
    """
    n = window.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=window.device).tril()  # row i >= column j
    scaled = torch.where(below, scale * window.float(), torch.ones((), device=window.device))
    return (1e-7 * scaled.prod(-2)).to(torch.float16)


def opera_penalty(window: torch.Tensor, on_image: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's penalty and the column its over-trust peaks at, from its attention window ``(..., n, n)``
    (its own row last) and its attention on the image tokens ``(...)``: minus that attention while the window
    has at most :data:`IMAGE_STEPS` tokens, the largest column score after.

    >>> w = torch.tensor([[[1.0, 0.0], [0.9, 0.1]]])
    >>> opera_penalty(w, torch.tensor([0.3]), 50.0)  # 2 tokens: the image term
    (tensor([-0.3000]), tensor([0]))
    """
    scores = over_trust(window, scale)
    peak, where = scores.max(-1)
    n = window.shape[-1]
    penalty = -on_image.float() if n <= IMAGE_STEPS else peak.float()
    return penalty, where


def rollback_position(
    history: list[list[int]], loc: int, threshold: int, used: dict[int, int], candidates: int, length: int
) -> int | None:
    """Where to roll back to (the index of the answer token decided again), or ``None``.

    ``history``: per beam, the column its candidates' scores peaked at in each step; ``loc``: this step's mode
    over the batch's beams; ``used``: rollbacks so far per position (updated); ``length``: the window's size.
    Every beam must have peaked at ``loc`` more than ``threshold`` times, ``loc`` must be at least
    :data:`MIN_ROLLBACK`, and a position is retried at most ``candidates`` times (then the one before it).

    >>> rollback_position([[12] * 16, [12] * 16], 12, 15, {}, 5, 20)
    13
    >>> rollback_position([[12] * 15, [12] * 16], 12, 15, {}, 5, 20) is None  # one beam at 15: not more than 15
    True
    """
    if not all(sum(1 for h in beam if h == loc) > threshold for beam in history) or loc < MIN_ROLLBACK:
        return None
    pos = loc + 1
    if used.get(pos, 0) >= candidates:
        pos -= 1
        if used.get(pos, 0) >= candidates:
            return None
    used[pos] = used.get(pos, 0) + 1
    if length - pos > HISTORY + 1:
        pos = max(1, length - HISTORY - 1)
    return pos


@register
class OPERA(Method):
    name = "opera"
    summary = "beam search penalising candidates whose attention over-trusts a few answer tokens, with rollback"
    reference = "Huang et al., CVPR 2024; github.com/shikiw/OPERA, transformers-4.29.2 generation/utils.py"
    params = (
        Param("beams", 5, "--beam 5 (README, chair_eval.py); num_beams > 1 given to generate overrides it",
              check=Range(2, MAX_BEAMS, note=f"OPERA is a beam search, so >= 2; at most {MAX_BEAMS}, as num_beams"),
              vocab_bound=True),
        Param("scale", 50.0, "scale_factor = 50 (chair_eval.py, pope_eval.py)", check=Range(0, low_open=True)),
        Param("threshold", 15, "threshold = 15 (the fast setting: 25)",
              check=Range(0, note="above the answer's length: no rollback")),
        Param("candidates", 5, "num_attn_candidates = 5 (the fast setting: 1)",
              check=Range(1, MAX_CANDIDATES, note="each beam feeds its candidates as a block of queries every step"),
              vocab_bound=True, grid=(5, 1)),
        Param("penalty", 1.0, "penalty_weights = 1",
              check=Range(0, 100, note="0 = no penalty (the rollbacks remain); the penalty of the first 10 tokens "
                          "is the attention on the image (<= 1) times this"), grid=(1.0, 4.0)),
    )  # fmt: skip
    #: the engine runs this method's own search (:mod:`causalmm.decoding.opera`)
    search = "opera"

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return factual
