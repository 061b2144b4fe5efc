"""The decoding engine, one idea per file:

- ``rule.py``      next-token selection (transformers' processors) and the generation options
- ``rows.py``      which rows a prompt gets, their image features, draws and sharing keys
- ``features.py``  image features per row kind (factual, vision-intervened, noised), once per image
- ``forward.py``   one batched forward over every row, and the reference prefill
- ``prefill.py``   the shared-prefix prefill (prefix groups prefilled once, caches forked)
- ``engine.py``    the loop: layout, prefill, one forward per step, each prompt's next token
- ``sharing.py``   lower LLM layers run once for rows that compute the same there
- ``head.py``      counterfactual logits on the plausible tokens only
- ``cache.py``     a KV cache layer written in place
"""

from .engine import Engine, Switches
from .forward import cache_kwargs
from .rule import GenerationOptions, GenerationResult, TokenSelector, contrast, plausible

__all__ = [
    "Engine",
    "GenerationOptions",
    "GenerationResult",
    "Switches",
    "TokenSelector",
    "cache_kwargs",
    "contrast",
    "plausible",
]
