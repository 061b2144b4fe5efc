"""AMBER (Wang et al., 2023), discriminative half: yes/no questions on existence, attribute and relation.

Data, as the official release lays it out (``github.com/junyangwang0410/AMBER``, ``data/``):

* ``--data``: a query file, a JSON array of ``{id, image, query}``: ``query_discriminative.json``, one dimension's
  ``query_discriminative-{existence,attribute,relation}.json``, or ``query_all.json`` (its generative items,
  the image descriptions, are left out: an item is discriminative when its annotation's ``type`` is not
  ``generative``, which is how the official ``inference.py`` tells the halves apart). ``--images``: the image
  folder (``AMBER_1.jpg`` ...).
* ``annotations.json``: ``{id, type, truth}`` per query id; ``truth`` is ``yes``/``no`` for the discriminative
  types. Option ``annotations`` gives the file or a folder holding it; without it, ``annotations.json`` is
  looked for beside the query file and one folder up (the official ``data/query/`` + ``data/annotations.json``).

Annotation type -> dimension (the sample's ``dimension`` field): ``discriminative-hallucination`` ->
existence; ``discriminative-attribute-{state,number,action}`` -> state, number, action (together: attribute);
``discriminative-relation`` and ``relation`` -> relation (the release writes its 689 "no" relation questions
with the bare type ``relation``; the official script counts every other non-generative type as relation, an
unknown type is refused here instead). Answers are looked up by the annotation's ``id`` field (the official
script indexes the list by ``id - 1``; the released file has ``id == position + 1`` throughout).

Answer parsing (option ``parse``), named in every output:

* ``official`` (default) — ``inference.py``: the response is "yes" when it *is* ``Yes`` and "no" when it *is*
  ``No``, compared whole and case-sensitively (its README asks for responses of exactly "Yes" or "No"; it
  strips nothing). Anything else is counted ``unparseable`` and scored as the official script scores it: wrong
  whatever the truth, and not a "no" answer (so it lowers accuracy and recall, never precision). Ask for a bare
  word with ``suffix``, e.g. ``" Please answer this question with one word."``.
* ``substring`` — lmms-eval's ``amber_g`` port: "yes" when the lower-cased response contains ``yes``, else
  "no" when it contains ``no`` (so "not" and "nothing" are no), else unparseable.

Metrics (percent), as ``inference.py`` computes them, "no" being the positive class (a hallucination caught):
``accuracy`` = right / questions, ``precision`` = (answered No and truth no) / answered No, ``recall`` =
(answered No and truth no) / truth no, ``f1``; overall and per dimension (``existence/...``, ``attribute/...``,
``state/...``, ``number/...``, ``action/...``, ``relation/...``) for the dimensions the records hold; plus
``unparseable``, ``unparseable_pct`` and ``n``. The official quirks are kept, so that ``round(value, 1)`` is the
number the official script prints for the same answers:

* every denominator starts at 0.001 (its ``metrics.txt``) and counts up by one per question, so nothing divides
  by zero (no "no" answers: precision 0, and F1 0) and 3 right of 4 reads 74.98, printed 75.0; attribute sums
  the state, number and action counters (0.003);
* F1 is ``2PR / (P + R + eps)`` from P and R already rounded to one decimal, ``eps`` 0.0001, but 0.001 for
  existence, as the script has it. Overall F1 is therefore not existence F1 on an existence-only run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from .base import Benchmark, BenchmarkError, Sample, id_field, read_json_records, str_field, unparseable_pct

__all__ = ["DIMENSIONS", "TYPES", "Amber", "amber_metrics", "parse_official", "parse_substring"]

#: annotation ``type`` -> the dimension a question counts in (``generative`` items are not questions)
TYPES: dict[str, str] = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
    "discriminative-relation": "relation",
    "relation": "relation",
}
GENERATIVE = "generative"
_MISSING = object()  # an annotation without ``truth`` (``null`` is a wrong value, named as such)

#: ``dimension`` option -> the question dimensions it keeps
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "discriminative": ("existence", "state", "number", "action", "relation"),
    "existence": ("existence",),
    "attribute": ("state", "number", "action"),
    "state": ("state",),
    "number": ("number",),
    "action": ("action",),
    "relation": ("relation",),
}

#: metric groups reported per dimension: name, the question dimensions it pools (in the script's order), F1's eps
_GROUPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("existence", ("existence",), 0.001),
    ("attribute", ("state", "number", "action"), 0.0001),
    ("state", ("state",), 0.0001),
    ("number", ("number",), 0.0001),
    ("action", ("action",), 0.0001),
    ("relation", ("relation",), 0.0001),
)

GENERATIVE_REFUSAL = (
    "AMBER's generative half (image descriptions scored for hallucinated objects: CHAIR, Cover, Hal, Cog) is not "
    "run natively: its official scorer needs spaCy's large English vectors (en_core_web_lg) and nltk's tokenizer, "
    "tagger and WordNet data, which no package registry carries. Run it through lmms-eval's task amber_g with "
    "causalmm as the model: `lmms-eval --model causalmm --model_args pretrained=MODEL,method=causalmm --tasks "
    "amber_g` (docs/integrations.md, docs/benchmarks.md); this runner scores the discriminative half "
    "(--dimension discriminative, existence, attribute, state, number, action or relation)"
)


def parse_official(text: str) -> str:
    """The answer (yes, no or other) under ``inference.py``'s rule: the whole response is ``Yes`` or ``No``."""
    return "yes" if text == "Yes" else "no" if text == "No" else "other"


