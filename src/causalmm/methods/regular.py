"""Regular decoding: the factual branch alone (greedy, or sampling with the usual processors)."""

from __future__ import annotations

from .base import Method
from .registry import register

__all__ = ["Regular"]


@register
class Regular(Method):
    name = "regular"
    summary = "plain greedy or sampled decoding, the reference every method is compared with"
