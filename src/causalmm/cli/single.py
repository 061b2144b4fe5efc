"""The commands on one image, ``generate``, ``visualize``, ``explain``, and ``methods``, which lists the decoding
methods they can run."""

from __future__ import annotations

import json
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
    ImageOpt,
    LanguageLayersOpt,
    LengthPenaltyOpt,
    ModelOpt,
    NoRepeatOpt,
    NumBeamsOpt,
    PromptOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    console,
    decoding_options,
    fail,
    hf_kwargs,
    is_loopback,
    search,
    user_errors,
)

if TYPE_CHECKING:
    from ..config import CausalMMConfig


def _open(
    model: str,
    image: Path,
    prompt: str,
    config: CausalMMConfig | None,
    attention: str,
    device: str | None,
    dtype: str,
    output: tuple[Path | None, str, str] = (None, "", ""),
):
    """The model and the image of a one-image command, every input checked first (the prompt, the output file
    ``(path, flag, example)`` if any, the image) so a mistake costs no model load."""
    from ..api import CausalMM
    from ..images import load_image
    from ..inputs import check_output_file
    from ..outputs import check_output_file as check_not_overwriting

    if not prompt.strip():
        fail("--prompt is empty; give a question or instruction about the image")
    if output[0] is not None:
        check_output_file(*output)
        check_not_overwriting(output[0], output[1], [("--image", image), ("--model", model)])
    pil = load_image(image)
    return CausalMM.from_pretrained(model, config, base=attention, **hf_kwargs(device, dtype)), pil


