"""The row layout of one generation call: which rows each prompt gets, the image features each row reads, its
random draws, and the keys that say which rows compute the same thing (and may share that work).

Every prompt gets a factual row, then one row per counterfactual branch and draw (``num_cf_samples``). A row's
image is what its branch needs (:attr:`~causalmm.methods.Branch.image`): the factual features, the features of
a vision-intervened tower, those of a noised image, or none (a text-only branch); its prompt is the sample's,
or the variant its branch reads (:attr:`~causalmm.methods.Branch.prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import seeds as streams
from ..methods.base import Branch  # the submodule: the methods package imports the rule from decoding
from ..sites import Draws

__all__ = ["Row", "RowLayout"]


@dataclass(frozen=True)
class Row:
    """One row of the batch: a prompt's factual run (``branch=None``) or one draw of one of its branches."""

    prompt: int
    branch: Branch | None = None
    draw: int = 0

    @property
    def image(self) -> str:
        """The image features this row reads: ``factual``, ``vision``, ``noise`` or ``none``."""
        return "factual" if self.branch is None else self.branch.image

    @property
    def kind(self) -> str:
        """The prompt this row reads: ``factual``, ``text`` or the name of its branch's variant."""
        return "factual" if self.branch is None else self.branch.prompt

    @property
    def language(self) -> bool:
        """Whether the LLM's attention is intervened in this row."""
        return self.branch is not None and self.branch.language

    @property
    def feature_draw(self) -> int:
        """The draw of this row's image features (factual and transformed features have one)."""
        return 0 if self.image in ("factual", "transform") else self.draw


class RowLayout:
    """The rows of ``n`` prompts under ``branches`` with ``draws`` draws each, and what they need.

    ``encs[kind][p]``: prompt ``p``'s processor outputs as rows of prompt kind ``kind`` read it (``factual``, and
    each variant the branches read); ``imgs[p]``: its image inputs; ``variant_imgs[kind][p]``: those of the image a
    ``transform`` branch's variant ``kind`` reads instead.
    ``same_image[kind][p]``: the first prompt whose ``kind`` features equal prompt ``p``'s (itself where no
    reuse is wanted): factual features follow the image, vision and noise features the image and its seed.
    ``image_prefix[kind][p]``: the length of that prompt's image prefix (up to its last image token; 0: none).
    """

    def __init__(
        self,
        n: int,
        branches: Sequence[Branch],
        draws: int,
        seeds: Sequence[int],
        image_seeds: Sequence[int],
        same_image: dict[str, list[int]],
        image_prefix: dict[str, list[int]],
        encs: dict[str, list[dict[str, torch.Tensor]]],
        imgs: list[dict[str, torch.Tensor]],
        variant_imgs: dict[str, list[dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.rows = [Row(p) for p in range(n)]
        self.rows += [Row(p, b, k) for p in range(n) for b in branches for k in range(draws)]
        self.seeds, self.image_seeds = list(seeds), list(image_seeds)
        self.same_image, self.image_prefix = {**same_image, "none": list(range(n))}, image_prefix
        self.encs, self.imgs, self.variant_imgs = encs, imgs, variant_imgs or {}

    def enc(self, r: Row) -> dict[str, torch.Tensor]:
        """The processor outputs (token keys) row ``r`` reads."""
        return self.encs[r.kind][r.prompt]

    def image_inputs(self, r: Row) -> dict[str, torch.Tensor] | None:
        """The image inputs of row ``r``'s prompt (the transformed image's for a ``transform`` row), ``None`` for a
        text-only row."""
        if r.image == "transform":
            return self.variant_imgs[r.kind][r.prompt]
        return None if r.image == "none" else self.imgs[r.prompt]

    def prefix_len(self, r: Row) -> int:
        """The length of row ``r``'s image prefix (0 for a text-only row)."""
        return self.image_prefix[r.kind][r.prompt]

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
        key: tuple = (r.kind, r.image, self.same_image[r.image][r.prompt], r.feature_draw)
        if r.language:
            key += ("language", r.branch.name, r.draw, self.image_seeds[r.prompt])
        return key

    def lower_key(self, r: Row) -> tuple:
        """Rows with equal keys compute the same below the first intervened LLM layer."""
        return r.prompt, r.kind, r.image, r.feature_draw

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
                    self.prefix_len(r),
                )
        return out
