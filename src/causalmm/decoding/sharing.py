"""Shared lower layers: rows that compute the same thing below the first intervened LLM layer run there once.

A language-branch row differs from its prompt's factual row only from the first intervened decoder layer
``low`` on: below it, both see the same tokens, the same image features and stock attention. So the decoder
layers ``0 .. low-1`` run on the *source* rows only (``keep``), and their output is forked back to every row
(``gather``) before layer ``low``; the KV cache of those layers holds the source rows only. Nothing here
copies model code: forward hooks on the decoder layers slice what a layer receives and expand what the last
shared layer returns.

What a decoder layer receives is the same across the families the engine shares layers for (checked by the
parity tests): the hidden states, an attention mask ``(B|1, 1, q, k)``, ``position_embeddings`` (tensors
``(B, q, d)``) and ``position_ids`` (``(B, q)`` or ``(axes, B, q)``). Any other per-row tensor is refused,
not guessed at.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["RowPlan", "capture_input", "feed_lower_layers", "share_lower_layers", "select_cache_rows"]


class RowPlan:
    """Which batch rows run the shared layers (``keep``), and which of them each row continues from.

    Built from ``sources``: for each batch row, the batch row whose lower-layer computation it reuses (itself
    for a source). A source must be its own source.
    """

    def __init__(self, sources: Sequence[int]) -> None:
        keep = [j for j, s in enumerate(sources) if s == j]
        at = {j: i for i, j in enumerate(keep)}
        missing = [s for s in sources if s not in at]
        if missing:
            raise ValueError(f"rows {sorted(set(missing))} are sources of other rows but not their own source")
        self.batch = len(sources)
        self.sources = list(sources)
        self.keep = keep
        self.gather = [at[s] for s in sources]

    @property
    def shares(self) -> bool:
        """Whether any row reuses another's lower layers (otherwise running the plan changes nothing)."""
        return len(self.keep) < self.batch


def _take(x: Any, rows: torch.Tensor, batch: int) -> Any:
    """``x`` with batch dimension 0 cut to ``rows`` (tensors of that batch size; tuples item by item)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or x.shape[0] != batch:
            return x  # broadcast over rows (a (1, 1, q, k) mask) or not per row
        return x.index_select(0, rows.to(x.device))
    if isinstance(x, tuple):
        return tuple(_take(t, rows, batch) for t in x)
    return x


def _slice_inputs(args: tuple, kwargs: dict[str, Any], rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    hidden, *rest = args if args else (kwargs.pop("hidden_states"),)
    if hidden.shape[0] == batch:  # the first shared layer; later ones already get the source rows
        hidden = hidden.index_select(0, rows.to(hidden.device))
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("attention_mask", "position_embeddings"):
            out[key] = _take(value, rows, batch)
        elif key == "position_ids" and isinstance(value, torch.Tensor) and value.dim() >= 2:
            out[key] = value.index_select(-2, rows.to(value.device)) if value.shape[-2] == batch else value
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            raise NotImplementedError(
                f"a decoder layer receives `{key}` with one entry per row, which shared lower layers do not "
                "know how to cut; run this model with share_layers=False"
            )
        else:
            out[key] = value
    return (hidden, *rest), out


@contextlib.contextmanager
def share_lower_layers(layers: Sequence[torch.nn.Module], plan: RowPlan) -> Iterator[None]:
    """Run the decoder ``layers`` (the ones below the first intervened layer, in order) on ``plan.keep`` only,
    and fork the last one's output to every row, for the forwards run inside the block."""
    if not layers or not plan.shares:
        yield
        return
    device = next(layers[0].parameters()).device
    rows = torch.tensor(plan.keep, device=device)
    gather = torch.tensor(plan.gather, device=device)

    def before(module, args, kwargs):
        return _slice_inputs(args, dict(kwargs), rows, plan.batch)

    def after(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (output[0].index_select(0, gather), *output[1:])
        return output.index_select(0, gather)

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_input(layer: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states ``layer`` receives, one tensor per forward run inside the block."""
    got: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        got.append((args or (kwargs["hidden_states"],))[0])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()


@contextlib.contextmanager
def feed_lower_layers(layers: Sequence[torch.nn.Module], hidden: torch.Tensor) -> Iterator[None]:
    """Skip the decoder ``layers`` (the ones below the first intervened layer) in the forwards run inside the
    block: the last of them returns ``hidden``, the states another forward computed there for these rows (in
    the same token layout), and the others pass their input on. Their cache layers are left untouched."""

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def feed(hidden_states, *args, **kwargs):
        if hidden_states.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(f"fed states {tuple(hidden.shape)} do not fit the batch {tuple(hidden_states.shape)}")
        return hidden

    for layer in layers:
        layer.forward = feed if layer is layers[-1] else passthrough
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def select_cache_rows(cache: DynamicCache, low: int, upper: Sequence[int] | None, lower: Sequence[int] | None) -> None:
    """Keep batch rows ``upper`` in cache layers ``low..`` and rows ``lower`` in layers ``..low-1`` (in place;
    ``None`` leaves those layers as they are)."""
    for i, layer in enumerate(cache.layers):
        sel = lower if i < low else upper
        if sel is None or not layer.is_initialized:
            continue
        idx = torch.tensor(list(sel), device=layer.keys.device)
        layer.keys = layer.keys.index_select(0, idx)
        layer.values = layer.values.index_select(0, idx)
