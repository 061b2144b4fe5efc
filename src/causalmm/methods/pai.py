"""PAI, Paying more Attention to Image: the factual run's attention on the image amplified, and the contrast with
the text-only prompt on log-probabilities.

Liu et al., ECCV 2024; official code github.com/LALBJ/PAI. The edit is ``attention.py`` (``llama_new_forward``): in
layers ``start_layer`` (2) to the last, the newest query's pre-softmax scores ``x`` on the image keys become
``x + alpha * |x|``, every head, ``alpha = 0.2``. The contrast is ``CFG.py`` (``CFGLogits``):
``gamma * s - (gamma - 1) * u`` with ``s, u`` the log-softmax of the edited and the text-only logits, ``-inf``
where ``s < log(0.1) + max s``; the text-only prompt is the same prompt with the image left out
(``model_loader.py``), on its own cache, without the edit. ``gamma = 1.1`` is the README's command
(``--gamma 1.1``; the scripts' argparse default is 2); greedy, as those commands decode.

One detail of the official code is kept on purpose: with the contrast on (``--use-cfg``), the prefill runs with
the edit switched off, so the first answer token is not edited (``edit_prefill=True`` edits it, as the paper
describes; GitHub issue LALBJ/PAI#22 asks about it). The engine finds each row's image keys from its tokens, where
the official code takes LLaVA's fixed span of 576 tokens after the system prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contrast import plausible
from .base import Branch, FactualEdit, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["PAI", "pai_scores"]

TEXT = Branch("text", prompt="text")
#: the strongest boost: ``x + alpha |x|`` multiplies an image key's score by up to 1 + alpha before the softmax
ALPHA_MAX = 10.0


def pai_scores(factual: torch.Tensor, text: torch.Tensor, *, gamma: float, epsilon: float) -> torch.Tensor:
    """PAI's rule in float32: ``gamma * s - (gamma - 1) * u`` on log-softmax scores, ``-inf`` where the factual
    probability is below ``epsilon`` times its maximum.

    >>> s = torch.tensor([0.5, 0.25, 0.25]).log(); u = torch.tensor([0.25, 0.5, 0.25]).log()
    >>> pai_scores(s, u, gamma=2.0, epsilon=0.1)  # 2 s - u
    tensor([ 0.0000, -2.0794, -1.3863])
    """
    s = torch.log_softmax(factual.float(), -1)
    if gamma == 1.0:  # no contrast, so no cut: the (edited) factual scores whole, for sampling and beams too
        return s
    u = torch.log_softmax(text.float(), -1)
    return (gamma * s - (gamma - 1.0) * u).masked_fill(~plausible(factual, epsilon), float("-inf"))


@register
class PAI(Method):
    name = "pai"
    summary = "amplify the factual run's attention on the image, and contrast with the text-only prompt"
    reference = "Liu et al., ECCV 2024; github.com/LALBJ/PAI, attention.py and CFG.py"
    params = (
        Param("gamma", 1.1, "gamma = 1.1, the README's commands (the scripts' argparse default is 2; 1: no contrast)",
              grid=(1.1, 2.0)),
        Param("epsilon", 0.1, "the fixed log(0.1) cut of CFG.py"),
        Param("alpha", 0.2, "alpha = 0.2 (the README and argparse default; 0: no edit)",
              check=Range(0, ALPHA_MAX, note="0 = no edit; the paper sweeps up to 1, and above 10 the boosted "
                          "scores can overflow a float16 model's attention"), grid=(0.2, 0.5, 1.0)),
        Param("start_layer", 2, "layers 2 to the last (start_layer 2, end_layer 32 of LLaVA-1.5's 32)",
              check=Range(0, note="a layer index"), accepts="[0, LLM layers - 1] (checked with the model)"),
        Param("edit_prefill", False, "the official code edits decode steps only when the contrast is on",
              grid=(False, True)),
    )  # fmt: skip

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (TEXT,)

    def factual_edit(self, config: Settings) -> FactualEdit | None:
        if config.param("alpha") == 0:
            return None
        return FactualEdit(config.param("alpha"), config.param("start_layer"), config.param("edit_prefill"))

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return pai_scores(factual, counterfactuals["text"], gamma=config.gamma, epsilon=config.epsilon)
