"""CausalMM decoding for ``model.generate(..., custom_generate="<this repository>", trust_remote_code=True)``.

``transformers`` calls ``generate(model, **kwargs)`` below with the arguments of the user's ``generate`` call, raw
pixels included. The decoding itself lives in the ``causalmm`` package (``causalmm.hf``), so this file stays a
few lines and the Hub copy never drifts from the package: ``requirements.txt`` names it.
"""

from causalmm.hf import generate_from_inputs


def generate(model, **kwargs):
    """CausalMM decoding of the prompts in ``kwargs``; ``causalmm=CausalMMConfig(...)`` chooses the method."""
    return generate_from_inputs(model, **kwargs)
