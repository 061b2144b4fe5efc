"""Seeds and named random streams: the one place every random draw of causalmm gets its seed from.

A draw's seed is a pure function of where it belongs (the sample or image, the stream, the branch, the draw
index), never of the batch it ran in: ``derive_seed(seed, STREAM, *parts)``. The engine, the benchmark runner
and ``visualize`` all name their streams with the constants below, so a figure shows the very maps a
generation drew.

Example:
    >>> derive_seed(0, "q1") == derive_seed(0, "q1")
    True
    >>> derive_seed(0, "q1") != derive_seed(1, "q1")
    True
"""

from __future__ import annotations

import hashlib
import operator
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE",
    "LANGUAGE",
    "LANGUAGE_PREFIX",
    "NOISE",
    "SAMPLING",
    "TRANSFORM",
    "VISION",
    "derive_seed",
    "file_digest",
    "generator",
    "image_seed",
    "pixel_digest",
    "sample_seed",
]

#: the vision branch's counterfactual attention maps: ``(image seed, VISION, draw)``
VISION = "vision"
#: VCD's diffusion noise: ``(image seed, NOISE, draw)``
NOISE = "noise"
#: a language row's maps over queries after its image prefix: ``(sample seed, LANGUAGE, branch, draw)``
LANGUAGE = "language"
#: a language row's maps over its image prefix, shared by the questions on one image:
#: ``(image seed, LANGUAGE_PREFIX, branch, draw)``
LANGUAGE_PREFIX = "language prefix"
#: token sampling: ``(sample seed, SAMPLING)``
SAMPLING = "sample"
#: RITUAL's random image transform and its parameters: ``(sample seed, TRANSFORM)``
TRANSFORM = "transform"
#: a run's image seed: ``(run seed, IMAGE, file digest)``
IMAGE = "image"


def _encode(part: int | str) -> bytes:
    """One part of a seed's address, canonically: a type tag, the length, then the whole value (an int as its
    decimal digits, a string as UTF-8), so no two different tuples of parts share an encoding."""
    if isinstance(part, str):
        tag, body = b"s", part.encode("utf-8", "surrogatepass")
    elif isinstance(part, bool) or not hasattr(part, "__index__"):
        raise TypeError(f"seed parts are ints or strings, got {type(part).__name__} {part!r}")
    else:
        tag, body = b"i", str(operator.index(part)).encode()
    return tag + len(body).to_bytes(8, "little") + body


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints and strings (independent streams per sample, branch, draw).

    Every part is hashed whole: a BLAKE2b digest of the parts' canonical encoding, so ids that share a prefix
    (MME's ``existence/...``, COCO image ids, image digests) get unrelated seeds, and ``("ab", "c")``,
    ``("a", "bc")`` and ``(1,)`` vs ``("1",)`` differ. Any collision is one of the 63-bit digest itself.
    """
    h = hashlib.blake2b(digest_size=8, person=b"causalmm-seed/2")
    for part in parts:
        h.update(_encode(part))
    return int.from_bytes(h.digest(), "little") >> 1


def generator(device: torch.device | str, *parts: int | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def sample_seed(run_seed: int, sample_id: int | str) -> int:
    """The seed of one sample of a run: its counterfactual draws after the image prefix, and sampling."""
    return derive_seed(run_seed, sample_id)


def image_seed(run_seed: int, digest: str) -> int:
    """The seed of one image in a run (``digest`` from :func:`file_digest`): the draws over the image (vision
    branch, VCD noise, the language branch's image prefix), shared by every question on that image."""
    return derive_seed(run_seed, IMAGE, digest)


def file_digest(image: str | os.PathLike | bytes) -> str:
    """A digest of an image file's bytes (or of encoded bytes): equal files get equal image seeds, wherever
    they lie. ``causalmm eval`` seeds an image by it: the file's bytes, or the encoded bytes a parquet export
    holds (``lmms-lab/POPE``'s ``image`` column), which the lmms-eval plugin reads too."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def pixel_digest(image: Image.Image) -> str:
    """A digest of a decoded image's pixels (mode, size, pixel bytes), for images that come without their file:
    the lmms-eval plugin's fallback where a task's image is not the encoded image of its data set (resized,
    cropped or built by the task). It differs from :func:`file_digest` of the same picture, so such images get
    other image seeds than ``causalmm eval`` gives them."""
    h = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    h.update(image.tobytes())
    return h.hexdigest()
