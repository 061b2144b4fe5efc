"""MME (Fu et al., 2023): 14 yes/no subtasks, two questions per image (one "yes", one "no").

Data, any of:

* the official ``eval_tool/Your_Results`` folder (one ``<subtask>.txt`` per subtask, lines
  ``image<TAB>question<TAB>answer``, two lines per image, consecutive in the release), with ``--images``
  the ``MME_Benchmark_release_version`` folder;
* the release folder itself: per subtask either image files next to one ``<image>.txt`` each (the flat
  variant) or ``images/`` beside ``questions_answers_YN/`` (artwork, celebrity, landmark, posters, scene),
  each question file holding ``question<TAB>answer`` lines;
* the Hugging Face layout (``lmms-lab/MME``: parquet with ``question_id, question, answer, image, category``).

Scoring follows the official ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-Models,
Evaluation branch): the answer, lower-cased, is taken as is when it is exactly "yes"/"no", else from its first
four characters ("yes" before "no"), else "other" (wrong). Per subtask, ``acc`` is the percentage of right
answers, ``acc_plus`` the percentage of images with both answers right, ``score`` = acc + acc_plus (max 200).
``calculation.py`` finds an image's two answers by taking consecutive lines as a pair, which is right only
while the two lines of each image are adjacent, as in the released files; here they are grouped by image
name within the subtask, the definition the script's pairing stands for, so a file whose lines were
reordered is scored right instead of pairing questions of different images. The loaders also put an image's
two questions next to each other (in order of first appearance), so ``--limit`` keeps both and the
``Your_Results`` written here pair right under the official script. ``perception`` sums its 10 subtasks
(max 2000), ``cognition`` its 4 (max 800); ``hallucination`` sums existence, count, position and color (max
800), the subset the hallucination literature reports. More than half the answers "other" warns
(:class:`~causalmm.benchmarks.base.UnparseableWarning`); ``unparseable_pct`` is in the metrics.
``write_native`` writes ``Your_Results`` files with the prediction as a fourth column, which the official
script scores as is.

Files are read as UTF-8 (a non-UTF-8 file is one error naming it and how to convert it); the parquet
columns are type-checked (``question_id``, ``category``, ``question``, ``answer`` strings, ``question_id``
also an integer), so a ``null`` question is refused rather than asked as "None".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    Benchmark,
    BenchmarkError,
    Sample,
    id_field,
    looks_like_hub_id,
    read_table,
    read_text,
    str_field,
    unparseable_pct,
)

__all__ = ["COGNITION", "HALLUCINATION", "PERCEPTION", "Mme", "parse_mme"]

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
HALLUCINATION = ("existence", "count", "position", "color")
SUBTASKS = PERCEPTION + COGNITION
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".PNG")


def parse_mme(text: str) -> str:
    """ "yes", "no" or "other", as the official ``calculation.py`` parses a prediction."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _label(value: str, where: str) -> str:
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkError(f"{where}: answer {value.strip()!r} is not Yes/No")
    return label


