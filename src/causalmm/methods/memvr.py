"""MemVR, Memory-space Visual Retracing: when the LLM grows uncertain in its middle layers, one FFN re-reads the
image, per row, in one pass (no branch).

Zou et al., ICML 2025; official code github.com/1zhou-Wang/MemVR, ``memvr.py`` (``forward``, ``LlamaMLP``,
``apply_memvr_llama``). After decoder layer ``l`` (``starting_layer < l < ending_layer``) the newest position's
early-exit logits (``lm_head(norm(h))``) give the entropy of their top-10 softmax over ``log 10``; the first layer
above ``entropy_threshold`` makes the FFN of layer ``l + 1`` return
``(1 - r) FFN(x) + r (mean|FFN(x)| / mean|x V^T V|) x V^T V``, ``V`` the image features as the LLM receives them
and ``x`` the FFN's input, once per forward, at every position of that forward (the whole prompt at the prefill).
The scale factors the official code puts on its adapter weights (mean |up_proj| / mean |V| and
mean |down_proj| / mean |V|) cancel in that ratio. Settings (``eval_scripts/llava/*.sh``, LLaVA-1.5):
``entropy_threshold 0.75``, ``starting_layer 5``, ``ending_layer 16``, ``retracing_ratio`` 0.12 for MME and
MM-Vet (the default here: the yes/no benchmark), 0.31 for CHAIR, 0.32 LLaVA-Bench, 0.28 VizWiz (Qwen-VL:
layers 9-16, 0.28); greedy. The official code runs one sample at a time: its entropy and means span the batch
and its memory is the batch's last image; here each row has its own trigger, means and memory (all of its
prompt's images), so no answer depends on its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ImageMemory, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["MemVR"]


@register
class MemVR(Method):
    name = "memvr"
    summary = "when a middle layer's early exit is uncertain, the next FFN re-reads the image (per row, no branch)"
    reference = "Zou et al., ICML 2025; github.com/1zhou-Wang/MemVR, memvr.py"
    params = (
        Param("ratio", 0.12, "retracing_ratio 0.12 (eval_scripts/llava/mme.sh; CHAIR 0.31, VizWiz 0.28; 0: none)",
              check=Range(0, 1, note="0 = no read; the FFN's weight is 1 - ratio"), grid=(0.12, 0.31, 0.6)),
        Param("threshold", 0.75, "entropy_threshold 0.75 (every eval script)",
              check=Range(0, 1, note="normalised top-10 entropy; 1 = never triggers"), grid=(0.75, 0.5)),
        Param("start", 5, "starting_layer 5 (LLaVA-1.5; Qwen-VL 9)",
              check=Range(0, note="layers after it may trigger"), accepts="[0, end) (checked with the model)"),
        Param("end", 16, "ending_layer 16 (LLaVA-1.5 and Qwen-VL)",
              check=Range(1, note="layers before it may trigger"),
              accepts="(start, LLM layers - 1] (checked with the model)"),
    )  # fmt: skip

    def factual_edit(self, config: Settings) -> ImageMemory | None:
        if config.param("ratio") == 0.0:
            return None  # no read: the model's own run
        return ImageMemory(config.param("ratio"), config.param("threshold"), config.param("start"), config.param("end"))