def parse_substring(text: str) -> str:
    """The answer (yes, no or other) under lmms-eval ``amber_g``'s rule: ``yes``, else ``no``, in the lower-cased
    response."""
    lowered = text.lower()
    return "yes" if "yes" in lowered else "no" if "no" in lowered else "other"


_PARSERS = {"official": parse_official, "substring": parse_substring}
_RULES = {
    "official": "AMBER official rule: the answer is not exactly 'Yes' or 'No'",
    "substring": "AMBER substring rule: neither 'yes' nor 'no' in the answer",
}


# -- metrics -----------------------------------------------------------------------------------------------
_SEEDED = [0.001]


def _seeded(count: int) -> float:
    """A denominator as the official script holds it after ``count`` questions: 0.001, plus one per question,
    added one at a time (the float sum, so the value is the script's to the last bit)."""
    while len(_SEEDED) <= count:
        _SEEDED.append(_SEEDED[-1] + 1)
    return _SEEDED[count]


@dataclass
class _Counts:
    """One dimension's counters (the script's ``*_num``/``*_score`` pairs, as plain integers)."""

    questions: int = 0
    right: int = 0
    truth_no: int = 0  # the recall denominator
    said_no: int = 0  # the precision denominator
    caught: int = 0  # answered No and truth no: the numerator of both


