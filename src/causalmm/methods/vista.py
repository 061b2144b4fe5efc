"""VISTA, Visual Information Steering with Token-logit Augmentation: every layer's MLP output steered toward what
the image adds to the prompt's last token, and late layers' early-exit logits mixed into the final ones; one pass
after two probe prefills (no branch).

Li et al., ICML 2025; official code github.com/LzVv123456/VISTA. The steering vector (``steering_vector.py``,
``obtain_vsv``): the last prompt token's output of each LLM layer with the image minus that of the same prompt with
the image left out (``model_loader.py``, ``prepare_null_prompt``), from two unsteered prefills; the rank-1 PCA
there, fitted on one sample, returns that difference plus an arbitrary unit vector, which is left out here. The
steering (``llm_layers.py``, ``VSVLayer``, every layer with ``--layers None``): each MLP output ``m`` at every
position, prefill and decode, becomes ``normalize(normalize(m) + lam * s * normalize(v_l)) * |m|`` with
``s = 1 + max(0, cos(m, -v_l))``. The self-logits augmentation (``llava/model/language_model/llava_llama.py``):
``logits = mix * mean_l lm_head(h_l) + (1 - mix) * logits`` over the raw outputs ``h_l`` of layers 25..30 (no final
norm), read from the steered forward. Settings (``run_pope.sh``, ``run_chair.sh``, ``run_mmhal.sh``, LLaVA-1.5):
``--vsv-lambda`` 0.01 for POPE (the default here), 0.17 CHAIR, 0.1 MMHal; ``--logits-alpha 0.3``;
``--logits-layers 25,30``; greedy. The official code runs one sample at a time; here each row has its own vectors.
mitigv's VISTA keeps the steering only, as a plain add to each layer's output (no norm preservation, no gate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..settings import resolve_layers
from .base import Method, Param, Range, Steering, layer_spec_check
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["VISTA", "vista_scores"]


def vista_scores(factual: torch.Tensor, late: torch.Tensor, mix: float) -> torch.Tensor:
    """The self-logits augmentation: ``mix * mean(late) + (1 - mix) * factual`` in float32, ``late`` the raw
    early-exit logits ``(layers, vocab)``.

    >>> vista_scores(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0], [0.0, 4.0]]), 0.5)
    tensor([0.5000, 1.5000])
    """
    return mix * late.float().mean(0) + (1.0 - mix) * factual.float()


@register
class VISTA(Method):
    name = "vista"
    summary = "steer every layer's MLP output toward what the image adds, and mix late layers' logits in (no branch)"
    reference = "Li et al., ICML 2025; github.com/LzVv123456/VISTA, llm_layers.py, steering_vector.py, llava_llama.py"
    params = (
        Param("lam", 0.01, "--vsv-lambda 0.01 (run_pope.sh; CHAIR 0.17, MMHal 0.1; 0: no steering)",
              check=Range(0, 10, note="0 = no steering; the steered direction outweighs the output's own from 1"),
              grid=(0.01, 0.1, 0.17)),
        Param("mix", 0.3, "--logits-alpha 0.3 (every script; 0: no augmentation)",
              check=Range(0, 1, note="0 = the final logits alone"), grid=(0.1, 0.3, 0.5)),
        Param("logits_layers", "25-30", "--logits-layers 25,30: the outputs of layers 25 to 30 of LLaVA-1.5's 32",
              check=layer_spec_check("logits layers", ()),
              accepts="LLM layer indices or ranges, below the last layer (checked with the model)"),
    )  # fmt: skip

    def factual_edit(self, config: Settings) -> Steering | None:
        return Steering(config.param("lam")) if config.param("lam") > 0 else None

    def exit_layers(self, config: Settings, n_layers: int, tied: bool) -> tuple[int, ...]:
        if config.param("mix") == 0:
            return ()
        spec = config.param("logits_layers")
        try:
            layers = resolve_layers(spec, n_layers, what="logits layer")
        except ConfigError as err:
            raise ConfigError(f"vista: {err}; give --param logits_layers=... within the LLM's layers") from None
        if layers[-1] == n_layers - 1:
            raise ConfigError(
                f"vista: logits_layers={spec!r} includes the last layer ({n_layers - 1}), whose output is the final "
                f"logits' own; give layers up to {n_layers - 2}"
            )
        return tuple(i + 1 for i in layers)  # hidden_states[i + 1] is layer i's output

    def combine(
        self,
        factual: torch.Tensor,
        counterfactuals: dict[str, torch.Tensor],
        config: Settings,
        step: int,
        exits: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if not exits:
            return factual
        return vista_scores(factual, torch.stack([exits[i] for i in sorted(exits)]), config.param("mix"))
