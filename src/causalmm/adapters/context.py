"""How long a prompt may be: the positions an LLM is made for (:func:`max_positions`), and the check that a
prompt leaves room for the answer in them (:class:`ContextLimit`, which :class:`~causalmm.adapters.Adapter`
builds on: its ``encode`` refuses a prompt too long, ``CausalMM.generate`` reserves the answer's positions)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import InputError

__all__ = ["ContextLimit", "max_positions"]

#: Kinds of RoPE scaling whose parameters state the context they extend to (``factor`` times the pretraining
#: length); linear and dynamic scaling state no such length, so ``max_position_embeddings`` stands for them.
_EXTENDING_ROPE = ("yarn", "llama3", "longrope")


def max_positions(config: Any) -> int | None:
    """How many positions the LLM of ``config`` is made for, as its text config says; ``None`` where it says
    nothing (then no prompt is refused for its length).

    That is ``max_position_embeddings`` (or ``n_positions`` / ``max_sequence_length``), or, where the RoPE
    parameters extend the pretraining context (YaRN, Llama 3, LongRoPE: ``factor`` and
    ``original_max_position_embeddings``), the extended context if it is larger (Qwen2.5's YaRN configs keep
    ``max_position_embeddings`` at the pretraining length and state the factor).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limit = value
            break
    if limit is None:
        return None
    rope = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict):
        return limit
    nested = rope and all(isinstance(v, dict) for v in rope.values())  # one set of parameters per layer type
    for params in rope.values() if nested else [rope]:
        factor, original = params.get("factor"), params.get("original_max_position_embeddings")
        if params.get("rope_type") in _EXTENDING_ROPE and factor and original:
            limit = max(limit, int(factor * original))
    return limit


class ContextLimit:
    """The length check of an adapter's ``encode``: a prompt's positions plus those reserved for the answer
    must fit the LLM's. Uses the adapter's ``model``, ``image_inputs`` and ``prefill_positions``."""

    #: positions ``encode`` keeps free after the prompt (the answer's tokens; see :meth:`reserving`)
    _reserved_positions: int = 0

    @contextlib.contextmanager
    def reserving(self, new_tokens: int) -> Iterator[None]:
        """While active, :meth:`encode` refuses a prompt that leaves fewer than ``new_tokens`` of the LLM's
        positions for the answer (``CausalMM.generate`` reserves its ``max_new_tokens``)."""
        before = self._reserved_positions
        self._reserved_positions = int(new_tokens)
        try:
            yield
        finally:
            self._reserved_positions = before

    def _check_length(self, enc: dict[str, torch.Tensor]) -> None:
        """Refuse a prompt whose positions plus the reserved ones exceed the LLM's: past them a RoPE model
        generates without complaint, but from positions it never saw, and a learned table fails deep in torch.
        No truncation: cutting a prompt would cut its image tokens or its chat template."""
        limit = max_positions(self.model.config)
        reserve = self._reserved_positions
        n_tokens = int(enc["input_ids"].shape[-1])
        if limit is None or n_tokens + reserve <= limit:
            return
        # Positions can be fewer than tokens (M-RoPE numbers an image by its grid, not its token count): count them
        images = self.image_inputs(enc)
        tokens = {k: v for k, v in enc.items() if k not in images}
        used = int(self.prefill_positions(tokens, images).max()) + 1
        if used + reserve <= limit:
            return
        fix = (
            f"lower max_new_tokens to {limit - used} or less, or shorten the prompt"
            if used < limit
            else "shorten the prompt (or give a smaller image, where the image's token count grows with its size)"
        )
        more = f" and max_new_tokens={reserve} needs {reserve} more, {used + reserve} in all," if reserve else ","
        raise InputError(
            f"the prompt is too long for {type(self.model).__name__}: it takes {used} positions ({n_tokens} tokens, "
            f"the image's included){more} but the LLM has {limit} (max_position_embeddings in its text config); "
            f"{fix}"
        )
