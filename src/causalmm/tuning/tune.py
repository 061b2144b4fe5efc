"""``causalmm tune BENCH``: every method's grid on the dev images, one run folder per setting, one choice per method.

The tune's folder holds ``split.json`` (the seeded split by image, written first so that a resumed tune keeps
it), ``dev/ROW/SETTING/`` (a normal run folder per setting, resumable as ``causalmm eval``'s) and, at the end,
``tuning.json``: the split, the rule, every setting's dev metrics and the choice per method, and the command.
A killed tune rerun with the same command resumes where it stopped and writes the same ``tuning.json``.
``causalmm eval --tuned tuning.json --method ROW`` then runs the choice on the test images only
(:func:`load_tuned`, :func:`test_subset`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..benchmarks.base import BenchmarkError
from ..benchmarks.evaluate import RunSpec, Subset, evaluate, load_model, plan_run, processes
from ..benchmarks.run_folder import atomic_write, canon
from ..config import CausalMMConfig
from .grid import Row, grid, setting_config
from .select import Rule, select
from .split import Split, split_by_image

__all__ = ["FORMAT", "Tuned", "load_split", "load_tuned", "setting_folder", "test_split_subset", "test_subset", "tune"]

#: stamped into tuning.json (the toy world's own tuning files say ``causalmm-toyworld-tuning``)
FORMAT = "causalmm-tuning/1"


def setting_folder(row: str, settings: Mapping[str, Any]) -> str:
    """``dev/ROW/DIGEST``: a setting's run folder inside the tune's, named by what it runs, so a changed grid
    never resumes into another setting's folder."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"dev/{row.replace('/', '-')}/{digest}"


def _split(out: Path, whole: Any, n_dev: int, seed: int) -> Split:
    """The tune's split: drawn and written on the first run, read back (and checked against the data) after."""
    path = out / "split.json"
    data_digest = whole.info["data_digest"]
    if path.is_file():
        saved = Split.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if saved.data_digest != data_digest or saved.seed != seed or len(saved.dev) < min(n_dev, 1):
            raise BenchmarkError(
                f"{out} holds a tune of other data or another split (split.json: seed {saved.seed}, "
                f"{len(saved.dev)} dev images); rerun with the same --data, --dev-images and --split-seed to resume, "
                "or pick another --out"
            )
        fresh = split_by_image(whole.bench, whole.samples, whole.digests, n_dev, seed, data_digest)
        if fresh.dev != saved.dev:
            raise BenchmarkError(
                f"{out}/split.json was drawn with another --dev-images; rerun with the same value, or pick another "
                "--out"
            )
        return saved
    split = split_by_image(whole.bench, whole.samples, whole.digests, n_dev, seed, data_digest)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(split.to_dict(), indent=1) + "\n")
    return split


def tune(
    benchmark: str,
    model: str,
    data: str | Path,
    *,
    out: str | Path,
    rows: Sequence[Row],
    rule: Rule,
    images: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    budget: int | None = 12,
    grid_seed: int = 0,
    dev_images: int = 100,
    split_seed: int = 0,
    generation: Mapping[str, Any] | None = None,
    seeds: Sequence[int] = (0,),
    options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    base: str = "sdpa",
    hf_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    causalmm: Any = None,
) -> dict[str, Any]:
    """Tune ``rows`` on the dev images of ``benchmark`` into ``out``; returns what ``tuning.json`` holds.

    Regular decoding must be the first row: its dev metrics set the rule's floor. ``causalmm``: an already
    loaded :class:`causalmm.CausalMM` to reuse (else the model is loaded once, when a setting has work left).
    """
    if not rows or rows[0].settings.get("method") != "regular":
        raise BenchmarkError("a tune needs regular decoding as its first row: its dev metrics set the floor")
    out, options, overrides = Path(out), dict(options or {}), dict(overrides or {})
    generation = dict(generation or {})
    whole = plan_run(RunSpec(benchmark, model, data, images, CausalMMConfig(method="regular"), generation,
                             seeds, limit, options))  # fmt: skip
    grids = {r.name: grid(r, overrides.get(r.name), budget=budget, seed=grid_seed) for r in rows}
    rank, _, barrier = processes()
    if rank == 0:
        split = _split(out, whole, dev_images, split_seed)
    barrier()
    if rank != 0:
        split = Split.from_dict(json.loads((out / "split.json").read_text(encoding="utf-8")))
    dev = Subset("dev", frozenset(split.dev))
    cm = causalmm
    results: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        results[row.name] = []
        for settings in grids[row.name]:
            config, extra = setting_config(settings, seed=int(seeds[0]))
            spec = RunSpec(benchmark, model, data, images, config, {**generation, **extra}, seeds, limit, options, dev)
            folder = setting_folder(row.name, settings)
            if cm is None and not (out / folder / "metrics.json").is_file():
                cm = load_model(model, config, base, hf_kwargs)
            summary = evaluate(
                spec, out=out / folder, batch_size=batch_size, base=base, hf_kwargs=dict(hf_kwargs or {}),
                progress=progress, n_boot=0, causalmm=cm,
            )  # fmt: skip
            metrics = {k: float(v) for k, v in summary["metrics"].items()}
            results[row.name].append(
                {"settings": settings, "metrics": metrics, "generation": summary["generation"], "run": folder}
            )
            log(f"{row.name:22s} {json.dumps(settings):90s} {rule.label} {rule.value(metrics):.2f}")
    reference = results[rows[0].name][0]["metrics"]
    chosen = {name: select(entries, rule, reference) for name, entries in results.items()}
    summary = {
        "format": FORMAT,
        "benchmark": whole.bench.name,
        "options": whole.bench.describe(),
        "model": str(model),
        "data": str(data),
        "images": str(images) if images else None,
        "seeds": [int(s) for s in seeds],
        "generation": whole.info["generation"],
        "split": split.to_dict(),
        "rule": rule.to_dict(),
        "budget": budget,
        "grid_seed": grid_seed,
        "overrides": {k: {p: list(v) for p, v in o.items()} for k, o in overrides.items()},
        "command": command,
        "chosen": chosen,
        "grid": results,
    }
    if rank == 0:
        atomic_write(out / "tuning.json", json.dumps(summary, indent=1) + "\n")
    barrier()
    return summary


