"""CHAIR: how many of the objects a model's image descriptions name are not in the image (COCO val2014).

The model describes each image ("Please describe this image in detail."); each description is read for the
80 COCO objects it names (:mod:`causalmm.benchmarks.coco_objects`), and a named object is *hallucinated*
when it is not among the image's ground-truth objects: the categories of its COCO instance annotations
together with the objects its five COCO reference captions name (Rohrbach et al., 2018).

Metrics (:meth:`Chair.metrics`), over the captions scored; percentages as papers print them:

* ``CHAIR_s`` (percent, lower is better): captions naming at least one hallucinated object / captions.
* ``CHAIR_i`` (percent, lower is better): hallucinated mentions / all object mentions, a mention being each
  time a caption names an object (an object named twice counts twice, as in the reference script).
* ``recall`` (percent): sum over captions of the distinct ground-truth objects the caption names / sum over
  captions of the image's ground-truth objects (the ``Recall`` that the Python 3 port of the reference
  script added and OPERA's ``chair.py`` kept; pooled over captions, not a mean of per-caption recalls).
* ``length`` (words): mean caption length in tokens, punctuation included, two-word objects counted once
  (OPERA's ``Len``, which it prints as this mean word count).
* ``n``: captions scored.

Inputs: an image list (``load``), COCO's ``instances_val2014.json`` and ``captions_val2014.json`` (option
``annotations``: the folder holding them, or its ``annotations/`` subfolder; the train2014 files beside them
are used too, for images not in val2014, as the reference script pools both), and captions made here or
elsewhere (``read_predictions``: JSON lines or a JSON list of ``{"image_id", "caption"}``, the OPERA format).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from .base import Benchmark, BenchmarkError, Sample, read_json_records, read_text
from .coco import ANNOTATIONS_HINT, UNKNOWN_IMAGE_FIX, CocoGroundTruth, coco_image_id, load_ground_truth, val_file_name
from .coco_objects import caption_objects

__all__ = ["DEFAULT_PROMPT", "Chair", "CocoGroundTruth", "coco_image_id", "load_ground_truth", "read_image_list"]

DEFAULT_PROMPT = "Please describe this image in detail."

# -- the benchmark -------------------------------------------------------------------------------------
class Chair(Benchmark):
    """CHAIR on COCO images. Options: ``prompt`` (default :data:`DEFAULT_PROMPT`), ``annotations`` (folder).

    Parsed record fields (:meth:`parse`; all JSON lists of COCO category names, ``words`` an int):
    ``mentioned`` (one entry per object mention, caption order), ``mentioned_words`` (the caption word of
    each mention), ``hallucinated`` (the mentions not in the ground truth), ``recalled`` (distinct
    ground-truth objects mentioned), ``gt_objects`` (the image's ground truth), ``words`` (caption length).
    """

    name: ClassVar[str] = "chair"
    max_new_tokens: ClassVar[int] = 512
    primary: ClassVar[str] = "CHAIR_s"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"CHAIR_s", "CHAIR_i"})
    paired_test: ClassVar[str] = "bootstrap"

    OPTIONS: ClassVar[frozenset[str]] = frozenset({"prompt", "annotations"})

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - self.OPTIONS)
        if unknown:
            raise BenchmarkError(
                f"unknown CHAIR option(s) {', '.join(unknown)}; known: {', '.join(sorted(self.OPTIONS))}"
            )
        prompt = options.get("prompt")
        options["prompt"] = DEFAULT_PROMPT if prompt is None else str(prompt)
        if not options["prompt"].strip():
            raise BenchmarkError("the CHAIR prompt is empty")
        super().__init__(**options)
        self.prompt: str = options["prompt"]
        ann = options.get("annotations")
        self.annotations: Path | None = _annotations_dir(ann) if ann else None

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "annotations": str(self.annotations) if self.annotations else None}

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        """One sample per image of the image list ``data`` (see :func:`read_image_list`), in file order.

        The annotations are checked here too, the folder and that they know every listed image: scoring a
        caption needs its image's ground truth, and finding one missing after hours of generation (at
        scoring) wastes the run, so it fails now, naming the image, its line and the annotation files.
        """
        gt = self.ground_truth()
        listed = read_image_list(data, images=images)
        unknown = set(gt.unknown(image_id for _, image_id, _ in listed))
        if unknown:
            lines = [f"line {line}: {name}" for line, image_id, name in listed if image_id in unknown]
            raise BenchmarkError(
                f"{data}: {len(unknown)} image(s) are in none of the COCO annotations ({gt.files()}), e.g. "
                f"{'; '.join(lines[:3])}; {UNKNOWN_IMAGE_FIX}"
            )
        root = images if images is not None else data.parent
        samples = []
        for _, image_id, file_name in listed:
            meta = {"image_id": image_id, "image": file_name}
            samples.append(Sample(id=str(image_id), image=root / file_name, prompt=self.prompt, meta=meta))
        return samples

    # -- scoring ------------------------------------------------------------------------------------
    def ground_truth(self) -> CocoGroundTruth:
        if self.annotations is None:
            raise BenchmarkError(f"CHAIR needs the COCO annotations: {ANNOTATIONS_HINT}")
        return load_ground_truth(self.annotations)

    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        image_id = _record_image_id(record)
        gt = self.ground_truth().objects(image_id)
        found = caption_objects(str(record.get("text") or ""))
        return {
            "mentioned": found.objects,
            "mentioned_words": found.words,
            "hallucinated": [obj for obj in found.objects if obj not in gt],
            "recalled": sorted({obj for obj in found.objects if obj in gt}),
            "gt_objects": sorted(gt),
            "words": found.length,
        }

    def outcome(self, record: dict[str, Any]) -> tuple[Any, float | None]:
        """The objects the caption names (a change in them is a disagreement) and minus the number of
        hallucinated mentions (fewer is better)."""
        return tuple(sorted(set(record["mentioned"]))), -float(len(record["hallucinated"]))

    def label_of(self, record: dict[str, Any]) -> str | None:
        gt = record.get("gt_objects") or []
        return "objects in the image: " + (", ".join(gt) if gt else "none annotated")

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """CHAIR_s, CHAIR_i, recall (percent), length (tokens per caption), n, of parsed records.

        Ratios with a zero denominator (no object named at all, no ground-truth object) are 0.
        """
        n = len(records)
        if n == 0:
            raise BenchmarkError("no CHAIR records to score")
        bad_captions = hallucinated = mentioned = recalled = gt = words = 0
        for record in records:
            try:
                h = len(record["hallucinated"])
                mentioned += len(record["mentioned"])
                recalled += len(record["recalled"])
                gt += len(record["gt_objects"])
                words += record["words"]
            except KeyError as err:
                raise BenchmarkError(
                    f"CHAIR record {record.get('id')!r} has no {err.args[0]!r}: it was not parsed"
                ) from None
            hallucinated += h
            bad_captions += h > 0
        return {
            "CHAIR_s": 100.0 * bad_captions / n,
            "CHAIR_i": 100.0 * hallucinated / mentioned if mentioned else 0.0,
            "recall": 100.0 * recalled / gt if gt else 0.0,
            "length": words / n,
            "n": n,
        }

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """Captions made elsewhere: JSON lines or a JSON list of objects with ``image_id`` (or ``image``, a
        COCO file name) and ``caption`` (or ``text``/``answer``); also the reference script's
        ``{"imgToEval": {...}}`` file. ``data`` (an image list), when given, must hold every image."""
        if annotations is not None and self.annotations is None:
            self.annotations = _annotations_dir(annotations)
        listed = {image_id: name for _, image_id, name in read_image_list(data)} if data is not None else None
        records: list[dict[str, Any]] = []
        seen: dict[int, str] = {}
        for number, (lineno, item) in enumerate(_prediction_items(path), 1):
            where = f"{path}: line {lineno}" if lineno else f"{path}: entry {number}"
            if not isinstance(item, dict):
                raise BenchmarkError(f"{where}: expected an object with image_id and caption")
            caption = next((item[k] for k in ("caption", "text", "answer") if k in item), None)
            if not isinstance(caption, str):
                raise BenchmarkError(f"{where}: no caption (a string under 'caption', 'text' or 'answer')")
            image_id, file_name = _item_image(item, where)
            if image_id in seen:
                raise BenchmarkError(f"{where}: image {image_id} has a caption already ({seen[image_id]})")
            seen[image_id] = where.rsplit(": ", 1)[1]
            if listed is not None:
                if image_id not in listed:
                    raise BenchmarkError(f"{where}: image {image_id} is not in the image list {data}")
                if "image" not in item:
                    file_name = listed[image_id]
            records.append({"id": str(image_id), "text": caption, "image_id": image_id, "image": file_name})
        return records

    def write_native(self, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
        """The captions as the reference ``chair.py`` reads them: JSON lines of ``image_id`` and ``caption``,
        one file per seed (``chair_captions.jsonl``, or ``chair_captions_seed{S}.jsonl`` for several seeds)."""
        by_seed: dict[Any, list[dict[str, Any]]] = {}
        for record in records:
            by_seed.setdefault(record.get("seed"), []).append(record)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for seed, group in by_seed.items():
            name = "chair_captions.jsonl" if len(by_seed) == 1 else f"chair_captions_seed{seed}.jsonl"
            path = out / name
            with path.open("w", encoding="utf-8") as f:
                for record in group:
                    line = {"image_id": _record_image_id(record), "caption": str(record.get("text") or "")}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
            written.append(path)
        return written


# -- readers -------------------------------------------------------------------------------------------
def _annotations_dir(path: str | Path) -> Path:
    """The annotations folder, absolute; one of its COCO files stands for the folder."""
    path = Path(path).expanduser().resolve()
    return path.parent if path.is_file() and path.suffix == ".json" else path


def read_image_list(data: Path, images: Path | None = None) -> list[tuple[int, int, str]]:
    """(line, image id, file name) of each image of an image list, in file order.

    The list is a text file with one COCO file name per line (``COCO_val2014_000000310196.jpg``; blank lines
    skipped), or a JSON list / JSON lines of file names or of objects with ``image`` (file name) or
    ``image_id``. An id alone becomes ``COCO_val2014_<id>.jpg`` (the 2017 name ``<id>.jpg`` when only that
    is under ``images``). Raises BenchmarkError naming the file and line of a bad entry or a repeated image.
    """
    text = read_text(data, what="CHAIR image list")
    if text.lstrip()[:1] in ("[", "{"):
        items = read_json_records(data, what="CHAIR image list")
    else:
        items = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not items:
        raise BenchmarkError(f"CHAIR image list {data} is empty: it needs one COCO image file name per line")
    out: list[tuple[int, int, str]] = []
    seen: dict[int, int] = {}
    for lineno, item in items:
        where = f"{data}: line {lineno}"
        if isinstance(item, str):
            image_id, file_name = _file_name_id(item, where), item
        elif isinstance(item, dict):
            image_id, file_name = _item_image(item, where, images=images)
        else:
            raise BenchmarkError(f"{where}: expected a COCO image file name or an object with image or image_id")
        if image_id in seen:
            raise BenchmarkError(f"{where}: image {image_id} is listed twice (also line {seen[image_id]})")
        seen[image_id] = lineno
        out.append((lineno, image_id, file_name))
    return out


def _file_name_id(name: str, where: str) -> int:
    image_id = coco_image_id(name)
    if image_id is None:
        raise BenchmarkError(f"{where}: {name!r} is not a COCO image file name (like COCO_val2014_000000310196.jpg)")
    return image_id


def _item_image(item: dict[str, Any], where: str, images: Path | None = None) -> tuple[int, str]:
    """(image id, file name) of a JSON entry with ``image`` and/or ``image_id``."""
    name = item.get("image")
    if name is not None and not isinstance(name, str):
        raise BenchmarkError(f"{where}: 'image' must be a file name, got {name!r}")
    raw_id = item.get("image_id")
    if raw_id is not None:
        try:
            image_id = int(raw_id)
        except (TypeError, ValueError):
            raise BenchmarkError(f"{where}: image_id must be a COCO image number, got {raw_id!r}") from None
        if isinstance(raw_id, (bool, float)) or image_id < 0:
            raise BenchmarkError(f"{where}: image_id must be a COCO image number, got {raw_id!r}")
        if name is not None and coco_image_id(name) not in (None, image_id):
            raise BenchmarkError(f"{where}: image {name!r} does not match image_id {image_id}")
        if name is None:
            name = val_file_name(image_id)
            if images is not None and not (images / name).is_file() and (images / f"{image_id:012d}.jpg").is_file():
                name = f"{image_id:012d}.jpg"
        return image_id, name
    if name is None:
        raise BenchmarkError(f"{where}: no image_id and no image (COCO file name)")
    return _file_name_id(name, where), name


def _prediction_items(path: Path) -> list[tuple[int, Any]]:
    """Items of a prediction file; the reference ``{"imgToEval": {...}}`` form gives line 0 for each."""
    try:
        head = path.read_text(encoding="utf-8").lstrip()[:1]
    except (OSError, UnicodeDecodeError):
        head = ""
    if head == "{":
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("imgToEval"), dict):
            return [(0, item) for item in whole["imgToEval"].values()]
    return read_json_records(path, what="CHAIR predictions")


def _record_image_id(record: dict[str, Any]) -> int:
    """The COCO image id of a record: ``image_id`` (top level or in ``meta``), else the record's id."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    for raw in (record.get("image_id"), meta.get("image_id"), record.get("id")):
        if raw is None:
            continue
        try:
            return int(raw)
        except (TypeError, ValueError):
            break
    raise BenchmarkError(f"CHAIR record {record.get('id')!r} has no COCO image_id")
