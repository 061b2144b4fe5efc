"""Decoding methods as entries of one registry: each says which counterfactual branches run beside the
factual one. The engine (``decoding.py``) knows how to build any branch; a method only picks them.

Adding a branch-style baseline (ICD, text-only contrast, ...) is one entry here plus, if it needs a new
kind of input, one field on :class:`Branch` that the engine reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import CausalMMConfig

__all__ = ["Branch", "METHODS", "branches_for"]


@dataclass(frozen=True)
class Branch:
    """One counterfactual branch: what is changed relative to the factual run.

    ``vision``: counterfactual attention in the vision encoder; ``language``: in the LLM decoder;
    ``noise``: the image replaced by its diffusion-noised version (VCD).
    """

    name: str
    vision: bool = False
    language: bool = False
    noise: bool = False


V = Branch("V", vision=True)
L = Branch("L", language=True)
J = Branch("J", vision=True, language=True)
NOISE = Branch("noise", noise=True)

_MODES = {"vision": (V,), "language": (L,), "multimodal": (V, L), "joint": (J,)}

#: method name -> the branches it runs beside the factual one.
METHODS: dict[str, Callable[[CausalMMConfig], tuple[Branch, ...]]] = {
    "regular": lambda cfg: (),
    "causalmm": lambda cfg: _MODES[cfg.mode],
    "vcd": lambda cfg: (NOISE,),
}


def branches_for(config: CausalMMConfig) -> tuple[Branch, ...]:
    """The counterfactual branches of ``config.method`` (and ``config.mode`` for CausalMM)."""
    return METHODS[config.method](config)
