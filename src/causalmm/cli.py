"""The ``causalmm`` command line: a thin layer over the public API.

User errors (bad flags, missing image, unknown model) print one line ``error: ...`` and exit with code 2;
nothing below the API is shown to the user as a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="CausalMM: counterfactual-attention decoding that makes vision-language models hallucinate less.",
)
console = Console(stderr=True)

if TYPE_CHECKING:
    from .config import CausalMMConfig


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors():
    from .adapters import UnsupportedModelError
    from .config import ConfigError
    from .inputs import InputError

    return (InputError, ConfigError, UnsupportedModelError)


def _attention_flag(value: str) -> str:
    """``--attention`` checked as the command line is read, so a typo fails before any model is loaded."""
    from .attention import BASES

    if value not in BASES:
        _fail(f"--attention {value!r} is not valid; choose one of: {', '.join(BASES)}")
    return value


# Options shared by `generate` and `eval` (one definition each, so the two commands cannot drift apart).
MethodOpt = Annotated[str, typer.Option(help="regular | causalmm | vcd")]
ModeOpt = Annotated[str, typer.Option(help="vision | language | multimodal | joint")]
VisionCfOpt = Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")]
LanguageCfOpt = Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")]
VisionLayersOpt = Annotated[str | None, typer.Option(help="e.g. '22', '0-3', 'all', 'deep'.")]
LanguageLayersOpt = Annotated[str | None, typer.Option(help="e.g. 'middle', '8-15', 'all'.")]
GammaOpt = Annotated[float, typer.Option(help="Contrast strength (0 = regular decoding).")]
EpsilonOpt = Annotated[float, typer.Option(help="Plausibility cut-off on factual probabilities, [0, 1].")]
SamplesOpt = Annotated[int, typer.Option(help="Counterfactual draws per branch (K), logits averaged.")]
DoSampleOpt = Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option(help="Top-k sampling.")]
LegacyOpt = Annotated[bool, typer.Option("--legacy", help="Original release: contrast on the first token only.")]
VisionStyleOpt = Annotated[str, typer.Option(help="attention | gate (the original feature gate)")]
AttentionOpt = Annotated[
    str, typer.Option(help="Base attention for non-intervened calls: sdpa | eager", callback=_attention_flag)
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, or 'auto' (device_map).")]
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")]
ModelOpt = Annotated[str, typer.Option(help="Hub id or local directory of a vision-language model.")]


_CONFIG_FLAGS = (
    "method", "mode", "vision_cf", "language_cf", "vision_layers", "language_layers", "gamma", "epsilon", "samples",
    "seed", "legacy", "vision_style",
)  # fmt: skip


def _config(values: dict) -> CausalMMConfig:
    """The CausalMMConfig of a command's flags (``values`` = its ``locals()``; flags it lacks keep defaults)."""
    from .config import CausalMMConfig

    kwargs = {k: values[k] for k in _CONFIG_FLAGS if k in values}
    kwargs["num_cf_samples"] = kwargs.pop("samples")
    return CausalMMConfig(**kwargs)


def _sampling(do_sample: bool, temperature: float, top_p: float | None, top_k: int | None) -> dict:
    out: dict = {"do_sample": do_sample}
    if do_sample:
        out.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return out


