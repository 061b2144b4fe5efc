"""POPE (Li et al., 2023): yes/no object-existence questions, balanced between present and absent objects.

Data: the official question files (JSON lines or a JSON array of ``{question_id, image, text, label}``:
COCO / A-OKVQA / GQA x random / popular / adversarial) with ``--images`` the image folder, or the Hugging
Face layout (``lmms-lab/POPE``: parquet with ``question_id, question, answer, image[, category]``).

Answer parsing, named in every output (``parse`` option):

* ``official`` — POPE's and LLaVA's ``eval_pope.py``: keep the text before the first ``.``, drop commas,
  split on spaces; the answer is "no" when a word is exactly ``No``, ``no`` or ``not``, else "yes".
  An answer whose first sentence has none of yes/no/not (either case) is still scored "yes", as the
  official script does, and is counted in ``unparseable``.
* ``substring`` — the original CausalMM/VCD ``eval_pope.py``: lower-cased, a "yes" question is right when
  ``"yes"`` is a substring of the answer, a "no" question when ``"no"`` is (so "not", "nothing" and "snow"
  count as no). The parsed answer is therefore label-dependent, as in that script.

Metrics (percent, positive class "yes"): accuracy, precision, recall, F1, yes_ratio; plus ``unparseable``
and ``n`` (counts) and ``unparseable_pct``. Precision/recall/F1 are 0 when their denominator is 0. When more
than half the answers are unparseable a :class:`~causalmm.benchmarks.base.UnparseableWarning` says so: the
official rule scores them "yes", so such a run measures the parser, not the model.

Every field is type-checked as it is read: ``question_id`` an integer or a string (the official files use
integers, the Hugging Face export strings), ``image``, ``text`` and ``label`` strings; anything else (``null``,
a list, a number for a text) is one error naming the file, line (row) and field, never a prompt "None".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import (
    Benchmark,
    BenchmarkError,
    Sample,
    id_field,
    is_table,
    looks_like_hub_id,
    read_json_records,
    read_table,
    str_field,
    unparseable_pct,
)
from .lmms_samples import is_lmms_sample, read_lmms_pope_samples

__all__ = ["Pope", "parse_official", "parse_substring", "yes_no_metrics"]

DEFAULT_SUFFIX = " Please answer this question with one word."
_WORD = re.compile(r"[a-z]+")


def parse_official(text: str) -> tuple[str, bool]:
    """(answer, parseable) under the official POPE/LLaVA rule."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    answer = "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    lowered = set(_WORD.findall(first.lower()))
    return answer, bool(lowered & {"yes", "no", "not"})


def parse_substring(text: str, label: str) -> tuple[str, bool]:
    """(answer, parseable) under the original CausalMM substring rule (label-dependent by construction)."""
    t = text.lower().strip()
    if label == "yes":
        answer = "yes" if "yes" in t else "no"
    else:
        answer = "no" if "no" in t else "yes"
    return answer, ("yes" in t or "no" in t)


