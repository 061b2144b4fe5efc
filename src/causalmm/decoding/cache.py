"""A KV cache that appends in place: spare capacity reserved at prefill, one token written per decode step.

``transformers``' :class:`~transformers.DynamicCache` appends a decode step's keys and values with
``torch.cat``, which copies every layer's whole cache, for every row, at every step: its cost grows with the
prompt (~600 image tokens) and with the number of rows, which for CausalMM is the number of branches. A
:class:`GrowingLayer` keeps its keys and values in a buffer with room for ``reserve`` more tokens and writes new
tokens into it; what attention receives is a view of the filled part. Nothing else changes: the layer is a
:class:`~transformers.cache_utils.DynamicLayer`, its ``keys``/``values`` hold exactly the cached tokens, and
code that replaces them (row selection, ``crop``, ``reset``, offloading) just makes the next update copy them
into a fresh buffer.

A view handed out is never written through afterwards: updates write only past the filled part, so a tensor
taken from the cache (a fork of its rows, a previous step's keys) keeps its values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "growing_cache"]


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare capacity instead of concatenating.

    ``reserve``: how many tokens of room to add whenever the buffer is (re)allocated (on the first update, and
    when an update does not fit), so a generation of at most ``reserve`` new tokens allocates once.
    """

    def __init__(self, reserve: int) -> None:
        super().__init__()
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        self.reserve = reserve
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        """Tokens the current buffer holds room for (0 before the first update)."""
        return 0 if self._buffers is None else self._buffers[0].shape[-2]

    def _own(self, incoming: torch.Tensor) -> bool:
        """Whether ``keys``/``values`` are still this layer's views and the buffer fits ``incoming`` after them."""
        if self._views is None or self.keys is not self._views[0] or self.values is not self._views[1]:
            return False
        buf = self._buffers[0]
        return (
            buf.shape[:-2] == incoming.shape[:-2]
            and buf.shape[-1] == incoming.shape[-1]
            and buf.dtype == incoming.dtype
            and buf.device == incoming.device
            and self.keys.shape[-2] + incoming.shape[-2] <= buf.shape[-2]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` (``(batch, heads, new, dim)``) and return every cached token's
        keys and values (views of the buffer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if not self._own(key_states):
            old = self.keys.shape[-2] if self.keys.numel() else 0
            shape = (*key_states.shape[:-2], old + new + self.reserve, key_states.shape[-1])
            kbuf = key_states.new_empty(shape)
            vbuf = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
            if old:
                kbuf[..., :old, :] = self.keys
                vbuf[..., :old, :] = self.values
            self._buffers = (kbuf, vbuf)
            self._views = (kbuf[..., :old, :], vbuf[..., :old, :])
        kbuf, vbuf = self._buffers
        at = self._views[0].shape[-2]
        kbuf[..., at : at + new, :] = key_states
        vbuf[..., at : at + new, :] = value_states
        self._views = (kbuf[..., : at + new, :], vbuf[..., : at + new, :])
        self.keys, self.values = self._views
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (``transformers``' convention), keeping the buffer: the next
        update writes over them."""
        if tokens_to_remove < 0 and self._views is not None and self.keys is self._views[0]:
            n = self.keys.shape[-2] + tokens_to_remove
            self._views = (self._buffers[0][..., :n, :], self._buffers[1][..., :n, :])
            self.keys, self.values = self._views
            return
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        """Drop the buffer with the cached tokens."""
        self._buffers = self._views = None
        super().reset()


def growing_cache(
    config, reserve: int, data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> DynamicCache:
    """A :class:`~transformers.DynamicCache` for ``config``'s decoder whose layers are :class:`GrowingLayer`\\ s
    reserving ``reserve`` tokens, filled with ``data`` (one ``(keys, values)`` per layer) if given.

    Only for caches of plain full-attention layers (a sliding-window or other special layer is refused)."""
    cache = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(f"growing_cache is for plain full-attention caches; this model's has {sorted(kinds)}")
    cache.layers = [GrowingLayer(reserve) for _ in cache.layers]
    if data is not None:
        for layer, (keys, values) in zip(cache.layers, data, strict=True):
            layer.update(keys, values)
    return cache
