"""``causalmm tune BENCH``: each method's settings chosen on a seeded dev split of the benchmark's images."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from .bench import BENCH_HELP, MAX_BATCH, _bench_options, _parse_seeds, _relaunch_with_accelerate
from .common import (
    AttentionOpt,
    DeviceOpt,
    DoSampleOpt,
    DtypeOpt,
    ModelOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    console,
    fail,
    hf_kwargs,
    sampling,
    user_errors,
    within,
)


def tune(
    benchmark: Annotated[str, typer.Argument(help=BENCH_HELP)],
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Question file/folder, a parquet export, or a hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Tune folder (split, one run folder per setting, tuning.json); resumes.")],
    images: Annotated[Path | None, typer.Option(help="Image folder of the benchmark.")] = None,
    methods: Annotated[str, typer.Option(help="Methods to tune (e.g. vcd,causalmm/language), or all.")] = "all",
    dev_images: Annotated[int, typer.Option(help="Images drawn for the dev split; the rest is test.")] = 100,
    split_seed: Annotated[int, typer.Option(help="Seed of the dev/test split.")] = 0,
    budget: Annotated[int, typer.Option(help="Settings per method, the official one always among them; 0: all.")] = 12,
    grid_seed: Annotated[int, typer.Option(help="Seed of the settings drawn when a grid exceeds the budget.")] = 0,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="ROW.PARAM=V1,V2 replaces a parameter's values (repeatable), e.g. vti.vectors=vti.safetensors"
        ),
    ] = None,
    metric: Annotated[str | None, typer.Option(help="POPE: accuracy | f1; CHAIR: CHAIR_i | CHAIR_s; ...")] = None,
    floor: Annotated[
        float | None, typer.Option(help="CHAIR: how many points of recall below regular's a choice may lose (2).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed of every dev run.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Several run seeds, e.g. 1,2,3.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples of the data (before the split).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batched generate call; 1..1024.")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the benchmark's own.")] = None,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    suffix: Annotated[str | None, typer.Option(help="POPE/MME/AMBER: text appended to each question.")] = None,
    prompt: Annotated[str | None, typer.Option(help="CHAIR: the captioning prompt.")] = None,
    parse: Annotated[str | None, typer.Option(help="POPE/AMBER answer parsing: official | substring.")] = None,
    category: Annotated[str | None, typer.Option(help="POPE (HF layout): keep one category.")] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="CHAIR: the COCO annotation folder; AMBER: its file.")
    ] = None,
    dimension: Annotated[str | None, typer.Option(help="AMBER: the dimension (default: discriminative).")] = None,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar per run.")] = False,
    num_processes: Annotated[
        int, typer.Option(help="Spread each run's samples over N processes with `accelerate launch`.")
    ] = 1,
) -> None:
    """Tune every method on a dev split of the benchmark's images, the same way for each: its grid from the
    registry (the official setting always in it), the same budget, one rule (see docs/comparing.md).

    Writes --out/tuning.json: the split, the rule, every setting's dev metrics and the choice per method. Run the
    choice on the test images with `causalmm eval ... --tuned OUT/tuning.json --method NAME`.
    """
    from ..benchmarks import BenchmarkError
    from ..tuning import parse_overrides, parse_rows, rule_for
    from ..tuning.tune import tune as run_tune

    within("--batch-size", batch_size, 1, MAX_BATCH)
    within("--dev-images", dev_images, 1)
    within("--budget", budget, 0)
    if limit is not None:
        within("--limit", limit, 1)
    run_seeds = _parse_seeds(seed, seeds)
    if num_processes != 1:
        within("--num-processes", num_processes, 1, max(1, _most_processes()))
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise typer.Exit(code=_relaunch_with_accelerate(num_processes))
    try:
        rows = parse_rows(methods)
        overrides = parse_overrides(grid or [], rows)
        rule = rule_for(benchmark, metric, floor)
        generation = sampling(do_sample, temperature, top_p, top_k)
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        options = _bench_options(
            suffix=suffix, prompt=prompt, parse=parse, category=category, annotations=annotations, dimension=dimension
        )
        result = run_tune(
            benchmark, model, data, out=out, rows=rows, rule=rule, images=images, overrides=overrides,
            budget=budget or None, grid_seed=grid_seed, dev_images=dev_images, split_seed=split_seed,
            generation=generation, seeds=run_seeds, options=options, limit=limit, batch_size=batch_size,
            base=attention, hf_kwargs=hf_kwargs(device, dtype), progress=progress,
            command=shlex.join(["causalmm", *sys.argv[1:]]), log=_log,
        )  # fmt: skip
    except (*user_errors(), BenchmarkError) as err:
        fail(str(err))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for name, choice in result["chosen"].items():
        flag = "" if choice["admissible"] else "  (below the floor: the least damaging setting)"
        typer.echo(f"{name:24s} {rule.label} {choice['score']:.2f}  {json.dumps(choice['settings'])}{flag}")
    typer.echo(f"wrote {out / 'tuning.json'}")


def _most_processes() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def _log(line: str) -> None:
    """Each dev run's score as it finishes (on stderr, beside the progress bars; the choices go to stdout)."""
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def suite(
    name: Annotated[
        str | None, typer.Argument(help="A shipped suite (causalmm-paper), or none with --suite-file.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="A hub id or local model directory.")] = None,
    out: Annotated[Path | None, typer.Option(help="Suite folder: one run folder per run, tables.md; resumes.")] = None,
    suite_file: Annotated[Path | None, typer.Option(help="A suite TOML file of your own.")] = None,
    root: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DIR: where the suite's data or images are (repeatable), e.g. coco=DIR"),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="List every run it would make, and stop.")] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples of each benchmark.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batched generate call; 1..1024.")] = 1,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar per run.")] = False,
    num_processes: Annotated[
        int, typer.Option(help="Spread each run's samples over N processes with `accelerate launch`.")
    ] = 1,
) -> None:
    """Run a paper's evaluation protocol (benchmarks, methods, settings, seeds) and write its tables.

    One run folder per (benchmark, method, seed) under --out/runs, each resumable as `causalmm eval`'s; the
    tables go to --out/tables.md and tables.json. `causalmm suite causalmm-paper --dry-run` lists the runs.
    """
    from ..benchmarks import BenchmarkError
    from ..suites import load_suite, plan, run_suite

    if (name is None) == (suite_file is None):
        fail("give a suite name (e.g. causalmm-paper) or --suite-file FILE, not both")
    roots = {}
    for item in root or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            fail(f"--root {item!r}: write NAME=DIR, e.g. coco=/data/coco/val2014")
        roots[key.strip()] = value.strip()
    try:
        chosen = load_suite(name, suite_file)
        unknown = sorted(set(roots) - set(chosen.roots))
        if unknown:
            fail(f"--root {unknown[0]}: suite {chosen.name} has no such root; it takes {', '.join(chosen.roots)}")
        if dry_run:
            for r in plan(chosen, roots, dry_run=True):
                typer.echo(f"{r.folder}  {r.benchmark['benchmark']} {r.data}  {json.dumps(dict(r.method['config']))}")
            return
        if model is None or out is None:
            fail("give --model and --out (or --dry-run to list the runs)")
        within("--batch-size", batch_size, 1, MAX_BATCH)
        if limit is not None:
            within("--limit", limit, 1)
        if num_processes != 1:
            within("--num-processes", num_processes, 1, max(1, _most_processes()))
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                raise typer.Exit(code=_relaunch_with_accelerate(num_processes))
        result = run_suite(
            chosen, model, out, roots, limit=limit, batch_size=batch_size, base=attention,
            hf_kwargs=hf_kwargs(device, dtype), progress=progress, command=shlex.join(["causalmm", *sys.argv[1:]]),
            log=_log,
        )  # fmt: skip
    except (*user_errors(), BenchmarkError) as err:
        fail(str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(result["markdown"])
        typer.echo(f"wrote {out / 'tables.md'}")
