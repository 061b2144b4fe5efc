"""VAF, Visual Amplification Fusion (ClearSight): in the middle layers of the LLM, the attention of the text after
the image amplified on the image and damped on the system prompt, in one pass (no branch).

Yin et al., CVPR 2025; official code github.com/ustc-hyin/ClearSight. The edit is
``visaug/inference/AttnAdapter.py``: the pre-softmax scores ``S = QK^T / sqrt(d)`` of every query after the image
are multiplied by ``enhance`` on the image keys and by ``suppress`` on the keys before the image, before the mask is
added; ``infer_pope.py`` swaps it into LLaVA-1.5's layers 9 to 14 (``i > 8 and i < 15``), with
``--enh-para 1.15 --sup-para 0.95`` in ``infer_pope.sh``; greedy. The official code hard-codes LLaVA-1.5's spans
(35 system-prompt tokens, then 576 image tokens); here each row's spans come from its own tokens (the keys before
its first image token, its image tokens, the queries after its last), so the method runs on any family and
template. A score is multiplied whatever its sign, as there: a negative score on the image becomes more negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, Param, Range, ScoreScale, layer_spec_check
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["VAF"]

#: the largest factor: a score of 10 times its own size already makes the softmax one-hot on most maps
FACTOR_MAX = 10.0


@register
class VAF(Method):
    name = "vaf"
    summary = "amplify the text's attention to the image and damp it to the system prompt in the middle layers"
    reference = "Yin et al., CVPR 2025 (ClearSight); github.com/ustc-hyin/ClearSight, visaug/inference/AttnAdapter.py"
    params = (
        Param("enhance", 1.15, "--enh-para 1.15 (infer_pope.sh; 1: no change)",
              check=Range(0, FACTOR_MAX, low_open=True, note="1 = no change"), grid=(1.15, 1.5, 2.0)),
        Param("suppress", 0.95, "--sup-para 0.95 (infer_pope.sh; 1: no change)",
              check=Range(0, FACTOR_MAX, note="1 = no change"), grid=(0.95, 0.5)),
        Param("layers", "9-14", "layers 9-14 of LLaVA-1.5's 32 (infer_pope.py: i > 8 and i < 15)",
              check=layer_spec_check("layers", ()),
              accepts="LLM layer indices or ranges (2,5-7; 4:8) or all/shallow/middle/deep (checked with the model)",
              grid=("9-14", "middle")),
    )  # fmt: skip

    def factual_edit(self, config: Settings) -> ScoreScale | None:
        if config.param("enhance") == 1.0 and config.param("suppress") == 1.0:
            return None  # no change: the factual rows run as the model's own (bit for bit, on any base attention)
        return ScoreScale(config.param("enhance"), config.param("suppress"), config.param("layers"))
