"""causalmm: counterfactual-attention causal decoding for vision-language models (CausalMM, ICLR 2025)."""

from .api import CausalMM
from .config import CausalMMConfig, ConfigError, resolve_layers
from .decoding import GenerationOptions, GenerationResult, Switches, contrast
from .images import load_image
from .inputs import InputError
from .interventions import counterfactual_attention

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
