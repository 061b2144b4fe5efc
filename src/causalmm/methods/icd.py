"""ICD, Instruction Contrastive Decoding: the contrast with a branch whose prompt carries a disturbance
instruction in place of the system prompt.

Wang et al., ACL Findings 2024; official code github.com/p1k0pan/ICD. The rule ``(1 + alpha) l - alpha l_icd`` on
raw logits under the ``beta`` cut on the factual probabilities is ``icd_utils/icd_sample_llava.py`` (its "version
2" cut-off, ``log(beta) + max l``); the five instructions and their place (the LLaVA system prompt replaced by the
instruction, image and question unchanged) are ``experiments/gen_scripts/icd_llava_pope.py``; its eval scripts
pass ``cd_alpha=1``, ``cd_beta=0.1``. Our rule is the same with ``gamma = alpha`` and ``epsilon = beta``. The
official script runs the whole benchmark once per instruction; ``prefix`` picks one (``1``-``5``, or any text).
The branch's system message is written by the model's own chat template, where the template has a place for one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contrast import contrast
from .base import Branch, Method, Param
from .registry import register

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ICD", "INSTRUCTION", "PREFIXES"]

#: the official disturbance instructions, in ``icd_llava_pope.py``'s order (``prefix=1`` .. ``5``)
PREFIXES: tuple[str, ...] = (
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
)

INSTRUCTION = Branch("instruction", prompt="instruction")


def instruction(prefix: str) -> str:
    """The disturbance instruction ``prefix`` names: ``"1"``..``"5"`` an official one, anything else itself."""
    text = prefix.strip()
    return PREFIXES[int(text) - 1] if text.isdigit() and 1 <= int(text) <= len(PREFIXES) else text


def _check_prefix(value: str) -> str | None:
    if not value.strip():
        return "give 1-5 (an official instruction) or the instruction's text"
    return None


@register
class ICD(Method):
    name = "icd"
    summary = "contrast with a branch whose system prompt is a disturbance instruction"
    reference = "Wang et al., ACL Findings 2024; github.com/p1k0pan/ICD, icd_utils/icd_sample_llava.py"
    params = (
        Param("gamma", 1.0, "alpha = 1 (cd_alpha, the argparse default of icd_llava_pope.py)", grid=(1.0, 2.0, 4.0)),
        Param("epsilon", 0.1, "beta = 0.1 (cd_beta, its argparse default)", grid=(0.01, 0.1)),
        Param("prefix", "4", "one of the five official instructions (the official script runs each in turn)",
              check=_check_prefix, accepts="1-5 (an official instruction) or the instruction's text"),
    )  # fmt: skip
    plausible_only = True

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        return (INSTRUCTION,)

    def branch_prompt(self, branch: Branch, prompt: str, config: Settings) -> tuple[str, str]:
        """The question unchanged, the instruction as the system message."""
        return prompt, instruction(config.param("prefix"))

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        return contrast(factual, [counterfactuals["instruction"]], gamma=config.gamma, epsilon=config.epsilon)
