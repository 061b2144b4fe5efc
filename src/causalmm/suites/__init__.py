"""Suites: a paper's evaluation protocol as data, run in one command (``causalmm suite NAME``).

A suite is a small TOML file: the image and data *roots* the user points at, the *benchmarks* (each a data file
and its options; files shipped with the package, such as POPE's nine official question files, are named
relative to the suite), the *methods* (each a config and its generation options), the *seeds*, and the *tables*
in the paper's layout. Every (benchmark, method, seed) is a run folder of its own under ``OUT/runs/``, run by
:func:`causalmm.benchmarks.evaluate.evaluate`, so a killed suite resumes where it stopped; the tables are
written from the finished runs' metrics (``OUT/tables.md``, ``OUT/tables.json``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..benchmarks.base import BenchmarkError

__all__ = ["SUITES", "Run", "Suite", "load_suite", "plan", "run_suite", "tables"]

_HERE = Path(str(resources.files(__name__)))
#: the suites shipped with the package, by name
SUITES: dict[str, Path] = {p.stem: p for p in sorted(_HERE.glob("*.toml"))}
_ROOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    name: str
    title: str
    path: Path
    roots: Mapping[str, str]
    seeds: tuple[int, ...]
    benchmarks: tuple[Mapping[str, Any], ...]
    methods: tuple[Mapping[str, Any], ...]
    tables: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Run:
    """One run of a suite: a benchmark, a method and a seed, and its run folder (relative to the suite's out)."""

    benchmark: Mapping[str, Any]
    method: Mapping[str, Any]
    seed: int
    folder: str
    data: str
    images: str | None
    generation: Mapping[str, Any] = field(default_factory=dict)


def _need(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise BenchmarkError(f"{where}: missing {key!r}")
    return table[key]


def load_suite(name: str | None = None, path: str | Path | None = None) -> Suite:
    """A shipped suite by ``name``, or the suite file at ``path``; every part checked before anything runs."""
    if path is None:
        if name not in SUITES:
            raise BenchmarkError(f"unknown suite {name!r}; shipped: {', '.join(SUITES)} (or --suite-file FILE)")
        path = SUITES[name]
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkError(f"--suite-file {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise BenchmarkError(f"{path} is not valid TOML ({err})") from None
    where = str(path)
    seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    benchmarks = tuple(raw.get("benchmarks", []))
    methods = tuple(raw.get("methods", []))
    tables = tuple(raw.get("tables", []))
    if not benchmarks or not methods:
        raise BenchmarkError(f"{where}: a suite needs [[benchmarks]] and [[methods]]")
    for kind, items in (("benchmarks", benchmarks), ("methods", methods), ("tables", tables)):
        keys = [_need(item, "key", f"{where}: a [[{kind}]] entry") for item in items]
        if len(set(keys)) != len(keys):
            raise BenchmarkError(f"{where}: [[{kind}]] keys repeat ({', '.join(keys)})")
    known = {b["key"] for b in benchmarks}
    for b in benchmarks:
        _need(b, "benchmark", f"{where}: benchmark {b['key']}")
        _need(b, "data", f"{where}: benchmark {b['key']}")
    for m in methods:
        _need(m, "config", f"{where}: method {m['key']}")
    for t in tables:
        missing = [k for k in _need(t, "benchmarks", f"{where}: table {t['key']}") if k not in known]
        if missing:
            raise BenchmarkError(f"{where}: table {t['key']} names benchmark {missing[0]!r}, which the suite lacks")
    return Suite(
        raw.get("name", path.stem), raw.get("title", path.stem), path, dict(raw.get("roots", {})), seeds,
        benchmarks, methods, tables,
    )  # fmt: skip


def _resolve(text: str, suite: Suite, roots: Mapping[str, str | Path], dry_run: bool) -> str:
    """A path of the suite: ``{root}`` parts replaced by the user's roots; a relative path is the suite's own."""
    missing = [r for r in _ROOT.findall(text) if r not in roots]
    if missing and not dry_run:
        what = suite.roots.get(missing[0], "its folder")
        raise BenchmarkError(f"suite {suite.name} needs --root {missing[0]}=DIR ({what})")
    out = _ROOT.sub(lambda m: str(roots.get(m[1], m[0])), text)
    if not _ROOT.search(text) and not Path(out).is_absolute():
        out = str(suite.path.parent / out)
    return out


def plan(suite: Suite, roots: Mapping[str, str | Path], *, dry_run: bool = False) -> list[Run]:
    """Every run of the suite, benchmark by benchmark, in the order it runs them."""
    runs = []
    for b in suite.benchmarks:
        data = _resolve(b["data"], suite, roots, dry_run)
        images = _resolve(b["images"], suite, roots, dry_run) if b.get("images") else None
        for m in suite.methods:
            for seed in m.get("seeds", suite.seeds):
                folder = f"runs/{b['key']}/{m['key']}/seed-{seed}"
                runs.append(Run(b, m, int(seed), folder, data, images, dict(m.get("generation", {}))))
    return runs


def run_suite(
    suite: Suite,
    model: str,
    out: str | Path,
    roots: Mapping[str, str | Path],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    base: str = "sdpa",
    hf_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    causalmm: Any = None,
) -> dict[str, Any]:
    """Run every run of ``suite`` not finished yet into ``out`` (one model load for all), then write the tables."""
    from ..benchmarks.evaluate import RunSpec, evaluate, load_model, processes
    from ..config import CausalMMConfig

    out = Path(out)
    runs = plan(suite, roots)
    specs = []
    for r in runs:  # every config checked before the first run starts
        try:
            config = CausalMMConfig(**r.method["config"], seed=r.seed)
        except ValueError as err:
            raise BenchmarkError(f"suite {suite.name}, method {r.method['key']}: {err}") from None
        options = dict(r.benchmark.get("options", {}))
        specs.append(RunSpec(r.benchmark["benchmark"], model, r.data, r.images, config, dict(r.generation),
                             (r.seed,), limit, options))  # fmt: skip
    cm = causalmm
    for i, (r, spec) in enumerate(zip(runs, specs, strict=True)):
        if cm is None and not (out / r.folder / "metrics.json").is_file():
            cm = load_model(model, spec.config, base, hf_kwargs)
        log(f"[{i + 1}/{len(runs)}] {r.folder}")
        evaluate(spec, out=out / r.folder, batch_size=batch_size, base=base, hf_kwargs=dict(hf_kwargs or {}),
                 progress=progress, causalmm=cm)  # fmt: skip
    result = tables(suite, out, runs, model=model, command=command)
    rank, _, barrier = processes()
    if rank == 0:
        from ..benchmarks.run_folder import atomic_write

        atomic_write(out / "tables.json", json.dumps(result, indent=1) + "\n")
        atomic_write(out / "tables.md", result["markdown"])
    barrier()
    return result


def _cell(values: Sequence[float]) -> str:
    import statistics

    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def tables(suite: Suite, out: Path, runs: Sequence[Run], *, model: str, command: str) -> dict[str, Any]:
    """The suite's tables from its finished runs: per table, a row per (benchmark, method), a column per metric
    (the mean ± std over the seeds where there are several)."""
    metrics_of: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in runs:
        summary = json.loads((out / r.folder / "metrics.json").read_text(encoding="utf-8"))
        metrics_of.setdefault((r.benchmark["key"], r.method["key"]), []).append(summary["metrics"])
    benches = {b["key"]: b for b in suite.benchmarks}
    layouts = suite.tables or tuple(
        {"key": b["key"], "title": b["key"], "benchmarks": [b["key"]], "metrics": []} for b in suite.benchmarks
    )
    md = [f"# {suite.title}", "", f"Model: `{model}`. Command: `{command}`.", ""]
    out_tables = []
    for t in layouts:
        labels = list(t.get("labels", []))
        first = metrics_of[(t["benchmarks"][0], suite.methods[0]["key"])][0]
        names = list(t.get("metrics") or benches[t["benchmarks"][0]].get("metrics") or list(first))
        header = [*labels, "method", *names]
        rows = []
        for key in t["benchmarks"]:
            for m in suite.methods:
                found = metrics_of[(key, m["key"])]
                # a metric the run lacks (an MME subtask cut by --limit, a mistyped name) shows as "—"
                cells = [_cell([f[n] for f in found]) if n in found[0] else "—" for n in names]
                tags = [str(benches[key].get("labels", {}).get(label, "")) for label in labels]
                rows.append([*tags, m.get("label", m["key"]), *cells])
        out_tables.append({"key": t["key"], "title": t.get("title", t["key"]), "header": header, "rows": rows})
        md += [f"## {t.get('title', t['key'])}", "", "| " + " | ".join(header) + " |",
               "|" + "---|" * len(header)]  # fmt: skip
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return {"suite": suite.name, "model": model, "command": command, "tables": out_tables, "markdown": "\n".join(md)}