@dataclass(frozen=True)
class Tuned:
    """One method's choice in a ``tuning.json``: its settings, the run options they were chosen under, the split."""

    path: Path
    row: str
    settings: Mapping[str, Any]
    generation: Mapping[str, Any]
    benchmark: str
    model: str
    split: Split

    def config(self, seed: int = 0) -> tuple[CausalMMConfig, dict[str, Any]]:
        """The chosen :class:`CausalMMConfig` (with ``seed``) and its generation options (``num_beams``)."""
        return setting_config(self.settings, seed=seed)


def _read_tuning(path: str | Path, flag: str) -> tuple[Path, dict[str, Any]]:
    """The ``tuning.json`` at ``path`` (or in the tune folder ``path``), checked as ``causalmm tune``'s; ``flag``
    names the option it was given with, in errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "tuning.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkError(f"{flag} {path}: no such file; pass the tuning.json `causalmm tune` wrote") from None
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{flag} {path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchmarkError(
            f"{flag} {path} is not a tuning.json of `causalmm tune` (format {FORMAT}); the toy world's tuning files "
            "are read by `causalmm demo`"
        )
    return path, data


def load_tuned(path: str | Path, row: str) -> Tuned:
    """The choice for ``row`` in the ``tuning.json`` at ``path`` (or in the tune folder ``path``)."""
    path, data = _read_tuning(path, "--tuned")
    chosen = data["chosen"]
    if row not in chosen:
        raise BenchmarkError(f"--tuned {path} has no choice for --method {row!r}; it has {', '.join(chosen)}")
    entry = chosen[row]
    return Tuned(
        path, row, entry["settings"], entry["generation"], data["benchmark"], data["model"],
        Split.from_dict(data["split"]),
    )  # fmt: skip


def test_subset(spec: RunSpec, tuned: Tuned) -> Subset | None:
    """The part of ``spec``'s data a test of ``tuned`` may run: the test images when the data is the one the tune
    split, all of it when it shares no image with the dev split; refused when another file holds dev images."""
    if spec.benchmark != tuned.benchmark:
        raise BenchmarkError(f"--tuned {tuned.path} was tuned on {tuned.benchmark}, not {spec.benchmark}")
    if str(spec.model) != tuned.model:
        raise BenchmarkError(
            f"--tuned {tuned.path} was tuned with model {tuned.model}, not {spec.model}: settings chosen for one model "
            "say nothing about another; tune this model (`causalmm tune`)"
        )
    whole = plan_run(spec)
    if canon(whole.info["generation"]) != canon(tuned.generation):
        theirs, mine = dict(tuned.generation), whole.info["generation"]
        keys = sorted(k for k in {*theirs, *mine} if theirs.get(k) != mine.get(k))
        detail = ", ".join(f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in keys)
        raise BenchmarkError(
            f"--tuned {tuned.path} chose its settings under other generation options ({detail}); give the tune's "
            "options (a setting chosen for 16 greedy tokens says little about 64 sampled ones)"
        )
    return _test_part(whole, tuned.split, "--tuned")


def load_split(path: str | Path) -> Split:
    """The dev/test split of the ``tuning.json`` at ``path`` (or in the tune folder ``path``)."""
    return Split.from_dict(_read_tuning(path, "--test-split")[1]["split"])


def test_split_subset(spec: RunSpec, split: Split) -> Subset | None:
    """``eval --test-split``: any decoding (a baseline: regular sampled, a setting of one's own) on the test images
    of a tune's split, refused on another file that holds dev images, as ``--tuned`` is."""
    return _test_part(plan_run(spec), split, "--test-split")


def _test_part(whole: Any, split: Split, flag: str) -> Subset | None:
    overlap = set(whole.digests.values()) & set(split.dev)
    if not overlap:
        return None
    if whole.info["data_digest"] == split.data_digest:
        return Subset("test", frozenset(split.test))
    example = split.names.get(sorted(overlap)[0], sorted(overlap)[0])
    raise BenchmarkError(
        f"--data holds {len(overlap)} image(s) of the dev split of {flag} (e.g. {example}): testing on images the "
        "settings were chosen on inflates the result; pass the data file the tune split (its test images are "
        "run), or one without the dev images"
    )
