"""What the plugin needs from an lmms-eval request's doc: its sample id and its image's digest, found so that a
request gets the seeds ``causalmm eval`` gives the same question (``causalmm.seeds``).

``causalmm eval`` seeds a sample by ``sample_seed(run seed, sample id)`` and its image by
``image_seed(run seed, file_digest(bytes))``, the bytes being the image file or the encoded image a parquet export
holds. lmms-eval hands a model decoded PIL images (``doc_to_visual``), so the bytes are taken from the data set
itself: the doc's image column read undecoded (``datasets.Image(decode=False)``), where the encoded bytes of
``lmms-lab/POPE``-style parquet files lie (or the file a path-based column names). They are used only when they
decode to the very pixels the task hands over; otherwise (a task that resizes, crops or draws its image) the
image is known by :func:`causalmm.seeds.pixel_digest`, a digest of its RGB pixels, and its image seeds differ
from ``causalmm eval``'s.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from ..seeds import file_digest, pixel_digest
from .args import ModelArgsError

__all__ = ["ImageDigests", "SampleIds"]


class SampleIds:
    """A request's sample id, from which its seed comes.

    ``auto``: POPE's rule in ``causalmm eval``: the doc's ``question_id``, prefixed by its ``category`` when the
    split holds several categories (ids may repeat across them), else the doc index.
    ``doc_id``: the doc index. Anything else: that doc field.
    """

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode
        self._multi: dict[int, tuple[Any, bool]] = {}

    def __call__(self, dataset: Any, doc: dict[str, Any], doc_id: int, task: str) -> str:
        if self.mode == "doc_id":
            return str(doc_id)
        if self.mode != "auto":
            if self.mode not in doc:
                fields = ", ".join(k for k in doc if not isinstance(doc[k], Image.Image))
                raise ModelArgsError(
                    f"sample_id={self.mode}: the docs of task {task} have no such field; use one of {fields}, "
                    "doc_id or auto"
                )
            return str(doc[self.mode])
        if "question_id" not in doc:
            return str(doc_id)
        qid = str(doc["question_id"])
        if "category" in doc and self._several_categories(dataset):
            return f"{doc['category']}/{qid}"
        return qid

    def _several_categories(self, dataset: Any) -> bool:
        key = id(dataset)
        if key not in self._multi:
            try:
                several = len(set(dataset["category"])) > 1
            except (KeyError, TypeError, ValueError):
                several = False
            self._multi[key] = (dataset, several)
        return self._multi[key][1]


class ImageDigests:
    """The digest a request's image is seeded by: of its encoded bytes in the data set when they decode to the
    image the task hands over, else of its pixels (see the module notes)."""

    def __init__(self) -> None:
        # keyed by id(), holding the data set itself so that its id is not reused while cached
        self._raw: dict[int, tuple[Any, Any, list[str]] | None] = {}
        self._decoded: dict[str, str] = {}
        #: how many digests came from encoded bytes and how many from pixels (reported in the run's log)
        self.counts = {"bytes": 0, "pixels": 0}

    def __call__(self, dataset: Any, doc_id: int, image: Image.Image) -> str:
        pixels = pixel_digest(image.convert("RGB"))
        for data in self._encoded(dataset, doc_id):
            digest = file_digest(data)
            if digest not in self._decoded:
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        self._decoded[digest] = pixel_digest(im.convert("RGB"))
                except OSError:
                    self._decoded[digest] = ""
            if self._decoded[digest] == pixels:
                self.counts["bytes"] += 1
                return digest
        self.counts["pixels"] += 1
        return pixels

    def _encoded(self, dataset: Any, doc_id: int) -> list[bytes]:
        """The encoded images of row ``doc_id``, one per image column (none if the data set has no such column)."""
        view = self._raw_view(dataset)
        if view is None:
            return []
        _, raw, columns = view
        row = raw[int(doc_id)]
        out = []
        for col in columns:
            cell = row.get(col)
            if not isinstance(cell, dict):
                continue
            if cell.get("bytes"):
                out.append(cell["bytes"])
            elif cell.get("path") and Path(cell["path"]).is_file():
                out.append(Path(cell["path"]).read_bytes())
        return out

    def _raw_view(self, dataset: Any) -> tuple[Any, Any, list[str]] | None:
        key = id(dataset)
        if key not in self._raw:
            self._raw[key] = None
            features = getattr(dataset, "features", None)
            if features is not None and hasattr(dataset, "cast_column"):
                import datasets

                columns = [name for name, feat in features.items() if isinstance(feat, datasets.Image)]
                if columns:
                    raw = dataset.select_columns(columns)
                    for col in columns:
                        raw = raw.cast_column(col, datasets.Image(decode=False))
                    self._raw[key] = (dataset, raw, columns)
        return self._raw[key]
