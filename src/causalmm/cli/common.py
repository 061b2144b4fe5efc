"""What every command shares: the one-line error, the option types, and the decoding options added to a command
by :func:`decoding_options` (one definition for ``generate``, ``eval`` and ``explain``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

if TYPE_CHECKING:
    from ..methods import Method

console = Console(stderr=True)


def fail(message: str) -> None:
    """Print ``error: message`` on stderr as one line and exit with code 2. The message is text, never rich
    markup: a path such as ``photos/[cat].png`` is printed as it is."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def user_errors() -> tuple[type[Exception], ...]:
    """:func:`causalmm.inputs.user_errors`, imported when first asked for (it loads torch)."""
    from ..inputs import user_errors as errors

    return errors()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (a server bound there is reachable from this machine only)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def attention_flag(value: str) -> str:
    """``--attention`` checked as the command line is read, so a typo fails before any model is loaded."""
    from ..sites import BASES

    if value not in BASES:
        fail(f"--attention {value!r} is not valid; choose one of: {', '.join(BASES)}")
    return value


MethodOpt = Annotated[str, typer.Option(help="A decoding method: `causalmm methods` lists them.")]
ModeOpt = Annotated[str, typer.Option(help="vision | language | multimodal | joint")]
VisionCfOpt = Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")]
LanguageCfOpt = Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")]
VisionLayersOpt = Annotated[str | None, typer.Option(help="e.g. '22', '0-3', 'all', 'deep'.")]
LanguageLayersOpt = Annotated[str | None, typer.Option(help="e.g. 'middle', '8-15', 'all'.")]
GammaOpt = Annotated[
    float | None, typer.Option(help="Contrast strength (0 = regular decoding); default: the method's.")
]
EpsilonOpt = Annotated[
    float | None, typer.Option(help="Plausibility cut-off on factual probabilities, [0, 1]; default: the method's.")
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="A method's own parameter, NAME=VALUE (repeatable); `causalmm methods` lists them."),
]
VisionHeadsOpt = Annotated[str | None, typer.Option(help="Vision heads intervened, e.g. '0,3' (default: all).")]
LanguageHeadsOpt = Annotated[str | None, typer.Option(help="LLM heads intervened, e.g. '0,3' (default: all).")]
SamplesOpt = Annotated[int, typer.Option(help="Counterfactual draws per branch (K), logits averaged; 1..64.")]
NoiseStepOpt = Annotated[int, typer.Option(help="VCD: diffusion noise step, 0..999.")]
NoiseScheduleOpt = Annotated[str, typer.Option(help="VCD: linear | sigmoid (VCD's released code).")]
RenormalizeOpt = Annotated[
    bool, typer.Option(help="CausalMM: counterfactual maps are distributions (--no-renormalize: the original's).")
]
DoSampleOpt = Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option(help="Top-k sampling.")]
NumBeamsOpt = Annotated[int, typer.Option(help="Beam search with this many beams (1: greedy or sampling).")]
LengthPenaltyOpt = Annotated[float, typer.Option(help="Beam search: score / length ** this (transformers').")]
EarlyStoppingOpt = Annotated[str, typer.Option(help="Beam search: true | false | never (transformers' meaning).")]
NoRepeatOpt = Annotated[int, typer.Option(help="Ban any n-gram of this size already in prompt or answer (0: off).")]
LegacyOpt = Annotated[bool, typer.Option("--legacy", help="Original release: contrast on the first token only.")]
VisionStyleOpt = Annotated[str, typer.Option(help="attention | gate (the original feature gate)")]
AttentionOpt = Annotated[
    str, typer.Option(help="Base attention for non-intervened calls: sdpa | eager", callback=attention_flag)
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, or 'auto' (device_map).")]
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")]
ModelOpt = Annotated[str, typer.Option(help="Hub id or local directory of a vision-language model.")]
ImageOpt = Annotated[Path, typer.Option(help="Path of the image.")]
PromptOpt = Annotated[str, typer.Option(help="Question or instruction; wrapped in the model's chat template.")]

#: the decoding-config flags every decoding command takes: (name, type, default); ``samples`` is num_cf_samples
_DECODING = (
    ("method", MethodOpt, "causalmm"),
    ("mode", ModeOpt, "multimodal"),
    ("vision_cf", VisionCfOpt, "random"),
    ("language_cf", LanguageCfOpt, "random"),
    ("vision_layers", VisionLayersOpt, None),
    ("language_layers", LanguageLayersOpt, None),
    ("vision_heads", VisionHeadsOpt, None),
    ("language_heads", LanguageHeadsOpt, None),
    ("gamma", GammaOpt, None),
    ("epsilon", EpsilonOpt, None),
    ("samples", SamplesOpt, 1),
    ("legacy", LegacyOpt, False),
    ("vision_style", VisionStyleOpt, "attention"),
    ("renormalize", RenormalizeOpt, True),
    ("noise_step", NoiseStepOpt, 500),
    ("noise_schedule", NoiseScheduleOpt, "linear"),
    ("param", ParamOpt, None),
)

#: the config field each decoding flag sets, where the names differ
_FIELD_OF = {"samples": "num_cf_samples"}
#: options of the generation commands that act on sampling only, and on beam search only
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
_BEAM_ONLY = ("length_penalty", "early_stopping")


def flag(field: str) -> str:
    """The command-line flag of a config field (``num_cf_samples`` is ``--samples``), or of a generation option."""
    name = {v: k for k, v in _FIELD_OF.items()}.get(field, field)
    return "--" + name.replace("_", "-")


def setting_flag(field: str, shared: bool, value: str | None = None) -> str:
    """How a method's setting is given on the command line: ``--gamma 1.0``, ``--legacy``, ``--param lamb=0.02``
    (``value`` as typed, or the default)."""
    if not shared:
        return f"--param {field}={'VALUE' if value is None else value}"
    on = value is None or str(value).lower() in ("true", "1")
    if field == "legacy":  # a switch without an opposite: off is its absence
        return "--legacy" if on else "no --legacy"
    if field == "renormalize":
        return "--renormalize" if on else "--no-renormalize"
    return flag(field) + ("" if value is None else f" {value}")


def _typed(ctx: typer.Context | None, defaults: dict[str, Any], values: dict[str, Any]) -> set[str]:
    """The parameters the user typed: from the record typer keeps of where each value came from, where the
    command line ran the command; else (a direct call) those that differ from the command's defaults."""
    if ctx is not None:
        unset = ("DEFAULT", "DEFAULT_MAP")
        return {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in unset}
    return {name for name, value in values.items() if name in defaults and value != defaults[name]}


def check_generation(options: dict[str, Any]) -> None:
    """A generation command's options (``generate``, ``eval``) checked as :class:`~causalmm.decoding
    .GenerationOptions` will check them, so that a value out of range fails before anything loads."""
    if "num_beams" not in options:  # explain: its max_new_tokens and top_k are its own, checked by explain
        return
    from ..decoding import GenerationOptions

    o = options
    given = sampling(o["do_sample"], o["temperature"], o["top_p"], o["top_k"])
    given |= search(o["num_beams"], o["length_penalty"], o["early_stopping"], o["no_repeat_ngram_size"])
    if options.get("max_new_tokens") is not None:
        given["max_new_tokens"] = options["max_new_tokens"]
    try:
        GenerationOptions(**given)
    except user_errors() as err:
        fail(str(err))


def refuse_unapplied(values: dict[str, Any], typed: set[str], options: dict[str, Any]) -> None:
    """Refuse, before anything loads, a flag the user typed that would not apply: a decoding flag the method
    does not read (``--gamma`` with ``--method regular``, ``--mode`` with ``--method vcd``, ``--vision-layers``
    in ``--mode language``), a sampling option without ``--do-sample``, a beam option without a beam search,
    OPERA's beams given twice. ``values``: the decoding flags; ``options``: the command's own."""
    from ..methods import METHODS

    method = METHODS.get(values["method"])
    if method is None:
        return  # the config names the registered methods
    settings = {_FIELD_OF.get(k, k): v for k, v in values.items()}
    read = method.reads(settings)
    for name in values:
        field = _FIELD_OF.get(name, name)
        if name in typed and field not in read and field not in ("method", "param"):
            fail(f"{flag(field)} {method.unread_reason(field, settings, spell=_spelled(method))}")
    if "do_sample" in options and not options["do_sample"]:
        for name in _SAMPLING_ONLY:
            if name in typed:
                fail(f"{flag(name)} acts on sampling only: add --do-sample to sample, or drop {flag(name)}")
    searching = options.get("num_beams", 1) > 1 or method.search is not None
    if "num_beams" in options and not searching:
        for name in _BEAM_ONLY:
            if name in typed:
                fail(f"{flag(name)} acts on beam search only: add --num-beams N (N > 1), or drop {flag(name)}")
    beams = any(item.partition("=")[0].strip() == "beams" for item in values.get("param") or [])
    if method.search == "opera" and "num_beams" in typed and beams:
        fail("--num-beams and --param beams both set OPERA's beams: give one of them")


def _spelled(method: Method) -> Callable[[str], str]:
    """How ``method``'s settings are named in a command-line error: shared ones by flag, its own by ``--param``."""
    own = {p.field for p in method.own_params()}
    return lambda field: setting_flag(field, field not in own)


def method_params(items: list[str] | None, method_name: str | None = None) -> dict[str, str]:
    """``--param NAME=VALUE`` flags as a mapping (the method types and checks the values). A setting the methods
    share is answered with its own flag (``--param gamma=2`` is ``--gamma 2``), or with why it does not apply."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--param {item!r}: give NAME=VALUE, e.g. --param alpha=0.2 (`causalmm methods` lists them)")
        out[name.strip()] = value.strip()
    if not out or method_name is None:
        return out
    from ..config import CausalMMConfig
    from ..methods import METHODS

    method = METHODS.get(method_name)
    for name, value in out.items():
        if method is None or name not in CausalMMConfig.__dataclass_fields__:
            continue
        if name in {p.field for p in method.params}:
            usage = setting_flag(name, True, value)
            fix = f"leave {usage.removeprefix('no ')} out" if usage.startswith("no ") else f"give {usage}"
            fail(
                f"--param {name}={value}: {name} is a setting the methods share, not a parameter of "
                f"{method.name}'s own: {fix}"
            )
        fail(f"--param {name}={value}: {flag(name)} {method.unread_reason(name, {}, spell=_spelled(method))}")
    return out


def decoding_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the decoding flags (in place of its ``config`` parameter) and call it with the
    :class:`~causalmm.config.CausalMMConfig` they describe (its ``seed`` from the command's own ``--seed``).

    The flags are defined once here, so the commands cannot drift apart; a bad value is one ``error:`` line, and
    so is a flag the user typed that would not apply (:func:`refuse_unapplied`)."""
    own = list(inspect.signature(command, eval_str=True, locals={"CausalMMConfig": object}).parameters.values())
    at = [p.name for p in own].index("config")
    flags = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in _DECODING]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    # typer hands the command line's context to a parameter of its type: it says which flags the user typed
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)
    defaults = {p.name: p.default for p in [*flags, *keyword]}

    @functools.wraps(command)
    def wrapper(ctx: typer.Context | None = None, **kwargs: Any) -> Any:
        from ..config import CausalMMConfig

        values = {name: kwargs.pop(name) for name, _, _ in _DECODING}
        typed = _typed(ctx, defaults, {**values, **kwargs})
        if kwargs.get("tuned") is not None:  # the choice of a tune: --method names its row, nothing else is given
            return command(config=_tuned_choice(kwargs["tuned"], values["method"], typed), **kwargs)
        refuse_unapplied(values, typed, kwargs)
        check_generation(kwargs)
        values["num_cf_samples"] = values.pop("samples")
        values["params"] = method_params(values.pop("param"), values["method"])
        try:
            config = CausalMMConfig(**values, seed=kwargs.get("seed", 0))
        except user_errors() as err:
            fail(str(err))
        return command(config=config, **kwargs)

    params = keyword[:at] + flags + keyword[at + 1 :] + [context]
    # typer reads the signature and the type hints: both are the new parameter list, with evaluated annotations
    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    del wrapper.__wrapped__
    return wrapper


