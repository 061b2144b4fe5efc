"""The evaluation commands: ``eval`` (a resumable run folder, over several processes too), ``score``,
``compare``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import (
    AttentionOpt,
    DeviceOpt,
    DoSampleOpt,
    DtypeOpt,
    EarlyStoppingOpt,
    LengthPenaltyOpt,
    ModelOpt,
    NoRepeatOpt,
    NumBeamsOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    console,
    decoding_options,
    fail,
    hf_kwargs,
    sampling,
    search,
    user_errors,
    within,
)

if TYPE_CHECKING:
    from ..config import CausalMMConfig


BENCH_HELP = "pope | mme | chair | vlind | amber"
#: the most samples per batched generate call: each adds its rows (times the method's branches) to every forward
MAX_BATCH = 1024


def _bench_options(**given) -> dict:
    """Benchmark options the user set (unset ones keep each benchmark's own default)."""
    return {k: v for k, v in given.items() if v is not None}


def _parse_seeds(seed: int, seeds: str | None) -> list[int]:
    """The run seeds: ``--seeds`` (distinct integers) or ``--seed``, each a 64-bit signed integer."""
    from ..config import SEED_RANGE, shown

    if not seeds:
        out = [seed]
    else:
        try:
            out = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            fail(f"--seeds {shown(seeds)} is not a comma-separated list of integers (e.g. 1,2,3)")
        if not out or len(set(out)) != len(out):
            fail(f"--seeds {shown(seeds)} must list distinct integers")
    for value in out:
        if SEED_RANGE(value):
            fail(f"{'--seeds' if seeds else '--seed'}: {shown(value)} {SEED_RANGE(value)}")
    return out


@decoding_options
def eval_(
    benchmark: Annotated[str, typer.Argument(help=BENCH_HELP)],
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Question file/folder, a parquet export, or a hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Run folder; rerunning into it resumes.")],
    images: Annotated[Path | None, typer.Option(help="Image folder of the benchmark.")] = None,
    config: CausalMMConfig = None,  # the decoding flags, added by @decoding_options
    seed: Annotated[int, typer.Option(help="Run seed; each sample's seed derives from it and its id.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Several run seeds, e.g. 1,2,3: mean ± std.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (whole MME image pairs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batched generate call; 1..1024.")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the benchmark's own.")] = None,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    num_beams: NumBeamsOpt = 1,
    length_penalty: LengthPenaltyOpt = 1.0,
    early_stopping: EarlyStoppingOpt = "false",
    no_repeat_ngram_size: NoRepeatOpt = 0,
    suffix: Annotated[str | None, typer.Option(help="POPE/MME: text appended to each question.")] = None,
    prompt: Annotated[str | None, typer.Option(help="CHAIR: the captioning prompt.")] = None,
    parse: Annotated[str | None, typer.Option(help="POPE/AMBER answer parsing: official | substring.")] = None,
    category: Annotated[str | None, typer.Option(help="POPE (HF layout): keep one category.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="CHAIR: COCO annotations; AMBER: its file.")] = None,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    num_processes: Annotated[
        int, typer.Option(help="Split the run over N processes with `accelerate launch`: 1 to the GPUs (one each).")
    ] = 1,
    dimension: Annotated[str | None, typer.Option(help="AMBER: the dimension (default: discriminative).")] = None,
    tuned: Annotated[
        Path | None,
        typer.Option(help="A tuning.json of `causalmm tune`: run --method NAME's choice on the test images only."),
    ] = None,
    test_split: Annotated[
        Path | None,
        typer.Option(help="A tuning.json of `causalmm tune`: run these decoding flags on its test images only."),
    ] = None,
) -> None:
    """Run a benchmark into a run folder (resumable), score it, write metrics.json and report.md.

    With --tuned tuning.json --method NAME, the settings the tune chose for NAME run on the images it kept for
    test (the data it split), or on another file that shares no image with its dev split; --test-split
    tuning.json runs the decoding flags given (a baseline such as regular sampled decoding) on those images.

    Under `accelerate launch -m causalmm eval ...` (or with --num-processes N) the samples are dealt across
    the processes, each appending to its own shard; the main process merges them into the same files a
    single process writes.
    """
    from ..benchmarks import BenchmarkError
    from ..benchmarks.evaluate import RunSpec, evaluate

    within("--batch-size", batch_size, 1, MAX_BATCH)
    if limit is not None:
        within("--limit", limit, 1)
    if num_processes != 1:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        most, what = (gpus, "one per GPU here") if gpus else (os.cpu_count() or 1, "no GPU: one per CPU core here")
        within("--num-processes", num_processes, 1, most, what)
    relaunch = num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1

    run_seeds = _parse_seeds(seed, seeds)
    if tuned is not None and test_split is not None:
        fail("--tuned already runs on the tune's test images; drop --test-split")
    try:
        generation = sampling(do_sample, temperature, top_p, top_k)
        generation.update(search(num_beams, length_penalty, early_stopping, no_repeat_ngram_size))
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        options = _bench_options(
            suffix=suffix, prompt=prompt, parse=parse, category=category, annotations=annotations, dimension=dimension
        )
        spec = RunSpec(benchmark, model, data, images, config, generation, run_seeds, limit, options)
        if tuned is not None:  # config is the tune's choice (causalmm.tuning.tune.Tuned)
            from ..tuning.tune import test_subset

            choice, extra = config.config(seed=run_seeds[0])
            spec = RunSpec(benchmark, model, data, images, choice, {**generation, **extra}, run_seeds, limit, options)
            spec.subset = test_subset(spec, config)
        elif test_split is not None:  # a baseline (regular sampled) or any setting on a tune's test images
            from ..tuning.tune import load_split, test_split_subset

            spec.subset = test_split_subset(spec, load_split(test_split))
    except (*user_errors(), BenchmarkError) as err:
        fail(str(err))
    if relaunch:  # the launcher holds the folder's lock for its workers and checks everything first, so bad
        # input fails with one line, not once per process
        from ..benchmarks.evaluate import check_folder, preflight
        from ..benchmarks.run_folder import lock_run_folder

        try:
            run = preflight(spec, out)  # before the lock creates anything in --out
            with lock_run_folder(out) as lock_fd:
                check_folder(run, out)  # again, now that no other writer can change the folder
                code = _relaunch_with_accelerate(num_processes, out, lock_fd)
        except (*user_errors(), BenchmarkError) as err:
            fail(str(err))
        raise typer.Exit(code=code)
    try:
        evaluate(
            spec, out=out, batch_size=batch_size, base=attention, hf_kwargs=hf_kwargs(device, dtype), progress=progress
        )
    except (*user_errors(), BenchmarkError) as err:
        fail(str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write((out / "report.md").read_text(encoding="utf-8"))


def score(
    benchmark: Annotated[str, typer.Argument(help=BENCH_HELP)],
    predictions: Annotated[Path, typer.Argument(help="Predictions made elsewhere, in the benchmark's format.")],
    data: Annotated[
        str | None, typer.Option(help="POPE: the question file (optional for lmms-eval samples); VLind: data.json.")
    ] = None,
    annotations: Annotated[Path | None, typer.Option(help="CHAIR: COCO annotations; AMBER: its file.")] = None,
    parse: Annotated[str | None, typer.Option(help="POPE/AMBER answer parsing: official | substring.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json goes (default: beside the predictions).")] = None,
) -> None:
    """Score predictions from other code bases (POPE answers, MME Your_Results, CHAIR captions, VLind JSON)."""
    from ..benchmarks import BenchmarkError
    from ..benchmarks.score import score_predictions

    try:
        options = _bench_options(parse=parse, annotations=annotations)
        target = out or predictions.resolve().parent / f"{benchmark}-score"
        summary = score_predictions(
            benchmark, predictions, data=data, annotations=annotations, out=target, options=options
        )
    except (*user_errors(), BenchmarkError) as err:
        fail(str(err))
    table = Table(title=f"{benchmark.upper()} — {predictions} ({summary['n_records']} predictions)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary["metrics"].items():
        table.add_row(k, f"{v:.2f}")
    Console(width=max(Console().width, 100)).print(table)
    console.print(f"wrote {target / 'metrics.json'}", highlight=False, markup=False)


def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders written by `causalmm eval`; the first is the reference.")
    ],
    out: Annotated[Path | None, typer.Option(help="Where compare.md/.json/.png go (default: ./compare).")] = None,
    plot: Annotated[bool, typer.Option(help="Also draw compare.png.")] = True,
    html: Annotated[
        Path | None, typer.Option(help="Also write one self-contained page: table, chart, disagreeing samples.")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals and paired bootstraps.")] = 1000,
) -> None:
    """Table of metrics with 95% bootstrap CIs and paired tests against regular greedy and regular sampled
    decoding where runs of them are given (else against the first run), Holm-adjusted across the methods, plus a
    bar chart; for CHAIR, each run's recall against CHAIR_i beside regular decoding at other lengths
    (frontier.png). With --html, a page listing the samples where the runs disagree, with images."""
    import shlex

    from ..benchmarks import BenchmarkError
    from ..benchmarks.compare import compare_runs

    command = shlex.join(["causalmm", *sys.argv[1:]])
    try:
        within("--n-boot", n_boot, 100, 100_000)
        result = compare_runs(runs, out or Path("compare"), plot=plot, html=html, command=command, n_boot=n_boot)
    except BenchmarkError as err:
        fail(str(err))
    sys.stdout.write(result["table"])
    if html is not None:
        console.print(f"wrote {html}", highlight=False, markup=False)


def _relaunch_with_accelerate(n: int, out: Path | None = None, lock_fd: int | None = None) -> int:
    """Run this same command under ``accelerate launch`` with ``n`` processes; its exit code.

    The workers run under the lock this launcher holds on ``out`` (named to them in ``CAUSALMM_RUN_LOCK``;
    its descriptor is passed on to accelerate's launcher, so the lock lasts while that process lives).
    Accelerate's launcher runs in its own session and gets the SIGINT/SIGTERM/SIGHUP this process receives,
    and tears its workers down as it does on its own signals; on Linux it also gets SIGTERM when this process
    dies any other way (``kill -9``), so no worker outlives the command that started it.
    """
    import signal
    import subprocess

    from ..benchmarks.run_folder import LOCK_ENV, LOCK_NAME

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        args.append(arg)
    launch = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m", "causalmm", *args]
    env = dict(os.environ)
    if lock_fd is not None and out is not None:
        env[LOCK_ENV] = os.path.realpath(out / LOCK_NAME)
    # accelerate's launcher, asking first (Linux) for SIGTERM when this process dies
    launcher = (
        "import ctypes, os, runpy, signal, sys\n"
        "if sys.platform.startswith('linux'):\n"
        "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
        "    if os.getppid() != int(sys.argv[1]):  # the parent died before prctl took effect\n"
        "        sys.exit(128 + signal.SIGTERM)\n"
        "sys.argv = ['accelerate-launch', *sys.argv[2:]]\n"
        "runpy.run_module('accelerate.commands.launch', run_name='__main__', alter_sys=True)\n"
    )
    cmd = [sys.executable, "-c", launcher, str(os.getpid()), *launch]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code
