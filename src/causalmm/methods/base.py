"""What a decoding method is: the branches it runs beside the factual one, the config fields it reads (with
their defaults and where those come from), and its combination rule.

The engine (``causalmm.decoding``) builds any :class:`Branch`, batches every row of every prompt into one
forward per step and hands each prompt's next-token logits to :meth:`Method.combine`. A method is therefore
one small class in its own file under ``causalmm/methods/``, registered with :func:`register`; it touches the
engine only if it needs a new kind of branch input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import CausalMMConfig

__all__ = ["Branch", "Method", "Param"]


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

    @property
    def image(self) -> str:
        """The image features the branch's rows need: ``vision`` (intervened tower), ``noise`` or ``factual``."""
        return "vision" if self.vision else "noise" if self.noise else "factual"


@dataclass(frozen=True)
class Param:
    """A :class:`~causalmm.config.CausalMMConfig` field a method reads, its default there, and its origin."""

    field: str
    default: object
    source: str


class Method:
    """A decoding method. Subclasses set the class attributes and override :meth:`branches` / :meth:`combine`.

    Attributes:
        name: the registry key (``CausalMMConfig.method``, ``--method``).
        summary: one line for ``--help`` and the docs.
        reference: the paper and official code the method follows (repository and file).
        params: the config fields it reads.
        plausible_only: the rule reads counterfactual logits only where the factual plausibility cut keeps a
            token, so the engine may compute them there only (``causalmm.decoding.head``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    plausible_only: ClassVar[bool] = False

    def branches(self, config: CausalMMConfig) -> tuple[Branch, ...]:
        """The counterfactual branches run beside the factual one (none: plain decoding)."""
        return ()

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: CausalMMConfig, step: int
    ) -> torch.Tensor:
        """Next-token scores ``(vocab,)`` from the factual logits and each branch's (mean over its draws);
        ``step`` counts generated tokens from 0."""
        return factual