def _tuned_choice(path: Any, row: str, typed: set[str]) -> Any:
    """``--tuned FILE --method ROW``: the tune's choice for ``ROW`` (:class:`causalmm.tuning.tune.Tuned`); a decoding
    flag beside it is refused, since the tune chose those settings."""
    from ..benchmarks import BenchmarkError
    from ..tuning.tune import load_tuned

    given = sorted(n for n, _, _ in _DECODING if n in typed and n != "method")
    if given:
        fail(f"--tuned fixes the decoding settings; drop {flag(_FIELD_OF.get(given[0], given[0]))}")
    if "method" not in typed:
        fail("--tuned needs --method NAME: the method whose tuned settings to run (e.g. causalmm/language)")
    try:
        return load_tuned(path, row)
    except BenchmarkError as err:
        fail(str(err))


def sampling(do_sample: bool, temperature: float, top_p: float | None, top_k: int | None) -> dict:
    """The sampling options of the flags (none but ``do_sample=False`` for greedy decoding)."""
    out: dict = {"do_sample": do_sample}
    if do_sample:
        out.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return out


def search(num_beams: int, length_penalty: float, early_stopping: str, no_repeat_ngram_size: int) -> dict:
    """The beam-search options of the flags, only those that differ from the defaults (so a run folder's
    recorded options stay what they were without them)."""
    stopping = {"true": True, "false": False, "never": "never"}.get(str(early_stopping).lower())
    if stopping is None:
        fail(f"--early-stopping {early_stopping!r}: choose true, false or never")
    out: dict = {}
    if num_beams != 1:
        out["num_beams"] = num_beams
    if length_penalty != 1.0:
        out["length_penalty"] = length_penalty
    if stopping is not False:
        out["early_stopping"] = stopping
    if no_repeat_ngram_size:
        out["no_repeat_ngram_size"] = no_repeat_ngram_size
    return out


