"""causalmm: counterfactual-attention causal decoding for vision-language models (CausalMM, ICLR 2025).

The names below load on first use, not at ``import causalmm``: tools that find plugins by importing a small
module of this package (lmms-eval's entry point, ``causalmm.lmms.manifest``) must not pay for, or fail on,
torch and transformers just to list a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import CausalMM
    from .config import CausalMMConfig, ConfigError, resolve_layers
    from .decoding import GenerationOptions, GenerationResult, Switches, contrast
    from .images import load_image
    from .inputs import InputError
    from .interventions import counterfactual_attention

#: public name -> the module that defines it
_EXPORTS = {
    "CausalMM": "api",
    "InputError": "inputs",
    "load_image": "images",
    "CausalMMConfig": "config",
    "ConfigError": "config",
    "resolve_layers": "config",
    "GenerationOptions": "decoding",
    "GenerationResult": "decoding",
    "Switches": "decoding",
    "contrast": "decoding",
    "counterfactual_attention": "interventions",
}

__all__ = [
    "CausalMM",
    "CausalMMConfig",
    "ConfigError",
    "GenerationOptions",
    "GenerationResult",
    "InputError",
    "Switches",
    "contrast",
    "counterfactual_attention",
    "load_image",
    "resolve_layers",
]
__version__ = "0.1.0"


#: submodules reachable as attributes after a bare ``import causalmm`` (``causalmm.hf.generate``)
_SUBMODULES = ("hf",)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'causalmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
