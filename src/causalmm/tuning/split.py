"""The dev/test split of a benchmark, by image: settings are chosen on the dev images, reported on the rest.

Split by image, not by question: POPE asks six questions about each image and MME two, so a split by question
would tune on the very images the test then asks about. A sample belongs with its image and with its scoring
unit (a VLind-Bench instance spans several images, all of which go to the same side), so the split draws
whole groups of samples that share an image or a unit. Images are known by their content digest, so a second
copy of the data under another folder (or another file asking about the same images) is recognised.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..benchmarks.base import Benchmark, BenchmarkError, Sample

__all__ = ["Split", "split_by_image"]


@dataclass(frozen=True)
class Split:
    """A seeded split of a benchmark's images into dev and test.

    Attributes:
        seed: the seed that drew it.
        dev / test: the image digests on each side (sorted).
        names: image digest -> the image's file name (for people reading ``tuning.json``).
        data_digest: the identity of the data it was drawn from (:func:`causalmm.benchmarks.records.data_digest`).
    """

    seed: int
    dev: tuple[str, ...]
    test: tuple[str, ...]
    names: Mapping[str, str]
    data_digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "data_digest": self.data_digest,
            "n_dev_images": len(self.dev),
            "n_test_images": len(self.test),
            "dev": [[d, self.names.get(d, "")] for d in self.dev],
            "test": [[d, self.names.get(d, "")] for d in self.test],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Split:
        dev, test = [tuple(x) for x in d["dev"]], [tuple(x) for x in d["test"]]
        names = {digest: name for digest, name in [*dev, *test]}
        return cls(int(d["seed"]), tuple(x[0] for x in dev), tuple(x[0] for x in test), names, d["data_digest"])


def _groups(bench: Benchmark, samples: Sequence[Sample], digests: Mapping[str, str]) -> list[list[str]]:
    """The image digests that must stay together: those linked by a sample about them or by a scoring unit."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_unit: dict[str, str] = {}
    for s in samples:
        image = find(digests[s.id])
        unit = bench.unit({"id": s.id, **s.meta})
        if unit in by_unit:
            parent[find(by_unit[unit])] = image
        by_unit[unit] = image
    groups: dict[str, list[str]] = {}
    for digest in sorted({digests[s.id] for s in samples}):
        groups.setdefault(find(digest), []).append(digest)
    return sorted(groups.values())


def split_by_image(
    bench: Benchmark,
    samples: Sequence[Sample],
    digests: Mapping[str, str],
    n_dev: int,
    seed: int,
    data_digest: str,
) -> Split:
    """Draw about ``n_dev`` images (whole groups, in a seeded order, until they reach ``n_dev``) for dev; the
    rest is test. The same data and seed give the same split whatever the order of the samples."""
    groups = _groups(bench, samples, digests)
    n_images = sum(len(g) for g in groups)
    if not 1 <= n_dev < n_images:
        raise BenchmarkError(
            f"--dev-images {n_dev}: the data has {n_images} images (in {len(groups)} groups that stay together); "
            f"give 1 to {n_images - 1}, so that both dev and test have images"
        )
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    dev: list[str] = []
    for i in order:
        if len(dev) >= n_dev:
            break
        dev += groups[i]
    if len(dev) >= n_images:
        raise BenchmarkError(
            f"--dev-images {n_dev}: its groups of images take the whole data, leaving no test image; give fewer"
        )
    names: dict[str, str] = {}
    for s in samples:
        if isinstance(s.image, (str, Path)):
            names.setdefault(digests[s.id], Path(s.image).name)
    test = sorted(set(digests[s.id] for s in samples) - set(dev))
    return Split(seed, tuple(sorted(dev)), tuple(test), names, data_digest)
