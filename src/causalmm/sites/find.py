"""Where a model is intervened on: its vision tower and its LLM, their attention modules (tagged as intervention
sites, in execution order) and the routing of those modules through the hook of :mod:`causalmm.sites.attention`;
their MLPs and their layers (the LLM's decoder layers, the tower's), tagged too and hooked once
(:mod:`causalmm.sites.mlp`). This is the one place that says which modules are hooked: every hook leaves its
module's numbers as they are unless the active intervention asks for an edit there.

What a model must have for the engine (image features it can take back precomputed, a tower and an LLM, attention
modules that route through ``AttentionInterface``) is checked here; :class:`UnsupportedModelError` names what is
missing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, UnsupportedModelError
from .mlp import layer_hook, mlp_hook
from .state import active
from .tags import BASES, SITE_ATTR, Site, attention_name

__all__ = ["Sites", "UnsupportedModelError", "check_base", "find_sites", "route_attention"]

_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
_LM_NAMES = ("language_model", "text_model", "llm")
#: what a transformer layer calls its MLP (Pixtral's tower: ``feed_forward``)
_MLP_NAMES = ("mlp", "feed_forward")


def check_base(base: Any) -> str:
    """``base`` if it names a base attention (``sdpa``, ``eager``); a :class:`ConfigError` naming them otherwise,
    raised before any model is loaded or touched."""
    if not isinstance(base, str) or base not in BASES:
        raise ConfigError(f"base attention {base!r} is not valid; choose one of: {', '.join(BASES)}")
    return base


@dataclass
class Sites:
    """A model's towers and their attention modules, as :func:`find_sites` found them."""

    tower: torch.nn.Module
    lm: torch.nn.Module
    #: the vision tower's attention modules, in execution order
    vision_attn: list[torch.nn.Module]
    #: the LLM's attention modules, by layer index
    lm_attn: list[torch.nn.Module]
    #: the decoder layer holding each of :attr:`lm_attn`, in the same order
    lm_layers: list[torch.nn.Module]
    #: whether the tower takes all images as one packed sequence (Qwen2-VL's ``grid_thw``)
    packed: bool
    #: the MLP of each of :attr:`lm_layers` (``None`` where a layer has none by a known name)
    lm_mlps: list[torch.nn.Module | None]
    #: the MLP of the tower layer holding each of :attr:`vision_attn` (``None`` where none is found)
    vision_mlps: list[torch.nn.Module | None]
    #: the tower layer holding each of :attr:`vision_attn` (``None`` where its parent holds no MLP: no layer)
    vision_layers: list[torch.nn.Module | None]


def find_sites(model: torch.nn.Module) -> Sites:
    """Find the vision tower, the LLM and their attention modules, and tag each module as a :class:`Site`.

    Raises:
        UnsupportedModelError: ``model`` is no vision-language model, cannot take precomputed image features,
            or has no tower, LLM or attention modules where they are looked for.
    """
    name = type(model).__name__
    inner = getattr(model, "model", model)
    if not hasattr(inner, "get_image_features") and not hasattr(model, "get_image_features"):
        raise UnsupportedModelError(f"{name} has no get_image_features(): it is not a vision-language model")
    fwd = inspect.signature(type(inner).forward).parameters
    if "mm_encoder_outputs" not in fwd:
        raise UnsupportedModelError(
            f"{name} cannot take precomputed image features (its forward has no `mm_encoder_outputs`), "
            "which the engine needs; upgrade transformers or use a supported family"
        )
    tower = _find(model, _TOWER_NAMES)
    lm = _find(model, _LM_NAMES)
    if tower is None or lm is None:
        raise UnsupportedModelError(
            f"{name}: cannot find its vision tower ({'/'.join(_TOWER_NAMES)}) or its language model "
            f"({'/'.join(_LM_NAMES)})"
        )
    vision_attn = _attention_modules(tower)
    lm_attn = sorted((m for m in _attention_modules(lm) if hasattr(m, "layer_idx")), key=lambda m: m.layer_idx)
    if not vision_attn or not lm_attn:
        raise UnsupportedModelError(f"{name}: found no attention modules in its vision tower or its LLM")
    parent = {id(c): m for m in lm.modules() for c in m.children()}
    packed = "grid_thw" in inspect.signature(type(tower).forward).parameters
    for i, m in enumerate(vision_attn):
        setattr(m, SITE_ATTR, Site("vision", i, packed=packed))
    for m in lm_attn:
        setattr(m, SITE_ATTR, Site("language", int(m.layer_idx)))
    lm_layers = [parent[id(m)] for m in lm_attn]
    lm_mlps = [_mlp(layer) for layer in lm_layers]
    tower_parent = {id(c): m for m in tower.modules() for c in m.children()}
    vision_mlps = [_mlp(tower_parent.get(id(m))) for m in vision_attn]
    vision_layers = [
        tower_parent.get(id(m)) if mlp is not None else None for m, mlp in zip(vision_attn, vision_mlps, strict=True)
    ]
    if not getattr(tower, "_causalmm_hooked", False):
        tower.register_forward_pre_hook(_reset_offsets)
        tower._causalmm_hooked = True
        for i, (mlp, layer) in enumerate(zip(vision_mlps, vision_layers, strict=True)):
            if mlp is not None:
                setattr(mlp, SITE_ATTR, Site("vision", i, packed=packed))
                mlp.register_forward_hook(mlp_hook)
                setattr(layer, SITE_ATTR, Site("vision", i, packed=packed))
                layer.register_forward_hook(layer_hook)
        for m, layer, mlp in zip(lm_attn, lm_layers, lm_mlps, strict=True):
            site = Site("language", int(m.layer_idx))
            setattr(layer, SITE_ATTR, site)
            layer.register_forward_hook(layer_hook)
            if mlp is not None:
                setattr(mlp, SITE_ATTR, site)
                mlp.register_forward_hook(mlp_hook)
    return Sites(tower, lm, vision_attn, lm_attn, lm_layers, packed, lm_mlps, vision_mlps, vision_layers)


def route_attention(model: torch.nn.Module, sites: Sites, base: str) -> None:
    """Set the model's attention implementation to the hook over ``base`` and check that every tagged module
    goes through it: one that does not would leave its interventions silently undone."""
    name = type(model).__name__
    try:
        model.set_attn_implementation(attention_name(base))
    except (ValueError, KeyError) as err:  # pragma: no cover - depends on the model class
        raise UnsupportedModelError(f"{name} does not accept a custom attention implementation: {err}") from err
    for kind, mods in (("vision tower", sites.vision_attn), ("LLM", sites.lm_attn)):
        impl = getattr(getattr(mods[0], "config", None), "_attn_implementation", None)
        if impl is None or not str(impl).startswith("causalmm_"):
            raise UnsupportedModelError(
                f"{name}: the {kind} attention does not route through transformers' "
                f"AttentionInterface (its implementation is {impl!r}), so it cannot be intervened on"
            )


def _mlp(layer: torch.nn.Module | None) -> torch.nn.Module | None:
    """A transformer layer's MLP, by the names the families use."""
    for name in _MLP_NAMES:
        mod = getattr(layer, name, None) if layer is not None else None
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def _find(model: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module | None:
    for root in (getattr(model, "model", None), model):
        for name in names:
            mod = getattr(root, name, None) if root is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod
    return None


def _attention_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Leaf modules named ``*Attention`` under ``root``, in execution (registration) order."""
    found = [m for m in root.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in found if not any(c is not m and type(c).__name__.endswith("Attention") for c in m.modules())]


def _reset_offsets(module, args):
    state = active()
    if state is not None:
        state.reset_vision_offsets()