class Mme(Benchmark):
    """MME. Options: ``suffix`` appended to each question (default none: the questions already ask for
    yes or no)."""

    name = "mme"
    max_new_tokens = 16
    primary = "total"
    paired_test = "mcnemar"
    headline = ("perception", "cognition", "total", "hallucination")

    def __init__(self, *, suffix: str = "", subtasks: str = "") -> None:
        chosen = [t.strip() for t in subtasks.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in SUBTASKS]
        if unknown:
            raise BenchmarkError(f"MME has no subtask {unknown[0]!r}; choose among {', '.join(SUBTASKS)}")
        # recorded only when set, so the run folders of whole-MME runs describe themselves as before
        super().__init__(suffix=suffix, **({"subtasks": ",".join(chosen)} if chosen else {}))

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        """The samples (of the chosen ``subtasks`` only, when some are named: a paper's table of four)."""
        samples = self._load(data, images)
        if self.options.get("subtasks"):
            keep = set(self.options["subtasks"].split(","))
            samples = [s for s in samples if s.meta["subtask"] in keep]
        return samples

    def _load(self, data: Path, images: Path | None) -> list[Sample]:
        data_s = str(data)
        if Path(data).is_file() and Path(data).suffix not in (".parquet", ".arrow"):
            raise BenchmarkError(
                f"{data} is a file; MME data is a folder (eval_tool/Your_Results, the release folder) or a "
                "parquet/arrow export"
            )
        if looks_like_hub_id(data_s) or Path(data).is_file() or _has_tables(Path(data)):
            if images is not None:
                raise BenchmarkError(
                    f"--images does not apply to {data}: its table holds the images; drop --images (a run records "
                    "only what it used)"
                )
            return self._load_table(data)
        data = Path(data)
        if not data.is_dir():
            raise BenchmarkError(f"MME data not found: {data} (pass eval_tool/Your_Results or the release folder)")
        txts = sorted((p for p in data.glob("*.txt") if p.stem in SUBTASKS), key=_official_order)
        if txts:
            items = self._read_results_dir(data, txts, columns=3)
            root = Path(images) if images else data
        else:
            items = self._read_release(data)
            root = Path(images) if images else data
        samples = [self._sample(sub, img, q, label, k, _image_path(root, sub, img)) for sub, img, q, label, k in items]
        return _pairs_together(samples, lambda s: (s.meta["subtask"], s.meta["image"]))

    def _sample(self, sub: str, img: str, question: str, label: str, k: int, image: Any) -> Sample:
        meta = {"subtask": sub, "image": img, "question": question, "label": label, "k": k}
        return Sample(f"{sub}/{img}#{k}", image, question + self.options["suffix"], meta)

    def _read_results_dir(self, data: Path, files: list[Path], *, columns: int) -> list[tuple]:
        """(subtask, image, question, label, k[, prediction]) from ``<subtask>.txt`` files."""
        unknown = [p.name for p in data.glob("*.txt") if p.stem not in SUBTASKS]
        if unknown:
            raise BenchmarkError(
                f"{data}: {', '.join(unknown[:3])} is not an MME subtask file; expected {', '.join(SUBTASKS)}"
            )
        items = []
        for path in files:
            counts: dict[str, int] = defaultdict(int)
            lines = read_text(path, what="MME results").splitlines()
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r").split("\t")
                if len(parts) < columns or (columns == 3 and len(parts) > 4):
                    want = "image<TAB>question<TAB>answer" + ("<TAB>prediction" if columns == 4 else "")
                    raise BenchmarkError(f"{path}: line {lineno}: expected {want}, got {len(parts)} field(s)")
                img, question, answer = parts[0].strip(), parts[1].strip(), parts[2]
                where = f"{path}: line {lineno}"
                if not img or not question:
                    column = "image" if not img else "question"
                    raise BenchmarkError(f"{where}: the {column} column is empty; each line needs image and question")
                k = counts[img]
                counts[img] += 1
                item = (path.stem, img, question, _label(answer, where), k)
                items.append(item + (("\t".join(parts[3:]),) if columns == 4 else ()))
            _check_pairs(counts, path)
        if not items:
            raise BenchmarkError(f"{data}: the MME files hold no questions")
        return items

    def _read_release(self, data: Path) -> list[tuple]:
        subdirs = sorted((d for d in data.iterdir() if d.is_dir() and d.name in SUBTASKS), key=_official_order)
        if not subdirs:
            raise BenchmarkError(
                f"{data}: no MME subtask files (<subtask>.txt) or folders ({', '.join(SUBTASKS[:4])}, ...) found"
            )
        items = []
        for sub in subdirs:
            qdir = sub / "questions_answers_YN" if (sub / "questions_answers_YN").is_dir() else sub
            counts: dict[str, int] = defaultdict(int)
            for qfile in sorted(qdir.glob("*.txt")):
                img = _find_image_name(sub, qfile.stem)
                if img is None:
                    raise BenchmarkError(f"{qfile}: no image named {qfile.stem}.* in {sub} or {sub / 'images'}")
                for lineno, line in enumerate(read_text(qfile, what="MME question").splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\r").split("\t")
                    if len(parts) != 2:
                        raise BenchmarkError(f"{qfile}: line {lineno}: expected question<TAB>answer")
                    k = counts[img]
                    counts[img] += 1
                    items.append((sub.name, img, parts[0].strip(), _label(parts[1], f"{qfile}: line {lineno}"), k))
            _check_pairs(counts, qdir)
        if not items:
            raise BenchmarkError(f"{data}: the MME folders hold no questions")
        return items

    def _load_table(self, data: Any) -> list[Sample]:
        rows = read_table(data)
        need = ("question_id", "question", "answer", "image", "category")
        missing = [k for k in need if k not in rows[0]]
        if missing:
            raise BenchmarkError(f"{data}: MME table lacks column(s) {', '.join(missing)} (need {', '.join(need)})")
        counts: dict[str, int] = defaultdict(int)
        samples = []
        for i, row in enumerate(rows):
            where = f"{data}: row {i}"
            sub = str_field(row, "category", where)
            if sub not in SUBTASKS:
                raise BenchmarkError(f"{where}: category {sub!r} is not an MME subtask")
            img = id_field(row, "question_id", where).split("/")[-1]
            k = counts[f"{sub}/{img}"]
            counts[f"{sub}/{img}"] += 1
            if not isinstance(row["image"], bytes):
                raise BenchmarkError(f"{where}: the image column holds no encoded image")
            question, answer = str_field(row, "question", where).strip(), str_field(row, "answer", where)
            samples.append(self._sample(sub, img, question, _label(answer, where), k, row["image"]))
        _check_pairs(counts, Path(str(data)))
        return _pairs_together(samples, lambda s: (s.meta["subtask"], s.meta["image"]))

    # -- scoring ------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        answer = parse_mme(str(record.get("text") or ""))
        return {"answer": answer, "parseable": answer != "other"}

    def unit(self, record: dict[str, Any]) -> str:
        return f"{record['subtask']}/{record['image']}"

    def correct(self, record: dict[str, Any]) -> bool | None:
        return record["answer"] == record["label"]

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        by_sub: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_sub[r["subtask"]].append(r)
        out: dict[str, float] = {}
        scores = {}
        for sub in SUBTASKS:
            rs = by_sub.get(sub)
            if not rs:
                continue
            right = [r["answer"] == r["label"] for r in rs]
            acc = 100 * sum(right) / len(right)
            acc_plus = _acc_plus(sub, rs)
            scores[sub] = acc + acc_plus
            out[f"{sub}/acc"], out[f"{sub}/acc_plus"], out[f"{sub}/score"] = acc, acc_plus, acc + acc_plus
        out["perception"] = sum(v for k, v in scores.items() if k in PERCEPTION)
        out["cognition"] = sum(v for k, v in scores.items() if k in COGNITION)
        out["total"] = out["perception"] + out["cognition"]
        out["hallucination"] = sum(v for k, v in scores.items() if k in HALLUCINATION)
        out["subtasks"] = float(len(scores))
        unparseable = sum(1 for r in records if not r["parseable"])
        out["unparseable"] = float(unparseable)
        rule = "calculation.py: neither yes nor no in the first four characters"
        out["unparseable_pct"] = unparseable_pct(self.name, unparseable, len(records), rule)
        out["n"] = float(len(records))
        return out

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """A ``Your_Results`` folder (or one subtask file) with the prediction as the fourth column."""
        if data is not None:
            raise BenchmarkError(
                f"--data does not apply to MME predictions: {path} holds the questions and labels beside each answer; "
                "drop --data"
            )
        path = Path(path)
        files = (
            [path]
            if path.is_file()
            else sorted((p for p in path.glob("*.txt") if p.stem in SUBTASKS), key=_official_order)
        )
        if not files:
            raise BenchmarkError(f"{path}: no MME result files (<subtask>.txt with 4 tab-separated columns)")
        if path.is_file() and path.stem not in SUBTASKS:
            raise BenchmarkError(f"{path}: the file name must be an MME subtask ({', '.join(SUBTASKS)})")
        items = self._read_results_dir(path if path.is_dir() else path.parent, files, columns=4)
        records = [
            {
                "id": f"{sub}/{img}#{k}",
                "text": pred,
                "subtask": sub,
                "image": img,
                "question": q,
                "label": label,
                "k": k,
            }
            for sub, img, q, label, k, pred in items
        ]
        return _pairs_together(records, lambda r: (r["subtask"], r["image"]))

    def write_native(self, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
        """``Your_Results/<subtask>.txt`` for the official ``calculation.py`` (``Your_Results_seed{S}/`` per seed
        when several: the script scores one answer per question, and mixing seeds would pair other seeds'
        answers)."""
        by_seed: dict[Any, list[dict[str, Any]]] = {}
        for r in records:
            by_seed.setdefault(r.get("seed"), []).append(r)
        paths = []
        for seed, part in by_seed.items():
            name = "Your_Results" if len(by_seed) == 1 else f"Your_Results_seed{seed}"
            folder = Path(out) / name
            folder.mkdir(parents=True, exist_ok=True)
            by_sub: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in part:
                by_sub[r["subtask"]].append(r)
            for sub, rs in by_sub.items():
                path = folder / f"{sub}.txt"
                with path.open("w", encoding="utf-8") as fh:
                    # an image's two lines adjacent: calculation.py pairs consecutive lines
                    for r in _pairs_together(rs, lambda r: r["image"]):
                        pred = " ".join(str(r.get("text") or "").split())
                        fh.write(f"{r['image']}\t{r['question']}\t{r['label'].capitalize()}\t{pred}\n")
                paths.append(path)
        return paths


T = TypeVar("T")


def _pairs_together(items: Sequence[T], image: Callable[[T], Any]) -> list[T]:
    """``items`` with those of one image next to each other, images in order of first appearance.

    Stable within an image (its questions keep their ``k`` order), and the identity on the released files,
    whose two lines per image are already adjacent.
    """
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(image(item), []).append(item)
    return [item for group in groups.values() for item in group]


def _acc_plus(subtask: str, records: Sequence[dict[str, Any]]) -> float:
    """Percentage of the subtask's images with every answer right, records grouped by image name.

    A bootstrap resample may hold an image several times (its pair once per draw); each draw is an image, so
    an image drawn twice counts twice, as it does in ``acc``. An odd number of answers for an image is an
    incomplete run, not something to pair with the next image's line.
    """
    by_image: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_image[r["image"]].append(r["answer"] == r["label"])
    images = both = 0
    for name, right in by_image.items():
        if len(right) % 2:
            raise BenchmarkError(
                f"MME {subtask}/{name}: {len(right)} answer(s); each image needs both of its questions answered "
                "(rerun the same `causalmm eval` to finish, or score complete Your_Results files)"
            )
        draws = len(right) // 2
        images += draws
        both += draws if all(right) else 0
    return 100 * both / images


def _official_order(path: Path) -> int:
    """Subtasks in ``calculation.py``'s order (perception, then cognition)."""
    return SUBTASKS.index(path.stem if path.suffix == ".txt" else path.name)


def _has_tables(data: Path) -> bool:
    return data.is_dir() and any(p.suffix in (".parquet", ".arrow") for p in data.rglob("*"))


def _check_pairs(counts: dict[str, int], where: Path) -> None:
    odd = [img for img, c in counts.items() if c != 2]
    if odd:
        raise BenchmarkError(
            f"{where}: MME has exactly two questions per image; {len(odd)} image(s) differ, e.g. "
            f"{odd[0]} has {counts[odd[0]]}"
        )


def _find_image_name(sub: Path, stem: str) -> str | None:
    for folder in (sub, sub / "images"):
        for suffix in _IMAGE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return f"{stem}{suffix}"
    return None


def _image_path(root: Path, sub: str, img: str) -> Path:
    """The image of ``sub``: under ``root/sub/images/`` when that folder exists, else ``root/sub/``."""
    nested = root / sub / "images" / img
    return nested if nested.is_file() or (root / sub / "images").is_dir() else root / sub / img
