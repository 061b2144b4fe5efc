"""COCO 2014 as CHAIR reads it: image ids from file names, and each image's ground-truth objects (the categories
of its instance annotations and the objects its reference captions name), loaded once per annotations folder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from .base import BenchmarkError
from .coco_objects import caption_objects, node_of_category

__all__ = ["ANNOTATIONS_HINT", "UNKNOWN_IMAGE_FIX", "CocoGroundTruth", "coco_image_id", "load_ground_truth",
           "val_file_name"]  # fmt: skip

ANNOTATIONS_HINT = "pass --annotations DIR with COCO instances_val2014.json and captions_val2014.json"
UNKNOWN_IMAGE_FIX = (
    "CHAIR scores COCO 2014 images: list only those (add instances_train2014.json and captions_train2014.json "
    "beside them for train2014 images)"
)

#: a COCO image file name: COCO_val2014_000000310196.jpg (2014) or 000000310196.jpg (2017); the number is the id
_COCO_FILE = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d+)\.(?:jpe?g|png)", re.IGNORECASE)


def coco_image_id(name: str) -> int | None:
    """The COCO image id in an image file name (any folder part ignored), or ``None`` if it has none."""
    match = _COCO_FILE.fullmatch(Path(name).name)
    return int(match.group(1)) if match else None


def val_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


class CocoGroundTruth:
    """The ground-truth objects of COCO 2014 images, read from one annotations folder.

    Only what CHAIR needs is kept: per image, the COCO categories of its instance annotations and its
    reference captions. val2014 is read on first use; train2014, when its two files are there, only once an
    image is not found in val2014 (the ids of the two splits do not overlap, so pooling them as the reference
    script does gives the same objects). Objects of an image are worked out once and kept.
    """

    SPLITS: ClassVar[tuple[str, ...]] = ("val2014", "train2014")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchmarkError(f"COCO annotations folder not found: {self.root}; {ANNOTATIONS_HINT}")
        self._files = {split: self._split_files(split) for split in self.SPLITS}
        if self._files["val2014"] is None and self._files["train2014"] is None:
            raise BenchmarkError(
                f"no COCO annotations in {self.root} (nor in {self.root / 'annotations'}); {ANNOTATIONS_HINT}"
            )
        self._loaded: set[str] = set()
        self._categories: dict[int, set[str]] = {}
        self._captions: dict[int, list[str]] = {}
        self._known: set[int] = set()
        self._objects: dict[int, frozenset[str]] = {}

    def _split_files(self, split: str) -> tuple[Path, Path] | None:
        """The (instances, captions) files of ``split``, ``None`` if neither is there; an error if one is missing."""
        found = []
        for kind in ("instances", "captions"):
            name = f"{kind}_{split}.json"
            paths = [p for p in (self.root / name, self.root / "annotations" / name) if p.is_file()]
            found.append(paths[0] if paths else None)
        if found[0] is None and found[1] is None:
            return None
        if None in found:
            have, missing = (found[0], "captions") if found[0] else (found[1], "instances")
            raise BenchmarkError(
                f"{have.parent} has {have.name} but no {missing}_{split}.json: CHAIR needs both; {ANNOTATIONS_HINT}"
            )
        return found[0], found[1]

    def _load(self, split: str) -> None:
        self._loaded.add(split)
        files = self._files[split]
        if files is None:
            return
        instances_path, captions_path = files
        instances = _read_json(instances_path)
        try:
            names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
            self._known.update(int(im["id"]) for im in instances.get("images", []))
            for ann in instances["annotations"]:
                self._categories.setdefault(int(ann["image_id"]), set()).add(names[int(ann["category_id"])])
        except (KeyError, TypeError, ValueError) as err:
            raise BenchmarkError(f"{instances_path}: not a COCO instances file ({type(err).__name__}: {err})") from None
        del instances
        captions = _read_json(captions_path)
        try:
            self._known.update(int(im["id"]) for im in captions.get("images", []))
            for ann in captions["annotations"]:
                self._captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BenchmarkError(f"{captions_path}: not a COCO captions file ({type(err).__name__}: {err})") from None
        self._known.update(self._categories, self._captions)
        for name in {n for cats in self._categories.values() for n in cats}:
            if node_of_category(name) is None:
                raise BenchmarkError(f"{instances_path}: category {name!r} is none of the 80 COCO objects CHAIR knows")

    def unknown(self, image_ids: Iterable[int]) -> list[int]:
        """The ids of ``image_ids`` that no annotation file here knows, reading train2014 only when val2014
        leaves some unknown (as :meth:`objects` does)."""
        ids = list(image_ids)
        for split in self.SPLITS:
            if all(i in self._known for i in ids):
                break
            if split not in self._loaded:
                self._load(split)
        return [i for i in ids if i not in self._known]

    def files(self) -> str:
        """The annotation files read, for messages: ``instances_val2014.json, captions_val2014.json in DIR``."""
        paths = [p for split in self.SPLITS if (pair := self._files[split]) is not None for p in pair]
        folders = {p.parent for p in paths}
        names = ", ".join(p.name for p in paths)
        return f"{names} in {folders.pop()}" if len(folders) == 1 else ", ".join(str(p) for p in paths)

    def objects(self, image_id: int) -> frozenset[str]:
        """The image's ground-truth objects (COCO category names). Raises BenchmarkError for an unknown image."""
        cached = self._objects.get(image_id)
        if cached is not None:
            return cached
        if self.unknown([image_id]):
            raise BenchmarkError(
                f"image {image_id} is in none of the COCO annotations ({self.files()}); {UNKNOWN_IMAGE_FIX}"
            )
        found = {node_of_category(name) for name in self._categories.get(image_id, ())}
        for caption in self._captions.get(image_id, ()):
            found.update(caption_objects(caption).objects)
        result = frozenset(n for n in found if n is not None)
        self._objects[image_id] = result
        return result


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"cannot read {path}: {err}") from err


_GROUND_TRUTH: dict[Path, CocoGroundTruth] = {}


def load_ground_truth(root: str | Path) -> CocoGroundTruth:
    """The :class:`CocoGroundTruth` of an annotations folder, one per folder and process."""
    key = Path(root).expanduser().resolve()
    if key not in _GROUND_TRUTH:
        _GROUND_TRUTH[key] = CocoGroundTruth(key)
    return _GROUND_TRUTH[key]
