"""Model adapters: one small class per family, the generic one for everything else."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..sites.find import check_base
from .base import Adapter
from .context import max_positions
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "check_base", "get_adapter", "max_positions"]

#: ``config.model_type`` -> adapter class. Families not listed go through the generic :class:`Adapter`.
ADAPTERS: dict[str, type[Adapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
}


def get_adapter(model: torch.nn.Module, processor: Any, *, base: str = "sdpa") -> Adapter:
    """The adapter for ``model``'s family (``config.model_type``), or the generic one.

    Raises:
        UnsupportedModelError: the family lacks what the engine needs; the message names what.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type, Adapter)
    return cls(model, processor, base=base)
