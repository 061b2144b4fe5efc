"""DeCo, Dynamic Correction Decoding: the early layer most confident about the final layer's candidate tokens
is mixed into the final logits, because an MLLM's middle layers still see objects its last layers talk over.

Wang et al., ICLR 2025 ("MLLM can see? Dynamic Correction Decoding for Hallucination Mitigation"); official code
github.com/zjunlp/Deco, its patched ``transformers/generation/utils.py`` (``deco_greedy_search`` and
``deco_sample_search``). Per step: the candidates are the final layer's top-``top_k`` (20) tokens cut at
cumulative probability ``top_p`` (0.9, at least one); among the early layers (``hidden_states`` 20..28 of
LLaVA-1.5's 32: the LM head after the final norm, as its ``modeling_llama.py`` computes them), the anchor is the
layer holding the largest probability ``m`` of any candidate; the scores are ``final + alpha * m * anchor`` on the
candidates and ``-inf`` elsewhere, ``alpha = 0.6`` (its scripts; the README's table shows 0.5). ``layers="auto"``
takes the same share of the depth on another LLM (5/8 to 7/8 of it). The official code is for batch size 1;
here each prompt picks its own anchor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..settings import resolve_layers
from .base import Method, Param, Range, layer_spec_check
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["DeCo", "deco_scores", "deco_layers"]


def deco_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """The candidate early layers (``hidden_states`` indices): ``auto`` is 20..28 of 32 and the same share of
    another depth, else a layer spec.

    >>> deco_layers("auto", 32)
    (20, 21, 22, 23, 24, 25, 26, 27, 28)
    """
    if spec == "auto":
        lo, hi = round(n_layers * 20 / 32), round(n_layers * 28 / 32)
        return tuple(range(max(lo, 1), min(max(hi, lo), n_layers - 1) + 1))
    return tuple(resolve_layers(spec, n_layers, what="DeCo early layer"))


def deco_scores(
    final: torch.Tensor, early: torch.Tensor, *, alpha: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, int]:
    """DeCo's scores for one prompt from the final logits ``(vocab,)`` and the early layers' ``(layers, vocab)``,
    and the anchor (an index into ``early``).

    >>> final = torch.tensor([2.0, 1.0, 0.0, -5.0]); early = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    >>> z, anchor = deco_scores(final, early, alpha=1.0, top_k=2, top_p=0.9)  # candidates 0 and 1; layer 0 wins
    >>> anchor, z[:2] - final[:2] - early[0, :2] * torch.softmax(early[0], -1)[1], z[2:]
    (0, tensor([0., 0.]), tensor([-inf, -inf]))
    """
    fl = final.float()
    if alpha == 0:  # nothing mixed in, so no candidate cut: regular decoding in every mode, beam search included
        return fl, 0
    probs, ids = torch.softmax(fl, -1).topk(min(top_k, fl.shape[-1]))
    n = min(int(torch.searchsorted(probs.cumsum(-1), torch.tensor(top_p, device=fl.device))) + 1, ids.numel())
    cand = ids[:n]
    held = torch.softmax(early.float(), -1)[:, cand]  # (layers, candidates)
    best = int(held.argmax())
    anchor, m = best // cand.numel(), held.flatten()[best]
    z = torch.full_like(fl, float("-inf"))
    z[cand] = fl[cand] + alpha * m * early[anchor].float()[cand]
    return z, anchor


@register
class DeCo(Method):
    name = "deco"
    summary = "mix the early layer most confident about the candidate tokens into the final logits (no branch)"
    reference = "Wang et al., ICLR 2025; github.com/zjunlp/Deco, transformers/generation/utils.py deco_greedy_search"
    params = (
        Param("alpha", 0.6, "alpha = 0.6 (every script's --alpha; 0: regular decoding)",
              check=Range(0, 100, note="0 = regular decoding; the scripts use 0.1 to 1"), grid=(0.2, 0.6, 1.0)),
        Param("top_k", 20, "threshold_top_k = 20", check=Range(1), vocab_bound=True),
        Param("top_p", 0.9, "threshold_top_p = 0.9", check=Range(0, 1, low_open=True)),
        Param("layers", "auto", "start_layer 20, end_layer 29 (exclusive) of LLaVA-1.5's 32",
              check=layer_spec_check("DeCo early layer", ("auto",)),
              accepts="auto | layer indices and ranges of hidden_states, checked with the model",
              grid=("auto", "deep")),
    )  # fmt: skip
    exit_norm = True

    def exit_layers(self, config: Settings, n_layers: int, tied: bool) -> tuple[int, ...]:
        return deco_layers(config.param("layers"), n_layers)

    def combine(
        self,
        factual: torch.Tensor,
        counterfactuals: dict[str, torch.Tensor],
        config: Settings,
        step: int,
        exits: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        early = torch.stack([exits[i] for i in sorted(exits)])
        z, _ = deco_scores(
            factual, early, alpha=config.param("alpha"), top_k=config.param("top_k"), top_p=config.param("top_p")
        )
        return z