def yes_no_metrics(labels: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio in percent, "yes" being the positive class."""
    tp = sum(1 for g, a in zip(labels, answers, strict=True) if g == "yes" and a == "yes")
    fp = sum(1 for g, a in zip(labels, answers, strict=True) if g == "no" and a == "yes")
    tn = sum(1 for g, a in zip(labels, answers, strict=True) if g == "no" and a == "no")
    fn = len(labels) - tp - fp - tn
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100 * (tp + tn) / n if n else 0.0,
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * (tp + fp) / n if n else 0.0,
    }


def _label(value: Any, where: str) -> str:
    label = str(value).strip().lower() if value is not None else ""
    if label not in ("yes", "no"):
        raise BenchmarkError(f"{where}: label {value!r} is not yes/no")
    return label


class Pope(Benchmark):
    """POPE. Options: ``suffix`` (appended to each question), ``parse`` (``official`` | ``substring``),
    ``category`` (keep one category of a multi-category HF export)."""

    name = "pope"
    max_new_tokens = 16
    primary = "accuracy"
    paired_test = "mcnemar"
    headline = ("accuracy", "precision", "recall", "f1", "yes_ratio")

    def __init__(self, *, suffix: str = DEFAULT_SUFFIX, parse: str = "official", category: str | None = None) -> None:
        if parse not in ("official", "substring"):
            raise BenchmarkError(f"POPE parse variant {parse!r} is unknown; choose official or substring")
        super().__init__(suffix=suffix, parse=parse, category=category)

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        if looks_like_hub_id(str(data)) or is_table(Path(data)):
            if images is not None:
                raise BenchmarkError(
                    f"--images does not apply to {data}: its table holds the images; drop --images (a run records "
                    "only what it used)"
                )
            return self._load_table(data)
        if self.options["category"] is not None:
            raise BenchmarkError(
                f"--category applies to the Hugging Face layout (a table with a category column), not to the question "
                f"file {data}, whose questions all belong to one variant: drop --category"
            )
        return self._load_json(Path(data), images)

    def _load_json(self, data: Path, images: Path | None) -> list[Sample]:
        samples, seen = [], set()
        for lineno, item in read_json_records(Path(data), what="POPE question"):
            where = f"{data}: line {lineno}"
            if not isinstance(item, dict):
                raise BenchmarkError(f"{where}: expected an object with question_id, image, text, label")
            missing = [k for k in ("question_id", "image", "text", "label") if k not in item]
            if missing:
                raise BenchmarkError(f"{where}: missing field(s) {', '.join(missing)}")
            qid = id_field(item, "question_id", where)
            if qid in seen:
                raise BenchmarkError(f"{where}: duplicate question_id {qid}")
            seen.add(qid)
            question = str_field(item, "text", where).strip()
            name = str_field(item, "image", where)
            image = Path(images) / name if images else Path(name)
            meta = {
                "question_id": item["question_id"],
                "image": name,
                "question": question,
                "label": _label(str_field(item, "label", where), where),
            }
            samples.append(Sample(qid, image, question + self.options["suffix"], meta, where))
        return samples

    def _load_table(self, data: Path) -> list[Sample]:
        rows = read_table(data)
        need = ("question_id", "question", "answer", "image")
        missing = [k for k in need if k not in rows[0]]
        if missing:
            raise BenchmarkError(f"{data}: POPE table lacks column(s) {', '.join(missing)} (need {', '.join(need)})")
        wanted = self.options["category"]
        samples, seen = [], set()
        multi = len({r.get("category") for r in rows}) > 1
        for i, row in enumerate(rows):
            where = f"{data}: row {i}"
            cat = row.get("category")
            if cat is not None:
                cat = str_field(row, "category", where)
            if wanted and cat != wanted:
                continue
            qid = id_field(row, "question_id", where)
            qid = f"{cat}/{qid}" if multi and not wanted else qid
            if qid in seen:
                raise BenchmarkError(f"{where}: duplicate question_id {qid}")
            seen.add(qid)
            if not isinstance(row["image"], bytes):
                raise BenchmarkError(f"{where}: the image column holds no encoded image")
            source = row.get("image_source")
            meta = {
                "question_id": row["question_id"],
                "image": source if isinstance(source, str) and source else f"row{i}",
                "question": str_field(row, "question", where).strip(),
                "label": _label(str_field(row, "answer", where), where),
            }
            if cat is not None:
                meta["category"] = cat
            samples.append(Sample(qid, row["image"], meta["question"] + self.options["suffix"], meta, where))
        if not samples:
            raise BenchmarkError(f"{data}: no rows with category {wanted!r}")
        return samples

    # -- scoring ------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        text = str(record.get("text") or "")
        if self.options["parse"] == "official":
            answer, ok = parse_official(text)
        else:
            answer, ok = parse_substring(text, record["label"])
        return {"answer": answer, "parseable": ok}

    def correct(self, record: dict[str, Any]) -> bool | None:
        return record["answer"] == record["label"]

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = yes_no_metrics([r["label"] for r in records], [r["answer"] for r in records])
        unparseable = sum(1 for r in records if not r["parseable"])
        out["unparseable"] = float(unparseable)
        rule = f"POPE {self.options['parse']} rule: no yes, no or not in the answer"
        out["unparseable_pct"] = unparseable_pct(self.name, unparseable, len(records), rule)
        out["n"] = float(len(records))
        cats = sorted({r["category"] for r in records if "category" in r})
        if len(cats) > 1:
            for cat in cats:
                part = [r for r in records if r.get("category") == cat]
                m = yes_no_metrics([r["label"] for r in part], [r["answer"] for r in part])
                out[f"{cat}/accuracy"], out[f"{cat}/f1"] = m["accuracy"], m["f1"]
        return out

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """POPE/LLaVA answer files (``question_id`` and ``text`` or ``answer``), matched to ``data`` by id; or
        lmms-eval's logged samples, which carry their labels (``data``, if given, must hold every sample)."""
        items = read_json_records(Path(path), what="POPE answer")
        if is_lmms_sample(items[0][1]):
            return self._lmms_records(items, Path(path), data)
        if data is None:
            raise BenchmarkError("scoring POPE answers needs the question file: pass --data QUESTIONS")
        questions = {s.id: s for s in self._questions(Path(data))}
        records, seen = [], set()
        for lineno, item in items:
            where = f"{path}: line {lineno}"
            if not isinstance(item, dict) or "question_id" not in item:
                raise BenchmarkError(f"{where}: expected an object with question_id and text (or answer)")
            key = next((k for k in ("text", "answer", "prediction", "pred") if k in item), None)
            if key is None:
                raise BenchmarkError(f"{where}: no answer field (text, answer, prediction)")
            qid = id_field(item, "question_id", where)
            if qid not in questions:
                raise BenchmarkError(f"{where}: question_id {qid} is not in {data}")
            if qid in seen:
                raise BenchmarkError(f"{where}: duplicate answer for question_id {qid}")
            seen.add(qid)
            s = questions[qid]
            records.append({"id": qid, "text": str_field(item, key, where, blank_ok=True), **s.meta})
        if len(records) != len(questions):
            lacking = [q for q in questions if q not in seen]
            raise BenchmarkError(
                f"{path} answers {len(records)} of the {len(questions)} questions in {data}; "
                f"missing e.g. question_id {', '.join(lacking[:3])}"
            )
        order = {q: i for i, q in enumerate(questions)}
        return sorted(records, key=lambda r: order[r["id"]])

    def _lmms_records(self, items: list[tuple[int, Any]], path: Path, data: Path | None) -> list[dict[str, Any]]:
        """Records of lmms-eval's logged samples (:mod:`.lmms_samples`), labels from ``data`` when given."""
        records = read_lmms_pope_samples(items, path)
        if data is None:
            return records
        questions = {s.id: s for s in self._questions(Path(data))}
        missing = [r["id"] for r in records if r["id"] not in questions]
        if missing:
            raise BenchmarkError(
                f"{path}: {len(missing)} sample(s) are not in {data} (e.g. question {missing[0]}); pass the question "
                "file the lmms-eval task was made from, or score without --data (the samples carry their labels)"
            )
        for r in records:
            question = questions[r["id"]].meta["question"]
            if "input" in r and question not in r["input"]:
                raise BenchmarkError(
                    f"{path}: sample {r['id']} asked {r['input']!r}, but {data} has {question!r} under that id; "
                    "pass the question file the lmms-eval task was made from"
                )
        return [{**r, **questions[r["id"]].meta, "text": r["text"]} for r in records]

    def _questions(self, data: Path) -> list[Sample]:
        """Questions with labels, without the image check (scoring needs labels, not pixels)."""
        if looks_like_hub_id(str(data)) or is_table(data):
            return self._load_table(data)
        return self._load_json(data, None)
