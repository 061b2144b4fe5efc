"""VTI, Visual and Textual Intervention: the tower's and the LLM's MLP outputs shifted along directions fitted
offline from a few demos (``causalmm fit vti``, :mod:`causalmm.fit.vti`); one pass, no branch, no per-sample state.

Liu et al., ICLR 2025; official code github.com/shengliu66/VTI. The shift (``vti_utils/llm_layers.py``,
``VTILayer``, wrapped around the MLP of every layer of the LLM and of the CLIP tower by ``add_vti_layers``): each
MLP output ``m`` at every position becomes ``normalize(normalize(m) + 0.1 * alpha * normalize(d)) * |m|``, ``d``
the layer's text direction in the LLM and the layer's direction for that token in the tower. Settings (the
README's MMHal command, ``run_mmhal_vti.py``): ``alpha_image 0.9``, ``alpha_text 0.9``, the directions from 70
demos (``hallucination_vti_demos.jsonl``), 50 masked trials each, 99% of the patches masked, seed 42; the
argparse defaults are 0 and 0.8, and the script decodes with 5 beams. The directions belong to the model and the
prompt template they were fitted with (the file names its model, and a fit for another model is refused); the
vision directions to the tower's token count (a tower that packs images into one sequence, as Qwen2-VL's, takes the
text direction alone). The official code runs one sample at a time; the shift is the same for every row, so
batching changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Directions, Method, Param, Range
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["VTI"]


@register
class VTI(Method):
    name = "vti"
    summary = "shift every MLP output of the tower and the LLM along directions fitted from demos (causalmm fit vti)"
    reference = "Liu et al., ICLR 2025; github.com/shengliu66/VTI, vti_utils/llm_layers.py, vti_utils/utils.py"
    params = (
        Param("alpha_text", 0.9, "--alpha_text 0.9 (README, MMHal; argparse default 0.8; 0: the LLM as it is)",
              check=Range(0, 10, note="0 = no shift; the shift is 0.1 * alpha of a unit vector"), grid=(0.3, 0.9, 2.0)),
        Param("alpha_image", 0.9, "--alpha_image 0.9 (README, MMHal; argparse default 0; 0: the tower as it is)",
              check=Range(0, 10, note="0 = no shift; the shift is 0.1 * alpha of a unit vector"), grid=(0.0, 0.9, 2.0)),
        Param("vectors", "", "none: the directions `causalmm fit vti` writes for the model (a .safetensors file)",
              accepts="the path of a file `causalmm fit vti` wrote for this model"),
    )  # fmt: skip

    def factual_edit(self, config: Settings) -> Directions | None:
        text, image = config.param("alpha_text"), config.param("alpha_image")
        if text == 0 and image == 0:
            return None  # no shift: the model's own run
        if not config.param("vectors"):
            raise ConfigError(
                "vti needs its fitted directions: write them with `causalmm fit vti --model MODEL --demos DEMOS.jsonl "
                "--out vti.safetensors`, then give --param vectors=vti.safetensors"
            )
        return Directions(config.param("vectors"), text, image)