@decoding_options
def generate(
    model: ModelOpt,
    image: ImageOpt,
    prompt: PromptOpt,
    config: CausalMMConfig = None,  # the decoding flags, added by @decoding_options
    seed: Annotated[int, typer.Option(help="Seed of the counterfactual draws and of sampling.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    num_beams: NumBeamsOpt = 1,
    length_penalty: LengthPenaltyOpt = 1.0,
    early_stopping: EarlyStoppingOpt = "false",
    no_repeat_ngram_size: NoRepeatOpt = 0,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Answer one prompt about one image with the chosen decoding method."""
    beams = search(num_beams, length_penalty, early_stopping, no_repeat_ngram_size)
    try:
        cm, pil = _open(model, image, prompt, config, attention, device, dtype)
        result = cm.generate(
            pil,
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            **beams,
        )
    except user_errors() as err:
        fail(str(err))
    if as_json:
        payload = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "method": config.method,
            "config": config.to_dict(),
            "model": model,
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(result.text + "\n")


def visualize(
    model: ModelOpt,
    image: ImageOpt,
    prompt: PromptOpt,
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
    from ..visualize import visualize as draw

    try:
        cm, pil = _open(model, image, prompt, None, attention, device, dtype, (out, "--out", "attention.png"))
        path = draw(
            cm, pil, prompt, layers=layers, language_layers=language_layers, methods=methods, seed=seed, out=out
        )
    except user_errors() as err:
        fail(str(err))
    console.print(f"wrote {path}", highlight=False, markup=False)


@decoding_options
def explain(
    model: ModelOpt,
    image: ImageOpt,
    prompt: PromptOpt,
    config: CausalMMConfig = None,  # the decoding flags, added by @decoding_options
    seed: Annotated[int, typer.Option(help="Seed of the counterfactual draws.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 16,
    top_k: Annotated[int, typer.Option(help="Candidates shown per branch and step; 1 to the vocabulary size.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    html: Annotated[Path | None, typer.Option(help="Also write an HTML report with the attention figure.")] = None,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Per generated token: top candidates under the factual branch, each counterfactual, and the contrast."""
    import tempfile

    from ..explain import explain as run_explain
    from ..visualize import visualize as draw

    try:
        cm, pil = _open(model, image, prompt, config, attention, device, dtype, (html, "--html", "report.html"))
        ex = run_explain(cm, pil, prompt, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
        if html is not None:
            with tempfile.TemporaryDirectory() as tmp:
                figure = draw(cm, pil, prompt, seed=seed, out=Path(tmp) / "attention.png")
                ex.to_html(html, figure=figure)
    except user_errors() as err:
        fail(str(err))
    if as_json:
        sys.stdout.write(json.dumps(ex.to_json(), allow_nan=False) + "\n")
    else:
        Console(width=max(Console().width, 140)).print(ex.table())
    if html is not None:
        console.print(f"wrote {html}", highlight=False, markup=False)


def methods() -> None:
    """List the decoding methods of the registry: name, what it does, the paper and code it follows, and the
    settings it reads, each as it is given on the command line with its default, the values it takes and where
    the default comes from, and the values `causalmm tune` tries (the default always among them)."""
    from ..methods import get_method, method_names
    from .common import setting_flag

    table = Table(title="decoding methods (--method)")
    for column in ("method", "what", "follows", "settings: flag with its default, accepted values: origin"):
        table.add_column(column, overflow="fold")
    for name in method_names():
        m = get_method(name)
        own = {p.field for p in m.own_params()}
        lines = []
        for p in m.params:
            shared = p.field not in own
            if isinstance(p.default, bool) and shared:  # a switch: --legacy, --renormalize / --no-renormalize
                usage = f"{setting_flag(p.field, True, str(not p.default))} (default {'on' if p.default else 'off'})"
            elif p.default is None:
                usage = f"{setting_flag(p.field, shared)} (default: unset)"
            else:
                default = str(p.default).lower() if isinstance(p.default, bool) else str(p.default)
                usage = setting_flag(p.field, shared, default)
            tries = p.grid if p.default in p.grid else (p.default, *p.grid)
            tuned = f"; tune tries {', '.join('none' if v is None else str(v) for v in tries)}" if p.grid else ""
            lines.append(f"{usage}, {p.accepted()}: {p.source}{tuned}")
        table.add_row(name, m.summary, m.reference, "\n".join(lines))
    Console(width=max(Console().width, 160)).print(table)


def app(
    model: Annotated[
        str | None, typer.Option(help="Hub id or local directory (default: the shipped toy-world model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback is reachable by others.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    world: Annotated[
        str, typer.Option(help="Without --model: the shipped toy world whose model and examples to serve (default | "
                          "vision-prior).")
    ] = "default",
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """A local web page: drop an image, ask, tick methods, compare their answers, explain one.

    Needs `pip install 'causalmm\\[app]'`.
    """
    # typer prints the help through rich, which reads "[app]" as markup: hence the backslash; fail() escapes its
    # messages, and escape() keeps the two lines printed here as text (a host can hold brackets too)
    import os

    from rich.markup import escape

    from ..app.ui import check_host, check_port

    # the address is checked first, before gradio's import and the model load (seconds), so a typo fails at once
    problem = check_host(host)
    if problem:
        fail(problem)
    if not is_loopback(host):
        console.print(
            f"[bold yellow]warning:[/] binding {escape(host)}: anyone who can reach this machine can use the app and "
            "its model; use the default 127.0.0.1 to keep it local",
            highlight=False,
        )
    problem = check_port(host, port)
    if problem:
        fail(problem)
    toy = model is None
    if toy:
        from ..config import ConfigError
        from ..toyworld.worlds import shipped_model_path

        try:
            model = str(shipped_model_path(world))
        except (ConfigError, FileNotFoundError) as err:
            fail(str(err))
    elif world != "default":
        fail("--world picks a shipped toy-world model: give it without --model")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the app talks to nobody
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the app needs gradio: pip install 'causalmm[app]'")
    from ..app import Session
    from ..app.ui import build_app, examples

    try:
        session = Session(model, base=attention, **hf_kwargs(device, dtype))
    except user_errors() as err:
        fail(str(err))
    if toy:
        session.model_name = "the shipped toy-world model" + ("" if world == "default" else f" ({world} world)")
    page = build_app(session, example_images=examples(world=world) if toy else None)
    where = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    console.print(escape(f"serving {model} on http://{where}:{port} (Ctrl+C stops)"), highlight=False)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True)