def hf_kwargs(device: str | None, dtype: str) -> dict:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if dtype not in dtypes:
        fail(f"--dtype {dtype!r} is not valid; choose one of {', '.join(dtypes)}")
    kwargs: dict = {"dtype": dtypes[dtype]}
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device:
        kwargs["device_map"] = device
    return kwargs


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: give integers separated by commas, e.g. 0,1,2")
    if not values:
        fail(f"{flag} is empty: give at least one integer")
    return values


def within(flag: str, value: int | float, low: int | float, high: int | float | None = None, why: str = "") -> None:
    """Refuse ``value`` of ``flag`` outside ``[low, high]`` in one line naming the range (``why``: what sets it)."""
    if value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"{low} to {high}"
        fail(f"{flag} {value} is out of range: give {span}{f' ({why})' if why else ''}")


class DecodingCommand(TyperCommand):
    """A command with the decoding flags. A method's own parameter typed as a flag (``--lamb 0.5``) is answered
    with the option that sets it (``--param lamb=0.5``) instead of click's bare "No such option"."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from typer._click.exceptions import NoSuchOption

        typed = list(args)  # the parser consumes ``args``
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as err:
            flag_name, _, inline = err.option_name.partition("=")
            name = flag_name.lstrip("-").replace("-", "_")
            owners = _methods_with_param(name)
            if not owners:
                raise
            at = typed.index(err.option_name) if err.option_name in typed else -1
            after = typed[at + 1] if 0 <= at < len(typed) - 1 else ""
            joined = [a.partition("=")[2] for a in typed if a.startswith(f"{flag_name}=")]
            value = inline or (joined[0] if joined else after if not after.startswith("--") else "")
            fail(
                f"{flag_name} is a parameter of {', '.join(owners)}, not a flag of its own: give "
                f"--param {name}={value or 'VALUE'} (`causalmm methods` lists each method's settings)"
            )
            raise  # fail() exits; this keeps the type checker informed


def _methods_with_param(name: str) -> list[str]:
    """The methods that declare ``name`` as a parameter of their own."""
    from ..methods import get_method, method_names

    return [m for m in method_names() if name in {p.field for p in get_method(m).own_params()}]
