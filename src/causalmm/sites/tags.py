"""What marks a module as an intervention site, and the attention implementation names the hook registers.

The model adapter (:mod:`causalmm.sites.find`) tags each module the engine may act on with a :class:`Site`; every
hook reads the tag to know where it is (vision modules have no ``layer_idx`` of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASES", "SITE_ATTR", "Site", "attention_name"]

#: Attribute an adapter sets on each module it wants reachable.
SITE_ATTR = "_causalmm_site"
#: Base implementations the attention hook can delegate to.
BASES = ("sdpa", "eager")


@dataclass(frozen=True)
class Site:
    """Where a module sits: ``kind`` is ``"vision"`` or ``"language"``.

    ``packed`` marks vision towers that run all images as one packed sequence split into chunks
    (Qwen2-VL): their calls are addressed by token offset instead of batch row.
    """

    kind: str
    layer: int
    packed: bool = False


def attention_name(base: str) -> str:
    """The ``attn_implementation`` name that routes through the hook with ``base`` underneath."""
    if base not in BASES:
        raise ValueError(f"unknown base attention {base!r}; choose one of {', '.join(BASES)}")
    return f"causalmm_{base}"
