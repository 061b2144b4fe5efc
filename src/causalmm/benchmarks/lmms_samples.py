"""lmms-eval's logged samples (``--log_samples``: ``<output_path>/<model>/<date>_samples_<task>.jsonl``) as POPE
records, so ``causalmm score pope`` scores lmms-eval's answers with the official parser.

lmms-eval's own POPE scorer compares ``pred.lower().strip()`` with the label exactly ("Yes." is wrong) and its
``pope_yes_ratio`` counts the *labels*; ``causalmm score pope`` parses each answer (the official rule, or
``--parse substring``) and counts the answers, so the two tables differ on the same answers.

A line holds ``doc_id``, the answer in ``filtered_resps`` (or ``resps``; a string or a list of them), the label in
``target``, and the question id in ``doc.question_id`` when docs are logged or in the POPE metric entries
(``pope_accuracy.question_id``) otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import BenchmarkError

__all__ = ["is_lmms_sample", "read_lmms_pope_samples"]


def is_lmms_sample(item: Any) -> bool:
    """Whether a JSON record is a line of lmms-eval's logged samples."""
    return isinstance(item, dict) and "doc_id" in item and ("filtered_resps" in item or "resps" in item)


def _first_text(value: Any) -> str | None:
    """The answer in ``filtered_resps``/``resps``: a string, or the first string of (nested) lists."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _question_id(item: dict[str, Any]) -> str | None:
    doc = item.get("doc")
    if isinstance(doc, dict) and doc.get("question_id") is not None:
        return str(doc["question_id"])
    for value in item.values():
        if isinstance(value, dict) and value.get("question_id") is not None:
            return str(value["question_id"])
    return None


def read_lmms_pope_samples(items: list[tuple[int, Any]], path: Path) -> list[dict[str, Any]]:
    """POPE records (``id``, ``text``, ``label``, ``question_id``, ``doc_id``, ``category`` when logged) from the
    lines of an lmms-eval samples file. Ids are the question ids, prefixed by the category when the docs are logged
    with several categories, and the doc index where question ids repeat."""
    records = []
    for lineno, item in items:
        where = f"{path}: line {lineno}"
        if not is_lmms_sample(item):
            raise BenchmarkError(f"{where}: not an lmms-eval sample (doc_id, filtered_resps, target)")
        text = _first_text(item.get("filtered_resps", item.get("resps")))
        if text is None:
            raise BenchmarkError(f"{where}: its filtered_resps/resps hold no answer text")
        doc = item.get("doc") if isinstance(item.get("doc"), dict) else {}
        label = str(item.get("target", doc.get("answer", ""))).strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkError(
                f"{where}: target {item.get('target')!r} is not yes/no; are these a POPE task's samples?"
            )
        rec = {"doc_id": item["doc_id"], "question_id": _question_id(item), "text": text, "label": label}
        if isinstance(item.get("input"), str):
            rec["input"] = item["input"]
        if doc.get("category") is not None:
            rec["category"] = str(doc["category"])
        records.append(rec)
    if not records:
        raise BenchmarkError(f"{path}: no samples")
    several = len({r.get("category") for r in records}) > 1
    for r in records:
        qid = r["question_id"] if r["question_id"] is not None else f"doc{r['doc_id']}"
        r["id"] = f"{r['category']}/{qid}" if several else qid
    if len({r["id"] for r in records}) < len(records):
        for r in records:
            r["id"] = f"doc{r['doc_id']}"
    return records
