"""The row layout of one generation call: which rows each prompt gets, the image features each row reads, its
random draws, and the keys that say which rows compute the same thing (and may share that work).

Every prompt gets a factual row, then one row per counterfactual branch and draw (``num_cf_samples``). A row's
image is what its branch needs (:attr:`~causalmm.methods.Branch.image`): the factual features, the features of
a vision-intervened tower, or those of a noised image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import seeds as streams
from ..attention import Draws
from ..methods.base import Branch  # the submodule: the methods package imports the rule from decoding

__all__ = ["Row", "RowLayout"]


@dataclass(frozen=True)
class Row:
    """One row of the batch: a prompt's factual run (``branch=None``) or one draw of one of its branches."""

    prompt: int
    branch: Branch | None = None
    draw: int = 0

    @property
    def image(self) -> str:
        """The image features this row reads: ``factual``, ``vision`` or ``noise``."""
        return "factual" if self.branch is None else self.branch.image

    @property
    def language(self) -> bool:
        """Whether the LLM's attention is intervened in this row."""
        return self.branch is not None and self.branch.language

    @property
    def feature_draw(self) -> int:
        """The draw of this row's image features (factual features have one)."""
        return 0 if self.image == "factual" else self.draw


class RowLayout:
    """The rows of ``n`` prompts under ``branches`` with ``draws`` draws each, and what they need.

    ``same_image[kind][p]``: the first prompt whose ``kind`` features equal prompt ``p``'s (itself where no
    reuse is wanted): factual features follow the image, vision and noise features the image and its seed.
    ``image_prefix[p]``: the length of prompt ``p``'s image prefix (up to its last image token).
    """

    def __init__(
        self,
        n: int,
        branches: Sequence[Branch],
        draws: int,
        seeds: Sequence[int],
        image_seeds: Sequence[int],
        same_image: dict[str, list[int]],
        image_prefix: list[int],
    ) -> None:
        self.rows = [Row(p) for p in range(n)]
        self.rows += [Row(p, b, k) for p in range(n) for b in branches for k in range(draws)]
        self.seeds, self.image_seeds = list(seeds), list(image_seeds)
        self.same_image, self.image_prefix = same_image, image_prefix

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    def feature_key(self, r: Row) -> tuple[str, int, int]:
        """``(kind, prompt, draw)`` of the image features row ``r`` reads."""
        return r.image, r.prompt, r.feature_draw

    def prefix_key(self, r: Row) -> tuple:
        """Rows with equal keys compute the same image prefix: same features, and the same language draws there
        (same branch, draw and image seed) or none."""
        key: tuple = (r.image, self.same_image[r.image][r.prompt], r.feature_draw)
        if r.language:
            key += ("language", r.branch.name, r.draw, self.image_seeds[r.prompt])
        return key

    def lower_key(self, r: Row) -> tuple:
        """Rows with equal keys compute the same below the first intervened LLM layer."""
        return r.prompt, r.image, r.feature_draw

    def language_draws(self, device: torch.device) -> dict[int, Draws]:
        """Each language row's draws: over its image prefix from its image's stream (so the questions on one
        image can share that prefix), after it from its sample's."""
        out = {}
        for i, r in enumerate(self.rows):
            if r.language:
                name = r.branch.name
                out[i] = Draws(
                    streams.generator(device, self.seeds[r.prompt], streams.LANGUAGE, name, r.draw),
                    streams.generator(device, self.image_seeds[r.prompt], streams.LANGUAGE_PREFIX, name, r.draw),
                    self.image_prefix[r.prompt],
                )
        return out
