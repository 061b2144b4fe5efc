"""A run folder's own files and rules: ``run.json`` (what the run is), the writer's lock, and where ``--out`` may
be.

**One writer per run folder.** :func:`lock_run_folder` takes an OS lock (``fcntl.flock``) on
``.causalmm.lock`` and writes the holder's pid and host into it; a second writer is refused with that pid.
The kernel drops the lock when the holder's process dies, ``kill -9`` included, so a lock never goes stale.
Under several processes the lock is held once for all of them: ``causalmm eval --num-processes N`` holds it
in the launcher, which names it in ``CAUSALMM_RUN_LOCK`` for its workers (and passes its descriptor on to
accelerate's launcher, so the lock lives as long as the run); under a user's ``accelerate launch`` the main
process takes it and the others wait for it at a barrier before reading or writing anything.

**A run never overwrites what it did not write.** ``--out`` may not contain, equal or lie inside the data,
image or annotation paths (:func:`check_out_folder`); a new run needs a new or empty folder; and native files
are written beside the run's own only where the run wrote them before (``native_files`` in ``run.json``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import BenchmarkError

__all__ = [
    "IDENTITY",
    "LOCK_ENV",
    "LOCK_NAME",
    "RunLockedError",
    "RunMismatchError",
    "atomic_write",
    "canon",
    "check_out_folder",
    "check_run_info",
    "lock_run_folder",
    "read_run_info",
    "unwritable",
    "write_run_info",
]

#: run.json fields that must agree between a run and its resumption
IDENTITY = ("benchmark", "options", "model", "config", "generation", "image_seeds", "subset")


#: the writer's lock file inside a run folder (holds "pid host" of the holder)
LOCK_NAME = ".causalmm.lock"


#: set by ``causalmm eval --num-processes`` for its workers: the lock file their launcher holds for them
LOCK_ENV = "CAUSALMM_RUN_LOCK"


class RunMismatchError(BenchmarkError):
    """A rerun into an existing run folder describes a different run."""


class RunLockedError(BenchmarkError):
    """Another process is writing into the run folder."""


def read_run_info(out: Path) -> dict[str, Any] | None:
    """``out/run.json`` as a dict, ``None`` where there is none; one line for an unreadable or corrupt file."""
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} at line {err.lineno}"
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except OSError as err:
        raise BenchmarkError(f"cannot read {path} ({err.strerror or err}); check its permissions") from None
    else:
        if isinstance(info, dict) and isinstance(info.get("benchmark"), str):
            return info
        reason = "not a run description (no benchmark field)"
    raise BenchmarkError(
        f"{path} is corrupt ({reason}); causalmm cannot tell what run this folder holds: "
        "pick another --out (or move this folder away)"
    )


def check_run_info(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The run.json to write: ``info``, merged with an existing run.json that must describe the same run."""
    old = read_run_info(out)
    if old is None:
        return info
    diff = [k for k in IDENTITY if canon(old.get(k)) != canon(info.get(k))]
    if "image_seeds" in diff and not str(old.get("image_seeds", "")).startswith("seeds/2"):
        raise RunMismatchError(
            f"{out} was made by an earlier causalmm whose seeds collided (ids sharing their first 4 bytes, e.g. an "
            "MME subtask's, got one seed); its samples cannot be resumed with the same draws: pick another --out "
            "to rerun them"
        )
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {info.get(k)!r}" for k in diff[:2])
        raise RunMismatchError(
            f"{out} holds a different run ({', '.join(diff)} differ: {detail}); "
            "rerun with the same settings to resume, or pick another --out"
        )
    seeds = list(dict.fromkeys([*old.get("seeds", []), *info.get("seeds", [])]))
    natives = list(dict.fromkeys([*old.get("native_files", []), *info.get("native_files", [])]))
    return {**old, **info, "seeds": seeds, "native_files": natives}


def write_run_info(out: Path, info: dict[str, Any]) -> None:
    """Write ``out/run.json`` (``info`` as returned by :func:`check_run_info`)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def check_out_folder(out: Path, inputs: Sequence[str | Path | None], images: Sequence[str | Path] = ()) -> None:
    """Refuse an ``--out`` where the run's files could land on its inputs, before anything is written.

    ``inputs`` are the data, image and annotation paths as given (missing ones and hub ids are skipped);
    ``images`` the samples' image files, which catch image folders a loader finds on its own (VLind's
    ``images/`` beside ``data.json``). An input inside ``--out`` (or equal to it) could be overwritten by the
    run's files (VLind's ``data.json``, MME's ``Your_Results``); ``--out`` inside an input folder would mix
    run files into the data. An existing ``--out`` must be a folder, and a run folder (with ``run.json``) or
    empty: a run only ever replaces files it wrote.
    """
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"--out {out} is a file; give a folder (the run writes run.json, predictions, metrics)")
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        path = Path(given).resolve()
        if path == target or target in path.parents:
            raise BenchmarkError(
                f"--out {out} holds the input {given}: the run's files could overwrite it; pick a separate folder "
                "for --out"
            )
        if path.is_dir() and path in target.parents:
            raise BenchmarkError(
                f"--out {out} lies inside the input folder {given}: the run would write into its data; pick a "
                "folder outside it for --out"
            )
    for parent in dict.fromkeys(Path(p).parent for p in images):
        where = parent.resolve()
        if where == target or target in where.parents:
            raise BenchmarkError(
                f"--out {out} holds the benchmark's images ({parent}): the run's files could overwrite them; pick "
                "a separate folder for --out"
            )
    if out.is_dir() and not (out / "run.json").exists():
        foreign = sorted(
            p.name for p in out.iterdir() if not p.name.startswith(".causalmm") and p.name != "run.json.tmp"
        )
        if foreign:
            raise BenchmarkError(
                f"--out {out} is not empty and is not a run folder (no run.json; it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): a run never overwrites files it did not write; "
                "pick a new or empty folder"
            )


@contextmanager
def lock_run_folder(out: Path) -> Iterator[int | None]:
    """Hold the run folder's writer lock; yields its file descriptor (``None`` when a launcher holds it for us).

    ``fcntl.flock`` on ``out/.causalmm.lock``, non-blocking: a second writer gets :class:`RunLockedError`
    naming the holder's pid (written into the file). The kernel releases the lock when the holder dies, so a
    killed run leaves nothing stale. ``CAUSALMM_RUN_LOCK`` naming this lock means the launcher of this
    process holds it (``causalmm eval --num-processes``). Creating the lock file and a probe file also checks
    that ``out`` is writable, so a read-only folder fails here with one line rather than at the first write.
    Where ``fcntl`` does not exist (Windows) the folder is not locked.
    """
    lock = out / LOCK_NAME
    if os.environ.get(LOCK_ENV) and os.path.realpath(os.environ[LOCK_ENV]) == os.path.realpath(lock):
        yield None
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield None
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(out, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise RunLockedError(
                f"{out} is in use by another causalmm eval ({who}); one run writes into a folder at a time: wait "
                "for it to finish (or stop it), or pick another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            probe = out / f"{LOCK_NAME}.probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise unwritable(out, err) from None
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def unwritable(out: Path, err: OSError) -> BenchmarkError:
    return BenchmarkError(
        f"cannot write to --out {out} ({err.strerror or err}); a run folder must be writable (the run locks it "
        "and writes predictions and metrics there): make it writable, or copy it and pass the copy"
    )


def canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise unwritable(path.parent, err) from None
