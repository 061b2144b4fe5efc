"""What every benchmark provides, and the shared readers the benchmark files use.

A benchmark is four things, each replaceable: a *loader* that turns the user's data files into
:class:`Sample` s (one prompt about one image), a *parser* that turns the model's text into the fields
scoring needs, a *scorer* that turns records into metrics (the same code for ``eval`` and for ``score``),
and *readers/writers* for the field's own prediction formats, so numbers made elsewhere can be scored here
and ours can be scored by the official scripts.

A *record* is one JSON-serialisable dict per (sample, seed): the sample's ``id`` and ``meta`` fields, the
model's ``text``, the parsed fields, the ``seed``. Records are what ``predictions.jsonl`` holds, one line each.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "Benchmark",
    "BenchmarkError",
    "Sample",
    "UnparseableWarning",
    "check_images",
    "id_field",
    "read_json_records",
    "read_text",
    "str_field",
    "unparseable_pct",
]


class BenchmarkError(ValueError):
    """Bad benchmark data or options; the message names the file (and line) and what to fix."""


class UnparseableWarning(UserWarning):
    """Most answers of a scored set could not be parsed: the scores measure the parser, not the model."""


@dataclass
class Sample:
    """One prompt about one image.

    Attributes:
        id: stable unique key of the sample within its data file (resume, merge and pairing go by it).
        image: a path, or encoded image bytes (parquet layouts), or ``None`` for a text-only prompt.
        prompt: the text the model gets (the chat template is applied by the model adapter).
        meta: what scoring needs (label, subtask, ...); copied into the record.
        where: where the sample is written in its data (``FILE: line N``), for messages; not recorded.
    """

    id: str
    image: str | Path | bytes | None
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)


class Benchmark:
    """Base class: one subclass per benchmark, options given to ``__init__``.

    Subclasses set the class attributes and implement :meth:`load`, :meth:`parse`, :meth:`metrics` and
    :meth:`read_predictions`; the rest have sensible defaults.
    """

    name: ClassVar[str] = ""
    #: default answer length; yes/no benchmarks need few tokens, captions many
    max_new_tokens: ClassVar[int] = 16
    #: the metric a comparison leads with and tests pairwise
    primary: ClassVar[str] = "accuracy"
    #: metrics where lower is better (CHAIR); the rest are higher-is-better
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    #: "mcnemar" (per-sample right/wrong) or "bootstrap" (paired bootstrap of the primary metric)
    paired_test: ClassVar[str] = "mcnemar"
    #: metrics shown in tables and charts (empty: every metric except the counts ``n``/``unparseable``)
    headline: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self.options = options

    # -- data ---------------------------------------------------------------------------------------
    def load(self, data: Path, images: Path | None) -> list[Sample]:
        """Samples of ``data`` in file order; images resolved under ``images`` (the runner checks they exist,
        after ``--limit``, so a partial image folder serves a limited run). Raises BenchmarkError."""
        raise NotImplementedError

    # -- scoring ------------------------------------------------------------------------------------
    def parse(self, record: dict[str, Any]) -> dict[str, Any]:
        """Fields derived from ``record['text']`` (e.g. ``{"answer": "yes"}``), merged into the record."""
        raise NotImplementedError

    def metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Metrics of one seed's records (already parsed)."""
        raise NotImplementedError

    def unit(self, record: dict[str, Any]) -> str:
        """The bootstrap resampling unit a record belongs to (a sample; MME: an image's question pair)."""
        return str(record["id"])

    def correct(self, record: dict[str, Any]) -> bool | None:
        """Whether the record is right (for McNemar); ``None`` when the notion does not apply."""
        return None

    def outcome(self, record: dict[str, Any]) -> tuple[Hashable, float | None]:
        """What a sample-by-sample comparison of two runs reads (``compare --html``): the parsed answer, whose
        change marks a disagreement, and the record's own score, higher is better (``None`` where the notion does
        not apply), which says whether a change fixed or broke the sample."""
        right = self.correct(record)
        return record.get("answer"), None if right is None else float(right)

    def label_of(self, record: dict[str, Any]) -> str | None:
        """What the record's answer is scored against, as a reader of a report wants to see it."""
        label = record.get("label")
        return None if label is None else str(label)

    def headline_metrics(self, metrics: dict[str, float]) -> list[str]:
        """The metrics a table shows, in order."""
        if self.headline:
            return [m for m in self.headline if m in metrics]
        return [m for m in metrics if m not in ("n", "unparseable", "unparseable_pct") and "/" not in m]

    def describe(self) -> dict[str, Any]:
        """Options that change the numbers (parsing variant, prompt), written next to the metrics."""
        return dict(self.options)

    # -- the field's formats ------------------------------------------------------------------------
    def read_predictions(self, path: Path, data: Path | None, annotations: Path | None) -> list[dict[str, Any]]:
        """Records (unparsed: ``id``, ``text`` and the meta fields) from predictions made elsewhere."""
        raise NotImplementedError

    def write_native(self, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
        """Write the field's own prediction files (MME ``Your_Results``, VLind ``data.json``); paths written."""
        return []


def read_text(path: Path, *, what: str) -> str:
    """The text of a benchmark file, UTF-8 (a leading byte-order mark dropped, as editors on Windows add one).

    A missing file, an unreadable one and one that is not UTF-8 each get one line naming the file, and for
    the encoding the byte offset and how to convert it, instead of a ``UnicodeDecodeError`` traceback.
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BenchmarkError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise BenchmarkError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); the {what} file "
            "must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`, and pass the converted file"
        ) from None
    except OSError as err:
        raise BenchmarkError(f"cannot read {what} file {path}: {err}") from err


_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _shown(value: Any) -> str:
    """``value`` as an error message shows it: its JSON type and a short repr."""
    text = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
    return f"{_KINDS.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


def str_field(item: Mapping[str, Any], key: str, where: str, *, blank_ok: bool = False) -> str:
    """``item[key]`` when it is a string (non-blank unless ``blank_ok``); else one BenchmarkError naming
    ``where`` and the field.

    Loaders used to ``str()`` whatever they found, so a ``null`` question became the prompt "None" and a
    list became "['a', 'b']": the model answered a question nobody asked. Text fields are refused instead.
    ``blank_ok`` is for model answers, where an empty string is a real (unparseable) answer.
    """
    value = item[key]
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: field {key!r} must be a string, got {_shown(value)}; write it as a JSON string")
    if not blank_ok and not value.strip():
        raise BenchmarkError(f"{where}: field {key!r} is empty; give it the text it should hold")
    return value


def id_field(item: Mapping[str, Any], key: str, where: str) -> str:
    """An id field as a string: the official files write ids as integers (POPE's ``question_id``, VLind's
    ``context_id``) or strings (the Hugging Face exports), so both are kept; ``null``, booleans, floats (NaN
    included: ``1.0`` and ``1`` would be one id, NaN none), lists and objects are refused with one line."""
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BenchmarkError(
            f"{where}: field {key!r} must be an integer or a string id, got {_shown(value)}; "
            "give every record its own id as the official files do"
        )
    if isinstance(value, str) and not value.strip():
        raise BenchmarkError(f"{where}: field {key!r} is an empty id; give every record its own id")
    return str(value)


def unparseable_pct(benchmark: str, unparseable: int, n: int, rule: str) -> float:
    """The percentage of answers the parser could not read; warns (:class:`UnparseableWarning`) above half.

    A parser that reads nothing still yields numbers (POPE scores it "yes", MME and VLind score it wrong), so
    a wrong answer field or a model that never says yes/no looks like a bad model rather than a broken run.
    The warning goes to stderr through :mod:`warnings`; the percentage is returned for the metrics, so the
    run's ``metrics.json`` carries it too.
    """
    pct = 100.0 * unparseable / n if n else 0.0
    if 2 * unparseable > n:
        warnings.warn(
            f"{benchmark}: {unparseable} of {n} answers ({pct:.0f}%) could not be parsed ({rule}); the scores do "
            "not measure the model: check its answers (and, scoring a file, that it holds the answer field)",
            UnparseableWarning,
            stacklevel=3,
        )
    return pct


def read_json_records(path: Path, *, what: str) -> list[tuple[int, Any]]:
    """Items of a JSON array file or a JSON-lines file, each with its 1-based line number.

    The error for a malformed line names the file and the line, and for an empty file says so.
    """
    text = read_text(path, what=what)
    stripped = text.lstrip()
    if not stripped:
        raise BenchmarkError(f"{what} file {path} is empty")
    if stripped[0] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchmarkError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(items, list):
            raise BenchmarkError(f"{path}: expected a JSON array of objects")
        return _array_lines(text, items)
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise BenchmarkError(
                f"{path}: line {lineno}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
    if not out:
        raise BenchmarkError(f"{what} file {path} has no records")
    return out


def _array_lines(text: str, items: list[Any]) -> list[tuple[int, Any]]:
    """Best-effort line numbers for the items of a JSON array (the line each top-level object starts on)."""
    starts, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            if depth == 1:
                starts.append(line)
        elif ch in "[{":
            if depth == 1:
                starts.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif depth == 1 and ch not in " \t\r\n,":
            if not starts or starts[-1] != line:
                starts.append(line)
    if len(starts) != len(items):
        starts = [0] * len(items)
    return list(zip(starts, items, strict=True))


def check_images(samples: Iterable[Sample], images: Path | None, data: Path) -> None:
    """Fail once, naming how many images are missing and the first few, before any model work."""
    missing = [str(s.image) for s in samples if isinstance(s.image, (str, Path)) and not Path(s.image).is_file()]
    if missing:
        unique = list(dict.fromkeys(missing))
        where = f" under {images}" if images else ""
        raise BenchmarkError(
            f"{len(unique)} image(s) referenced by {data} are missing{where}, e.g. {', '.join(unique[:3])}; "
            "pass --images DIR with the benchmark's image folder"
        )


def is_table(data: Path) -> bool:
    """Whether ``data`` is a parquet/arrow export (a file, or a folder of them) rather than the JSON layout."""
    if data.is_file():
        return data.suffix in (".parquet", ".arrow")
    return data.is_dir() and any(p.suffix in (".parquet", ".arrow") for p in data.rglob("*"))


def looks_like_hub_id(data: str) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face dataset id."""
    parts = data.split("/")
    return len(parts) == 2 and all(parts) and not Path(data).exists() and not data.startswith((".", "~"))


def read_table(data: str | Path, *, split: str = "test") -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset layout: a local parquet/arrow export, or a hub id through ``datasets``.

    Image columns come back as encoded bytes (``{"bytes": ..., "path": ...}`` structs are unwrapped).
    """
    src = str(data)
    if looks_like_hub_id(src):
        return _read_hub(src, split)
    path = Path(src)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
    if not files:
        raise BenchmarkError(f"{path}: no .parquet or .arrow files found (expected a local dataset export)")
    splits = [f for f in files if split in f.name]
    files = splits or files
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            if f.suffix == ".parquet":
                table = pq.read_table(f)
            else:
                with pa.memory_map(str(f)) as src_map:
                    try:
                        table = pa.ipc.open_stream(src_map).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(src_map).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise BenchmarkError(f"{f}: not a readable {f.suffix[1:]} file ({err})") from err
        rows.extend(table.to_pylist())
    if not rows:
        raise BenchmarkError(f"{path}: the dataset export has no rows")
    return [{k: _unwrap_image(v) for k, v in row.items()} for row in rows]


def _unwrap_image(value: Any) -> Any:
    if isinstance(value, dict) and "bytes" in value and ("path" in value or len(value) == 1):
        return value["bytes"]
    return value


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise BenchmarkError(
            f"{name!r} is not a local path and the hub is disabled (HF_HUB_OFFLINE=1); download the dataset "
            "(e.g. `huggingface-cli download --repo-type dataset " + name + "`) and pass its local folder"
        )
    try:
        import datasets
    except ImportError:
        raise BenchmarkError(
            f"{name!r} looks like a hub dataset id; reading it needs `pip install datasets` "
            "(or pass a local parquet export)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - network, auth and missing-split errors all end here
        raise BenchmarkError(
            f"cannot load hub dataset {name!r} (split {split!r}): {str(err).splitlines()[0]}; "
            "check the network, or download it and pass the local folder"
        ) from err
    ds = ds.cast_column("image", datasets.Image(decode=False)) if "image" in ds.column_names else ds
    return [{k: _unwrap_image(v) for k, v in row.items()} for row in ds]