@app.command()
def generate(
    model: ModelOpt,
    image: Annotated[Path, typer.Option(help="Path of the image.")],
    prompt: Annotated[str, typer.Option(help="Question or instruction; wrapped in the model's chat template.")],
    method: MethodOpt = "causalmm",
    mode: ModeOpt = "multimodal",
    vision_cf: VisionCfOpt = "random",
    language_cf: LanguageCfOpt = "random",
    vision_layers: VisionLayersOpt = None,
    language_layers: LanguageLayersOpt = None,
    gamma: GammaOpt = 1.0,
    epsilon: EpsilonOpt = 0.1,
    samples: SamplesOpt = 1,
    seed: Annotated[int, typer.Option(help="Seed of the counterfactual draws and of sampling.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    legacy: LegacyOpt = False,
    vision_style: VisionStyleOpt = "attention",
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Answer one prompt about one image with the chosen decoding method."""
    from .api import CausalMM
    from .images import load_image

    try:
        config = _config(locals())
        if not prompt.strip():
            _fail("--prompt is empty; give a question or instruction about the image")
        pil = load_image(image)
        cm = CausalMM.from_pretrained(model, config, base=attention, **_hf_kwargs(device, dtype))
        result = cm.generate(
            pil,
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
    except _user_errors() as err:
        _fail(str(err))
    if as_json:
        payload = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "method": method,
            "config": config.to_dict(),
            "model": model,
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(result.text + "\n")


BENCH_HELP = "pope | mme | chair | vlind"


def _bench_options(**given) -> dict:
    """Benchmark options the user set (unset ones keep each benchmark's own default)."""
    return {k: v for k, v in given.items() if v is not None}


def _parse_seeds(seed: int, seeds: str | None) -> list[int]:
    if not seeds:
        return [seed]
    try:
        out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds {seeds!r} is not a comma-separated list of integers (e.g. 1,2,3)")
    if not out or len(set(out)) != len(out):
        _fail(f"--seeds {seeds!r} must list distinct integers")
    return out


@app.command("eval")
def eval_(
    benchmark: Annotated[str, typer.Argument(help=BENCH_HELP)],
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Question file/folder, a parquet export, or a hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Run folder; rerunning into it resumes.")],
    images: Annotated[Path | None, typer.Option(help="Image folder of the benchmark.")] = None,
    method: MethodOpt = "causalmm",
    mode: ModeOpt = "multimodal",
    vision_cf: VisionCfOpt = "random",
    language_cf: LanguageCfOpt = "random",
    vision_layers: VisionLayersOpt = None,
    language_layers: LanguageLayersOpt = None,
    gamma: GammaOpt = 1.0,
    epsilon: EpsilonOpt = 0.1,
    samples: SamplesOpt = 1,
    legacy: LegacyOpt = False,
    vision_style: VisionStyleOpt = "attention",
    seed: Annotated[int, typer.Option(help="Run seed; each sample's seed derives from it and its id.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Several run seeds, e.g. 1,2,3: mean ± std.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (whole MME image pairs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batched generate call.")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the benchmark's own.")] = None,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    suffix: Annotated[str | None, typer.Option(help="POPE/MME: text appended to each question.")] = None,
    prompt: Annotated[str | None, typer.Option(help="CHAIR: the captioning prompt.")] = None,
    parse: Annotated[str | None, typer.Option(help="POPE answer parsing: official | substring.")] = None,
    category: Annotated[str | None, typer.Option(help="POPE (HF layout): keep one category.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="CHAIR: folder of the COCO annotation files.")] = None,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    num_processes: Annotated[
        int, typer.Option(help="Split the run over N processes with `accelerate launch` (one per GPU).")
    ] = 1,
) -> None:
    """Run a benchmark into a run folder (resumable), score it, write metrics.json and report.md.

    Under `accelerate launch -m causalmm eval ...` (or with --num-processes N) the samples are dealt across
    the processes, each appending to its own shard; the main process merges them into the same files a
    single process writes.
    """
    from .benchmarks import BenchmarkError
    from .benchmarks.evaluate import RunSpec, evaluate

    if num_processes < 1:
        _fail(f"--num-processes must be at least 1, got {num_processes}")
    relaunch = num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1

    run_seeds = _parse_seeds(seed, seeds)
    try:
        config = _config(locals())
        generation = _sampling(do_sample, temperature, top_p, top_k)
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        options = _bench_options(suffix=suffix, prompt=prompt, parse=parse, category=category, annotations=annotations)
        spec = RunSpec(benchmark, model, data, images, config, generation, run_seeds, limit, options)
    except (*_user_errors(), BenchmarkError) as err:
        _fail(str(err))
    if relaunch:  # the launcher holds the folder's lock for its workers and checks everything first, so bad
        # input fails with one line, not once per process
        from .benchmarks.evaluate import check_folder, preflight
        from .benchmarks.run_folder import lock_run_folder

        try:
            run = preflight(spec, out)  # before the lock creates anything in --out
            with lock_run_folder(out) as lock_fd:
                check_folder(run, out)  # again, now that no other writer can change the folder
                code = _relaunch_with_accelerate(num_processes, out, lock_fd)
        except (*_user_errors(), BenchmarkError) as err:
            _fail(str(err))
        raise typer.Exit(code=code)
    try:
        evaluate(
            spec, out=out, batch_size=batch_size, base=attention, hf_kwargs=_hf_kwargs(device, dtype), progress=progress
        )
    except (*_user_errors(), BenchmarkError) as err:
        _fail(str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write((out / "report.md").read_text(encoding="utf-8"))


@app.command()
def score(
    benchmark: Annotated[str, typer.Argument(help=BENCH_HELP)],
    predictions: Annotated[Path, typer.Argument(help="Predictions made elsewhere, in the benchmark's format.")],
    data: Annotated[str | None, typer.Option(help="POPE: the question file; VLind: data.json.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="CHAIR: folder of the COCO annotation files.")] = None,
    parse: Annotated[str | None, typer.Option(help="POPE answer parsing: official | substring.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json goes (default: beside the predictions).")] = None,
) -> None:
    """Score predictions from other code bases (POPE answers, MME Your_Results, CHAIR captions, VLind JSON)."""
    from .benchmarks import BenchmarkError
    from .benchmarks.evaluate import score_predictions

    try:
        options = _bench_options(parse=parse, annotations=annotations)
        target = out or predictions.resolve().parent / f"{benchmark}-score"
        summary = score_predictions(
            benchmark, predictions, data=data, annotations=annotations, out=target, options=options
        )
    except (*_user_errors(), BenchmarkError) as err:
        _fail(str(err))
    table = Table(title=f"{benchmark.upper()} — {predictions} ({summary['n_records']} predictions)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary["metrics"].items():
        table.add_row(k, f"{v:.2f}")
    Console(width=max(Console().width, 100)).print(table)
    console.print(f"wrote {target / 'metrics.json'}", highlight=False)


@app.command()
def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders written by `causalmm eval`; the first is the reference.")
    ],
    out: Annotated[Path | None, typer.Option(help="Where compare.md/.json/.png go (default: ./compare).")] = None,
    plot: Annotated[bool, typer.Option(help="Also draw compare.png.")] = True,
) -> None:
    """Table of metrics with 95% bootstrap CIs and paired tests against the first run, plus a bar chart."""
    from .benchmarks import BenchmarkError
    from .benchmarks.compare import compare_runs

    try:
        result = compare_runs(runs, out or Path("compare"), plot=plot)
    except BenchmarkError as err:
        _fail(str(err))
    sys.stdout.write(result["table"])


@app.command()
def visualize(
    model: ModelOpt,
    image: Annotated[Path, typer.Option(help="Path of the image.")],
    prompt: Annotated[str, typer.Option(help="Question or instruction; wrapped in the model's chat template.")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")],
    layers: Annotated[str | None, typer.Option(help="Vision layers (default: the one feeding the LLM).")] = None,
    language_layers: LanguageLayersOpt = None,
    methods: Annotated[str, typer.Option(help="Counterfactuals to show, comma-separated.")] = (
        "random,uniform,reversed,shuffle"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the random counterfactual draws.")] = 0,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """One figure: the image, its factual vision and LLM attention maps, and each counterfactual's."""
    from .api import CausalMM
    from .images import load_image
    from .inputs import check_output_file
    from .visualize import visualize as draw

    try:
        if not prompt.strip():
            _fail("--prompt is empty; give a question or instruction about the image")
        check_output_file(out, "--out", "attention.png")  # before the model loads, not after the work is done
        pil = load_image(image)
        cm = CausalMM.from_pretrained(model, base=attention, **_hf_kwargs(device, dtype))
        path = draw(
            cm, pil, prompt, layers=layers, language_layers=language_layers, methods=methods, seed=seed, out=out
        )
    except _user_errors() as err:
        _fail(str(err))
    console.print(f"wrote {path}", highlight=False)


@app.command()
def explain(
    model: ModelOpt,
    image: Annotated[Path, typer.Option(help="Path of the image.")],
    prompt: Annotated[str, typer.Option(help="Question or instruction; wrapped in the model's chat template.")],
    method: MethodOpt = "causalmm",
    mode: ModeOpt = "multimodal",
    vision_cf: VisionCfOpt = "random",
    language_cf: LanguageCfOpt = "random",
    vision_layers: VisionLayersOpt = None,
    language_layers: LanguageLayersOpt = None,
    gamma: GammaOpt = 1.0,
    epsilon: EpsilonOpt = 0.1,
    samples: SamplesOpt = 1,
    seed: Annotated[int, typer.Option(help="Seed of the counterfactual draws.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 16,
    top_k: Annotated[int, typer.Option(help="Candidates shown per branch and step.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    html: Annotated[Path | None, typer.Option(help="Also write an HTML report with the attention figure.")] = None,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Per generated token: top candidates under the factual branch, each counterfactual, and the contrast."""
    import tempfile

    from .api import CausalMM
    from .explain import explain as run_explain
    from .images import load_image
    from .inputs import check_output_file
    from .visualize import visualize as draw

    try:
        config = _config(locals())
        if not prompt.strip():
            _fail("--prompt is empty; give a question or instruction about the image")
        if html is not None:
            check_output_file(html, "--html", "report.html")  # before the model loads, not after the work is done
        pil = load_image(image)
        cm = CausalMM.from_pretrained(model, config, base=attention, **_hf_kwargs(device, dtype))
        ex = run_explain(cm, pil, prompt, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
        if html is not None:
            with tempfile.TemporaryDirectory() as tmp:
                figure = draw(cm, pil, prompt, seed=seed, out=Path(tmp) / "attention.png")
                ex.to_html(html, figure=figure)
    except _user_errors() as err:
        _fail(str(err))
    if as_json:
        sys.stdout.write(json.dumps(ex.to_json(), allow_nan=False) + "\n")
    else:
        Console(width=max(Console().width, 140)).print(ex.table())
    if html is not None:
        console.print(f"wrote {html}", highlight=False)


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

    from .benchmarks.run_folder import LOCK_ENV, LOCK_NAME

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


def _hf_kwargs(device: str | None, dtype: str) -> dict:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if dtype not in dtypes:
        _fail(f"--dtype {dtype!r} is not valid; choose one of {', '.join(dtypes)}")
    kwargs: dict = {"dtype": dtypes[dtype]}
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device:
        kwargs["device_map"] = device
    return kwargs


@app.command()
def demo(
    model: Annotated[
        Path | None, typer.Option(help="A toy-world model directory (default: the one shipped in the package).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where metrics.json and demo.png go.")] = Path("runs/demo"),
    images: Annotated[int, typer.Option(help="Test-split images (every object is asked about each).")] = 240,
    seeds: Annotated[str, typer.Option(help="Counterfactual seeds, comma-separated.")] = "0,1,2",
    batch_size: Annotated[int, typer.Option(help="Questions per batch.")] = 32,
) -> None:
    """Show what CausalMM does on the embedded toy-world model: prior-induced hallucination, before and after.

    Runs regular greedy, VCD and CausalMM (vision, language, multimodal) on the toy world's test split, with the
    settings chosen on its val split, and prints each method's rates with 95% bootstrap intervals.
    """
    from .toyworld.demo import demo as run_demo

    seed_list = _int_list(seeds, "--seeds")
    if images < 1 or batch_size < 1:
        _fail("--images and --batch-size must be at least 1")
    try:
        result = run_demo(model, out=out, n_images=images, seeds=seed_list, batch_size=batch_size)
    except (FileNotFoundError, *_user_errors()) as err:
        _fail(str(err))
    _print_demo(result, out)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{flag} {text!r}: give integers separated by commas, e.g. 0,1,2")
    if not values:
        _fail(f"{flag} is empty: give at least one integer")
    return values


def _print_demo(result: dict, out: Path) -> None:
    def ci(x: dict) -> str:
        return f"{100 * x['mean']:5.1f} [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}]"

    table = Table(
        title=f"Toy world, test split: {result['n_questions']} questions, seeds {result['seeds']} "
        f"(settings {result['settings_source']})"
    )
    for col in (
        "method", "prior-induced hallucination %", "Δ", "other absent false-yes %", "prior-consistent accuracy %",
        "Δ", "accuracy %", "CIs disjoint",
    ):  # fmt: skip
        table.add_column(col)
    for row in result["table"]:
        rates = result["rates"][row["method"]]
        table.add_row(
            row["method"],
            ci(row["prior_hallucination"]),
            f"{100 * row['delta_hallucination']:+.1f}",
            ci(rates["other_absent"]),
            ci(row["consistent_accuracy"]),
            f"{100 * row['delta_consistent_accuracy']:+.1f}",
            ci(rates["accuracy"]),
            "yes" if row["ci_disjoint_from_reference"] else "",
        )
    Console(width=max(Console().width, 150)).print(table)
    print(f"wrote {out / 'metrics.json'} and {out / 'demo.png'} ({result['wall_time_s']:.0f} s)")


@app.command()
def plumbing(
    family: Annotated[
        str, typer.Option(help="Tiny model family: llava | llava_next | qwen2_vl | qwen2_5_vl | ...")
    ] = "llava",
    out: Annotated[Path, typer.Option(help="Where the tiny model is built.")] = Path("runs/plumbing-model"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 8,
) -> None:
    """Run every method on a tiny random-weight model of any family and show what each branch did.

    The weights are random: this shows the machinery (branches, contrast, per-branch effect), not quality.
    """
    from PIL import Image

    from .api import CausalMM
    from .config import CausalMMConfig
    from .tiny import ALL_FAMILIES, build_tiny_model

    if family not in ALL_FAMILIES:
        _fail(f"--family {family!r} is not valid; choose one of {', '.join(ALL_FAMILIES)}")
    path = build_tiny_model(family, out / family)
    image = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    prompt = "Is there a red cat in the image? Answer yes or no."
    base = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"))
    rows = [("regular", CausalMMConfig(method="regular")), ("vcd", CausalMMConfig(method="vcd"))]
    rows += [
        (f"causalmm/{m}", CausalMMConfig(mode=m, language_layers="all"))
        for m in ("vision", "language", "multimodal", "joint")
    ]
    table = Table(title=f"RANDOM WEIGHTS — tiny {family} model (plumbing demo, not a quality result)")
    for col in ("method", "tokens", "max |factual - branch| logit gap per branch (step 1)", "changed vs regular"):
        table.add_column(col)
    ref = None
    for name, cfg in rows:
        res = base.with_config(cfg).generate(image, prompt, max_new_tokens=max_new_tokens, return_branch_logits=True)
        ref = ref or res.token_ids
        fact = res.branch_logits["factual"][0]
        gaps = ", ".join(
            f"{k}={float((v[0] - fact).abs().max()):.3f}"
            for k, v in res.branch_logits.items()
            if k not in ("factual", "combined")
        )
        table.add_row(name, str(res.token_ids), gaps or "(no counterfactual branch)", str(res.token_ids != ref))
    Console(width=max(Console().width, 140)).print(table)


toyworld_app = typer.Typer(no_args_is_help=True, help="The embedded toy world: train its model, tune, write splits.")
app.add_typer(toyworld_app, name="toyworld")


@toyworld_app.command("train")
def toyworld_train(
    out: Annotated[Path, typer.Option(help="Output directory (a from_pretrained model directory).")],
    seed: Annotated[int, typer.Option(help="Initialisation seed (and the stretch of the data stream used).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default: the shipped model's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per step (default: the shipped model's).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads (results are reproducible for a fixed count).")] = 2,
) -> None:
    """Train the toy-world LLaVA from scratch on generated data (about 14 minutes on 2 CPU cores)."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .toyworld.train import TrainConfig, train

    cfg = TrainConfig(seed=seed, threads=threads)
    try:
        cfg = replace(cfg, **{k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v is not None})
    except ValueError as err:
        _fail(str(err))
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ) as bar:
        task = bar.add_task("train", total=cfg.steps, info="")

        def on_log(record: dict) -> None:
            if "vision_step" in record:  # stage 1 (vision tower) done
                bar.update(task, info=f"vision tower: patch accuracy {record['patch_exact']:.2f}")
                return
            acc = record["accuracy"]
            info = f"loss {record['loss']:.3f}  exist {acc.get('exist', 0):.2f}  colour {acc.get('colour', 0):.2f}"
            bar.update(task, completed=record["step"], info=info)

        path = train(out, cfg=cfg, on_log=on_log)
    print(f"wrote {path} (load it with --model {path})")


@toyworld_app.command("tune")
def toyworld_tune(
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the shipped one).")] = None,
    images: Annotated[int, typer.Option(help="Val-split images.")] = 80,
    max_drop: Annotated[float, typer.Option(help="Largest prior-consistent accuracy loss allowed.")] = 0.02,
) -> None:
    """Choose each method's settings on the val split; writes tuning.json beside the model (the demo reads it)."""
    from .toyworld.demo import tune

    result = tune(model, n_images=images, max_drop=max_drop)
    for method, best in result["chosen"].items():
        r = best["rates"]
        print(f"{method:20s} {json.dumps(best['settings'])}  hallucination {r['prior_conflict']:.3f}  "
              f"consistent {r['prior_consistent']:.3f}")


@toyworld_app.command("splits")
def toyworld_splits(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    val_images: Annotated[int, typer.Option(help="Val-split images.")] = 200,
    test_images: Annotated[int, typer.Option(help="Test-split images.")] = 500,
) -> None:
    """Write the val and test splits in the POPE, CHAIR and VLind-Bench formats (for `causalmm eval`)."""
    from .toyworld import WorldConfig, write_splits

    paths = write_splits(out, WorldConfig(), n_images_val=val_images, n_images_test=test_images)
    print(f"wrote {paths['manifest']}; commands to run are listed in it")


#: OS errors a user causes (a path that is a directory, a file in the way, no permission, a full or read-only
#: disk): the CLI reports them in one line. Every other exception stays a traceback: it is a bug to report.
_USER_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USER_ERRNOS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
}
_OS_HINTS = {
    PermissionError: "check the permissions, or choose another path",
    IsADirectoryError: "give a file path, not a directory",
    NotADirectoryError: "a part of the path is a file, not a directory",
    FileExistsError: "a file is in the way; move it or choose another path",
}


def user_os_error(err: BaseException) -> str | None:
    """The one-line message for an OS error the user caused (naming the path), ``None`` for anything else."""
    if not isinstance(err, OSError) or not (isinstance(err, _USER_OS_ERRORS) or err.errno in _USER_ERRNOS):
        return None
    hint = next((h for cls, h in _OS_HINTS.items() if isinstance(err, cls)), None) or _USER_ERRNOS[err.errno]
    paths = [os.fsdecode(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths) if paths else "(the path was not reported)"
    what = (err.strerror or type(err).__name__).lower()
    return f"{what}: {where}; {hint}"


def main() -> None:
    """Console entry point.

    A safety net below every command: the project's user errors and the OS errors a user causes end as one
    ``error:`` line (exit code 2) even where a command does not catch them; any other exception is a bug and
    keeps its traceback.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own one-line errors
    try:
        app()
    except (*_user_errors(), OSError) as err:
        line = str(err) if not isinstance(err, OSError) else user_os_error(err)
        if line is None:
            raise
        console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
