"""The decoding rule: the contrast of the factual and counterfactual logits under the plausibility cut, and the
choice of the next token (``docs/method.md#4-the-decoding-rule``).

Token selection composes ``transformers``' own logits processors (repetition penalty, temperature, top-k,
top-p), in the order ``model.generate`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..config import ConfigError

__all__ = ["GenerationOptions", "GenerationResult", "TokenSelector", "contrast", "plausible"]


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
    constant per row only (``docs/method.md#why-the-contrast-is-taken-on-raw-logits-only``).

    >>> l = torch.tensor([2.0, 1.0, -3.0]); lb = torch.tensor([1.0, 1.5, -3.0])
    >>> contrast(l, [lb], gamma=1.0, epsilon=0.1)
    tensor([3.0000, 0.5000,   -inf])
    """
    fl = factual.float()
    z = fl + gamma * sum((fl - c.float() for c in counterfactuals), torch.zeros_like(fl))
    return z.masked_fill(~plausible(factual, epsilon), float("-inf"))


@dataclass
class GenerationOptions:
    """Token-selection options shared by every method (validated)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1 (or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class GenerationResult:
    """One prompt's output. ``branch_logits`` (opt-in) maps branch name -> ``(steps, vocab)`` float32 scores:
    ``factual``, each counterfactual branch (mean over draws) and ``combined`` (the rule's output)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int
    branch_logits: dict[str, torch.Tensor] | None = field(default=None, repr=False)


class TokenSelector:
    """Picks the next token from a prompt's combined scores: ``transformers``' repetition penalty (over the
    tokens generated so far, not the prompt), then argmax, or temperature, top-k, top-p and a draw from the
    prompt's own generator."""

    def __init__(self, opts: GenerationOptions) -> None:
        self.greedy = not opts.do_sample
        self.penalty = (
            RepetitionPenaltyLogitsProcessor(float(opts.repetition_penalty)) if opts.repetition_penalty != 1.0 else None
        )
        warpers = LogitsProcessorList()
        if opts.do_sample:
            if opts.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(opts.temperature)))
            if opts.top_k is not None:
                warpers.append(TopKLogitsWarper(int(opts.top_k)))
            if opts.top_p is not None and opts.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(opts.top_p)))
        self.warpers = warpers

    def __call__(self, scores: torch.Tensor, history: list[int], gen: torch.Generator) -> int:
        """The next token of one prompt: ``scores`` ``(vocab,)``, ``history`` its generated ids."""
        z = scores[None]
        ids = torch.tensor([history], dtype=torch.long, device=z.device)
        if self.penalty is not None and history:
            z = self.penalty(ids, z.clone())
        if self.greedy:
            return int(z.argmax())
        probs = self.warpers(ids, z).softmax(-1)[0]
        return int(torch.multinomial(probs.to(gen.device), 1, generator=gen))