def _scores(parts: Sequence[_Counts], eps: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the pooled ``parts`` (each its own seeded counters, summed in order
    as the script sums attribute's three)."""
    questions = sum(_seeded(c.questions) for c in parts)
    truth_no = sum(_seeded(c.truth_no) for c in parts)
    said_no = sum(_seeded(c.said_no) for c in parts)
    right, caught = sum(c.right for c in parts), sum(c.caught for c in parts)
    accuracy = right / questions * 100
    precision = caught / said_no * 100
    recall = caught / truth_no * 100
    p, r = round(precision, 1), round(recall, 1)  # the script's F1 takes the printed (rounded) P and R
    f1 = 2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def amber_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Overall and per-dimension accuracy, precision, recall and F1 ("no" positive) of parsed records
    (``label``, ``answer``, ``dimension``), by the official formulas (see the module notes)."""
    # one pass over the records (the bootstrap scores a thousand resamples), then at most 30 cells
    cells = Counter(map(itemgetter("dimension", "label", "answer"), records))
    total, by_dim = _Counts(), {d: _Counts() for d in DIMENSIONS["discriminative"]}
    for (dimension, label, answer), k in cells.items():
        for c in (total, by_dim[dimension]):
            c.questions += k
            c.right += k * (answer == label)
            c.truth_no += k * (label == "no")
            c.said_no += k * (answer == "no")
            c.caught += k * (answer == "no" and label == "no")
    out = _scores([total], 0.0001)
    for name, dims, eps in _GROUPS:
        parts = [by_dim[d] for d in dims]
        if any(c.questions for c in parts):
            out.update({f"{name}/{k}": v for k, v in _scores(parts, eps).items()})
    return out


# -- the benchmark -----------------------------------------------------------------------------------------
class Amber(Benchmark):
    """AMBER's discriminative half. Options: ``dimension`` (default ``discriminative``: all questions),
    ``suffix`` (appended to each query; default none: the release ships no generation script to add one),
    ``parse`` (``official`` | ``substring``) and ``annotations`` (``annotations.json`` or its folder)."""

    name = "amber"
    max_new_tokens = 16
    #: the AMBER score, (1 - CHAIR + F1) / 2, takes the discriminative half by its F1
    primary = "f1"
    paired_test = "mcnemar"
    headline = ("accuracy", "precision", "recall", "f1")

    def __init__(
        self,
        *,
        dimension: str = "discriminative",
        suffix: str = "",
        parse: str = "official",
        annotations: str | Path | None = None,
    ) -> None:
        if dimension == GENERATIVE:
            raise BenchmarkError(GENERATIVE_REFUSAL)
        if dimension not in DIMENSIONS:
            raise BenchmarkError(
                f"AMBER dimension {dimension!r} is unknown; choose one of {', '.join(DIMENSIONS)} (the generative "
                "half runs through lmms-eval's task amber_g)"
            )
        if parse not in _PARSERS:
            raise BenchmarkError(f"AMBER parse variant {parse!r} is unknown; choose official or substring")
        if not isinstance(suffix, str):
            raise BenchmarkError(f"the AMBER suffix must be text, got {suffix!r}")
        super().__init__(dimension=dimension, suffix=suffix, parse=parse, annotations=annotations)
        self._truth: dict[Path, dict[str, tuple[str, Any, str]]] = {}

    def describe(self) -> dict[str, Any]:
        # the annotation path is left out: the labels it gives are in every record (and re-checked on resume),
        # so the same run found its annotations.json by itself or through --annotations
        return {k: self.options[k] for k in ("dimension", "parse", "suffix")}

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        return self._samples(Path(data), images, self.options["annotations"])

    def _samples(self, data: Path, images: Path | None, annotations: str | Path | None) -> list[Sample]:
        """The discriminative questions of the query file ``data`` in the chosen dimension, in file order."""
        if data.is_dir():
            example = data / "query" / "query_discriminative.json"
            raise BenchmarkError(f"--data {data} is a folder; pass an AMBER query file, e.g. {example}")
        ann_path = self._annotations_path(data, annotations)
        truth = self._annotations(ann_path)
        wanted = DIMENSIONS[self.options["dimension"]]
        samples, seen, generative = [], set(), 0
        for lineno, item in read_json_records(data, what="AMBER query"):
            where = f"{data}: line {lineno}"
            if not isinstance(item, dict):
                raise BenchmarkError(f"{where}: expected an object with id, image, query (an AMBER query file)")
            missing = [k for k in ("id", "image", "query") if k not in item]
            if missing:
                raise BenchmarkError(
                    f"{where}: missing field(s) {', '.join(missing)}; --data takes an AMBER query file "
                    "({id, image, query} items, e.g. data/query/query_discriminative.json)"
                )
            qid = id_field(item, "id", where)
            if qid in seen:
                raise BenchmarkError(f"{where}: duplicate id {qid}")
            seen.add(qid)
            if qid not in truth:
                raise BenchmarkError(
                    f"{where}: id {qid} is not in the annotations {ann_path}; pass the annotations.json of the same "
                    "AMBER release (--annotations)"
                )
            dimension, label = self._label(truth[qid], qid)
            if dimension is None:
                generative += 1
                continue
            name, query = str_field(item, "image", where), str_field(item, "query", where).strip()
            if dimension not in wanted:
                continue
            image = Path(images) / name if images else Path(name)
            meta = {"image": name, "question": query, "label": label, "dimension": dimension}
            samples.append(Sample(qid, image, query + self.options["suffix"], meta, where))
        if not samples:
            if generative == len(seen):
                raise BenchmarkError(f"{data} holds only generative queries (image descriptions): {GENERATIVE_REFUSAL}")
            raise BenchmarkError(
                f"{data} holds no {self.options['dimension']} questions; pick the dimension it holds (--dimension) "
                "or the query file of that dimension"
            )
        return samples

    @staticmethod
    def _annotations_path(data: Path | None, given: str | Path | None) -> Path:
        """``annotations.json``: ``given`` (a file, or a folder holding it), else beside ``data`` or one folder up."""
        if given is not None:
            path = Path(given).expanduser()
            path = path / "annotations.json" if path.is_dir() else path
            if not path.is_file():
                what = "no such file" if path == Path(given).expanduser() else "the folder holds no annotations.json"
                raise BenchmarkError(
                    f"--annotations {given}: {what}; give AMBER's annotations.json (data/annotations.json of the "
                    "release) or the folder holding it"
                )
            return path
        looked = [] if data is None else [data.parent / "annotations.json", data.parent.parent / "annotations.json"]
        for path in looked:
            if path.is_file():
                return path
        where = f" (looked for {' and '.join(map(str, looked))})" if looked else ""
        raise BenchmarkError(
            f"AMBER needs its annotations.json (the truth of every query){where}: pass --annotations "
            "data/annotations.json of the release, or the folder holding it"
        )

    def _annotations(self, path: Path) -> dict[str, tuple[str, Any, str]]:
        """id -> (type, truth, where) of an annotations file, read once; each entry checked when it is used."""
        if path not in self._truth:
            truth: dict[str, tuple[str, Any, str]] = {}
            for lineno, item in read_json_records(path, what="AMBER annotation"):
                where = f"{path}: line {lineno}"
                if not isinstance(item, dict) or "id" not in item or "type" not in item:
                    raise BenchmarkError(
                        f"{where}: expected an object with id, type and truth (AMBER's annotations.json)"
                    )
                aid = id_field(item, "id", where)
                if aid in truth:
                    raise BenchmarkError(f"{where}: duplicate id {aid} (also {truth[aid][2]})")
                truth[aid] = (str_field(item, "type", where), item.get("truth", _MISSING), where)
            self._truth[path] = truth
        return self._truth[path]

    @staticmethod
    def _label(entry: tuple[str, Any, str], qid: str) -> tuple[str | None, str | None]:
        """(dimension, label) of an annotation entry; ``(None, None)`` for a generative one."""
        kind, truth, where = entry
        if kind == GENERATIVE:
            return None, None
        if kind not in TYPES:
            raise BenchmarkError(
                f"{where} (id {qid}): field 'type' is {kind!r}; AMBER's types are {GENERATIVE}, {', '.join(TYPES)}"
            )
        if truth is _MISSING:
            raise BenchmarkError(f"{where} (id {qid}): missing field truth (yes or no)")
        label = str_field({"truth": truth}, "truth", where).strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkError(
                f"{where} (id {qid}): field 'truth' is {truth!r}; a {kind} question's truth is yes or no"
            )
        return TYPES[kind], label

    # -- scoring ------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        answer = _PARSERS[self.options["parse"]](str(record.get("text") or ""))
        return {"answer": answer, "parseable": answer != "other"}

    def correct(self, record: dict[str, Any]) -> bool | None:
        return record["answer"] == record["label"]

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        out = amber_metrics(records)
        unparseable = sum(1 for r in records if not r["parseable"])
        out["unparseable"] = float(unparseable)
        rule = _RULES[self.options["parse"]]
        out["unparseable_pct"] = unparseable_pct(self.name, unparseable, len(records), rule)
        out["n"] = float(len(records))
        return out

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """Responses to score: the official ``inference.py`` input (a JSON list of ``{"id", "response"}``) or a
        causalmm run's ``predictions.jsonl`` (``id`` and ``text``; its run folder will do), truths from the
        annotations (``annotations``, else the option, else beside ``data``).

        With ``data`` (a query file), its questions of the chosen dimension are scored and each must be answered;
        without, every answered question of the dimension is. Responses to other questions the annotations know
        (generative ones of a ``query_all`` run, other dimensions) are left out, as the official script leaves
        them out of the discriminative numbers; an id the annotations lack is refused.
        """
        path = Path(path)
        if path.is_dir():
            if not (path / "predictions.jsonl").is_file():
                raise BenchmarkError(f"{path} is a folder without predictions.jsonl; pass a responses file")
            path = path / "predictions.jsonl"
        given = annotations if annotations is not None else self.options["annotations"]
        ann_path = self._annotations_path(Path(data) if data is not None else None, given)
        truth = self._annotations(ann_path)
        if data is not None:
            expected = {s.id: s.meta for s in self._samples(Path(data), None, given)}
        else:
            wanted = DIMENSIONS[self.options["dimension"]]
            expected = {}
            for qid, entry in truth.items():
                dimension, label = self._label(entry, qid)
                if dimension in wanted:
                    expected[qid] = {"label": label, "dimension": dimension}
        records: dict[str, dict[str, Any]] = {}
        seen: dict[str, tuple[str, Any]] = {}
        for lineno, item in read_json_records(path, what="AMBER response"):
            where = f"{path}: line {lineno}"
            if not isinstance(item, dict) or "id" not in item:
                raise BenchmarkError(f"{where}: expected an object with id and response (or text)")
            key = next((k for k in ("response", "text") if k in item), None)
            if key is None:
                raise BenchmarkError(f"{where}: no answer field (response, or text in a causalmm predictions.jsonl)")
            qid = id_field(item, "id", where)
            if qid in seen:
                first, seed = seen[qid]
                several = seed != item.get("seed")
                raise BenchmarkError(
                    f"{where}: id {qid} is answered again (first at line {first})"
                    + ("; the file holds several seeds' answers: score one seed's" if several else "")
                )
            seen[qid] = (str(lineno), item.get("seed"))
            text = str_field(item, key, where, blank_ok=True)
            if qid in expected:
                records[qid] = {"id": qid, "text": text, **expected[qid]}
            elif qid not in truth:
                raise BenchmarkError(f"{where}: id {qid} is not in the annotations {ann_path}")
        if data is not None and len(records) < len(expected):
            lacking = [q for q in expected if q not in records]
            raise BenchmarkError(
                f"{path} answers {len(records)} of the {len(expected)} questions of {data}; missing e.g. id "
                f"{', '.join(lacking[:3])}"
            )
        if not records:
            raise BenchmarkError(f"{path} answers none of AMBER's {self.options['dimension']} questions")
        order = {q: i for i, q in enumerate(expected)}
        return sorted(records.values(), key=lambda r: order[r["id"]])

    def write_native(self, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
        """The responses as the official ``inference.py --inference_data`` reads them, ``amber_responses.json``
        (``amber_responses_seed{S}.json`` per seed when several): ``[{"id": int, "response": text}]``, the text
        as generated (the script's own rule then scores it as ``parse=official`` does)."""
        by_seed: dict[Any, list[dict[str, Any]]] = {}
        for r in records:
            by_seed.setdefault(r.get("seed"), []).append(r)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for seed, part in by_seed.items():
            path = out / ("amber_responses.json" if len(by_seed) == 1 else f"amber_responses_seed{seed}.json")
            rows = [{"id": int(r["id"]) if str(r["id"]).isdigit() else r["id"], "response": r.get("text") or ""}
                    for r in part]  # fmt: skip
            path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            paths.append(path)
        return paths
