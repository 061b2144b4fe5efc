"""Where a command may write: never onto a file it reads, never onto a result it did not write.

Every command that writes files checks its outputs here before it loads a model or reads its data:

- an output file is none of the command's inputs (the same file through any path, link or hard link) and no
  file inside an input folder (a model folder);
- an output never lands on a file of a run folder (``run.json`` beside it) or of another command's results
  folder: only ``causalmm eval`` writes into a run folder, under its own rules (:mod:`.benchmarks.run_folder`);
- a results folder (``score``'s, ``compare``'s, ``demo``'s, ``toyworld splits``') is new, empty, or holds what
  the same command wrote for the same inputs before, which a rerun replaces; anything else is kept and the
  command refused, naming the file and what to do.

Each results folder's main file carries a ``format`` (``causalmm-score/1``, ...) saying which command wrote it,
and what it was made from, so the check can tell a rerun from someone else's result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .inputs import InputError

__all__ = ["OutputError", "check_output_file", "check_results_folder", "written_by"]

#: the file that makes a folder a ``causalmm eval`` run folder
RUN_FILE = "run.json"
#: a results folder's main file -> the format prefixes its writers stamp into it
RESULT_FILES = {
    "metrics.json": ("causalmm-score/", "causalmm-toyworld-demo/"),
    "compare.json": ("causalmm-compare/",),
    "splits.json": ("causalmm-toyworld-splits/",),
    "training.json": ("causalmm-toyworld-training/",),
}
#: the command that stamps each format
WRITERS = {
    "causalmm-score/": "causalmm score",
    "causalmm-compare/": "causalmm compare",
    "causalmm-toyworld-demo/": "causalmm demo",
    "causalmm-toyworld-splits/": "causalmm toyworld splits",
    "causalmm-toyworld-training/": "causalmm toyworld train",
}


class OutputError(InputError):
    """An output path that would overwrite an input or a result the command did not write."""


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _inputs(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, Path]]:
    """The inputs that are paths on this machine (hub ids and unset options are skipped)."""
    return [(flag, Path(p)) for flag, p in inputs if p is not None and Path(p).exists()]


def _record(path: Path) -> dict[str, Any] | None:
    """A results file's JSON object, ``None`` where it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def written_by(path: Path) -> str | None:
    """The ``format`` stamped into a results file (``causalmm-score/1``...), ``None`` where it has none."""
    fmt = (_record(path) or {}).get("format")
    return fmt if isinstance(fmt, str) else None


def _owner(folder: Path) -> str | None:
    """What kind of folder ``folder`` is, if causalmm made it: ``a causalmm eval run folder``, or the results
    folder of the command that stamped its main file."""
    if (folder / RUN_FILE).is_file():
        return "the run folder of a causalmm eval"
    for name, formats in RESULT_FILES.items():
        fmt = written_by(folder / name) if (folder / name).is_file() else None
        if fmt is not None and fmt.startswith(formats):
            return f"a results folder of {WRITERS[fmt.split('/')[0] + '/']}"
    return None


def check_output_file(
    path: str | os.PathLike, flag: str, inputs: Iterable[tuple[str, str | os.PathLike | None]]
) -> Path:
    """Refuse an output file that is one of ``inputs`` (``(flag, path)`` pairs), lies in an input folder, or
    would replace a file of a run or results folder; the path otherwise. Call it before any model loads."""
    out = Path(path)
    for what, given in _inputs(inputs):
        if given.is_dir():
            if _exists(out) and given.resolve() in out.resolve().parents:
                raise OutputError(
                    f"{flag} {out} is a file of the input folder {what} {given}: writing it would replace it; "
                    "pick a path outside that folder"
                )
        elif _exists(out) and _same_file(out, given):
            raise OutputError(
                f"{flag} {out} is the input {what} {given}: writing it would replace it; pick another path for {flag}"
            )
    if _exists(out):
        owner = _owner(out.resolve().parent)
        if owner is not None:
            raise OutputError(
                f"{flag} {out} would replace a file of {owner} ({out.parent}): a command never overwrites a "
                f"result it did not write; pick another path for {flag}"
            )
    return out


def check_results_folder(
    out: str | os.PathLike,
    flag: str,
    *,
    main: str,
    fmt: str,
    writes: Sequence[str],
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    same: Callable[[dict[str, Any]], bool] | None = None,
    what: str = "",
) -> Path:
    """Refuse a results folder ``out`` that is (or lies in) an input folder, whose files would replace an input
    file, that is a run folder, or that holds one of the files the command ``writes`` that it did not write
    (``main`` stamped with a format starting with ``fmt``, and, if given, ``same(main's JSON)`` true: the same
    inputs as now).

    ``what`` names what the earlier result was made from, for the message (e.g. ``"other predictions"``).
    """
    out = Path(out)
    if _exists(out) and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file; give a folder (it gets {', '.join(writes)})")
    target = out.resolve()
    for name, given in _inputs(inputs):
        path = given.resolve()
        if path.is_dir() and (path == target or path in target.parents):
            raise OutputError(
                f"{flag} {out} is or lies inside the input folder {name} {given}: the command would write into "
                f"it; pick a folder outside it for {flag}"
            )
        clash = [f for f in writes if _exists(out / f) and _same_file(out / f, given)]
        if clash:
            raise OutputError(
                f"{flag} {out}: its {clash[0]} would replace the input {name} {given}; pick "
                f"another folder for {flag}"
            )
    if not out.is_dir():
        return out
    if (out / RUN_FILE).is_file():
        raise OutputError(
            f"{flag} {out} is the run folder of a causalmm eval: its {main} and report are that run's; pick "
            f"another folder for {flag}"
        )
    present = [name for name in writes if _exists(out / name)]
    if not present:
        return out
    earlier = _record(out / main) or {}
    stamp = earlier.get("format")
    if not isinstance(stamp, str) or not stamp.startswith(fmt):
        raise OutputError(
            f"{flag} {out} holds {present[0]}, which {WRITERS[fmt]} did not write: a command never overwrites a "
            f"result it did not write; move it away or pick another folder for {flag}"
        )
    if same is not None:
        if not same(earlier):
            raise OutputError(
                f"{flag} {out} holds the result of an earlier run on {what or 'other inputs'}; a command replaces "
                f"only its own result for the same inputs: pick another folder for {flag} (or move that one away)"
            )
    return out
