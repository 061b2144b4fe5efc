"""The choice of the next token after the decoding rule (``docs/method.md#4-the-decoding-rule``), and the
generation options; the rule's tensor functions (the contrast, the plausibility cut) are in
:mod:`causalmm.contrast`, below the methods that use them.

Token selection composes ``transformers``' own logits processors (repetition penalty, temperature, top-k,
top-p), in the order ``model.generate`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..contrast import contrast, plausible
from ..settings import MAX_BEAMS, ConfigError, Range, shown

__all__ = [
    "MAX_BEAMS", "OPTION_RANGES", "GenerationOptions", "GenerationResult", "HistoryProcessors", "TokenSelector",
    "contrast", "plausible",
]  # fmt: skip

#: the numeric generation options' ranges (the vocabulary and the LLM's positions bound some further, checked when
#: the engine sees the model): one place for the checks and the docs (docs/methods.md)
OPTION_RANGES: dict[str, Range] = {
    "max_new_tokens": Range(1, 2**20, note="and, with the prompt, within the LLM's positions"),
    "temperature": Range(0.01, 100, note="sampling only; 1 leaves the scores as they are"),
    "top_k": Range(1, note="sampling only; at most the vocabulary size"),
    "top_p": Range(0, 1, low_open=True, note="sampling only; 1 = off"),
    "repetition_penalty": Range(0.01, 100, note="1 = off; a score is multiplied or divided by it"),
    "num_beams": Range(1, MAX_BEAMS, note="1 = no beam search; at most the vocabulary size"),
    "length_penalty": Range(-10, 10, note="beam search only; a hypothesis' score is divided by length ** this"),
    "no_repeat_ngram_size": Range(0, note="0 = off"),
}

#: the options that act on sampling only, and on beam search only, with the value that means "not set"
SAMPLING_ONLY = {"temperature": 1.0, "top_k": None, "top_p": None}
BEAM_ONLY = {"length_penalty": 1.0, "early_stopping": False}


@dataclass
class GenerationOptions:
    """Token-selection options shared by every method (validated), with ``transformers``' meaning.

    ``num_beams > 1`` decodes by beam search (:mod:`causalmm.decoding.beams`): each beam scores its next token by
    the log-softmax of its method's combined scores; ``length_penalty`` and ``early_stopping`` (``True``,
    ``False`` or ``"never"``) rank and stop the finished hypotheses as ``model.generate`` does. Beam search is
    deterministic here (no ``do_sample`` with beams). ``no_repeat_ngram_size`` bans any n-gram already in the
    prompt or the answer (as ``transformers`` counts it); ``repetition_penalty`` reads the answer only.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0

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
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ConfigError(f"num_beams={self.num_beams!r} must be an integer >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam search is deterministic here: use do_sample=False with num_beams > 1")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"length_penalty={self.length_penalty} must be a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"no_repeat_ngram_size={n!r} must be an integer >= 0 (0: off)")
        for name, bounds in OPTION_RANGES.items():  # the ranges: a value past them overflows, hangs or means nothing
            value = getattr(self, name)
            why = None if value is None else bounds(value)
            if why:
                raise ConfigError(f"{name}={shown(value)} {why}")
        if not self.do_sample:  # an option of sampling's given to greedy or beam search would be silently ignored
            given = [name for name, unset in SAMPLING_ONLY.items() if getattr(self, name) != unset]
            if given:
                raise ConfigError(
                    f"{given[0]}={getattr(self, given[0])!r} acts on sampling only, and do_sample is False: pass "
                    f"do_sample=True to sample, or leave {given[0]} unset"
                )


@dataclass
class GenerationResult:
    """One prompt's output. ``branch_logits`` (opt-in) maps branch name -> ``(steps, vocab)`` float32 scores:
    ``factual``, each counterfactual branch (mean over draws) and ``combined`` (the rule's output)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int
    branch_logits: dict[str, torch.Tensor] | None = field(default=None, repr=False)


class HistoryProcessors:
    """``transformers``' processors that read what came before: the repetition penalty (over the answer so far)
    and the no-repeat n-gram ban (over the prompt and the answer), in ``model.generate``'s order."""

    def __init__(self, opts: GenerationOptions) -> None:
        self.penalty = (
            RepetitionPenaltyLogitsProcessor(float(opts.repetition_penalty)) if opts.repetition_penalty != 1.0 else None
        )
        size = int(opts.no_repeat_ngram_size)
        self.ngram = NoRepeatNGramLogitsProcessor(size) if size else None

    def __bool__(self) -> bool:
        return self.penalty is not None or self.ngram is not None

    def __call__(self, scores: torch.Tensor, answers: list[list[int]], prompt: list[int]) -> torch.Tensor:
        """``scores`` ``(k, vocab)`` of ``k`` continuations of one prompt, ``answers`` their tokens so far (all of
        one length), ``prompt`` its ids."""
        if self.penalty is not None and answers[0]:
            ids = torch.tensor(answers, dtype=torch.long, device=scores.device)
            scores = self.penalty(ids, scores.clone())
        if self.ngram is not None:
            ids = torch.tensor([prompt + a for a in answers], dtype=torch.long, device=scores.device)
            scores = self.ngram(ids, scores.clone())
        return scores


class TokenSelector:
    """Picks the next token from a prompt's combined scores: ``transformers``' repetition penalty (over the
    tokens generated so far, not the prompt) and no-repeat n-gram ban, then argmax, or temperature, top-k, top-p
    and a draw from the prompt's own generator."""

    def __init__(self, opts: GenerationOptions) -> None:
        self.greedy = not opts.do_sample
        self.history = HistoryProcessors(opts)
        warpers = LogitsProcessorList()
        if opts.do_sample:
            if opts.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(opts.temperature)))
            if opts.top_k is not None:
                warpers.append(TopKLogitsWarper(int(opts.top_k)))
            if opts.top_p is not None and opts.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(opts.top_p)))
        self.warpers = warpers

    def __call__(
        self, scores: torch.Tensor, history: list[int], gen: torch.Generator, prompt: list[int] | None = None
    ) -> int:
        """The next token of one prompt: ``scores`` ``(vocab,)``, ``history`` its generated ids, ``prompt`` its
        prompt's ids (read by the n-gram ban only)."""
        z = scores[None]
        if self.history:
            z = self.history(z, [history], list(prompt or []))
        if self.greedy:
            return int(z.argmax())
        ids = torch.tensor([history], dtype=torch.long, device=z.device)
        probs = self.warpers(ids, z).softmax(-1)[0]
        return int(torch.multinomial(probs.to(gen.device), 1, generator=gen))
