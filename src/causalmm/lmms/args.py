"""``--model_args`` of the lmms-eval plugin: every :class:`CausalMMConfig` field, the engine's switches, how to
load the model, and the plugin's own options, read from lmms-eval's ``key=value`` pairs.

lmms-eval splits ``model_args`` on commas and turns ``true``/``false`` into booleans and numbers into ints or
floats. So lists use other separators: layer specs take ranges (``language_layers=0-3``) and ``;`` between items
(``vision_layers=0;2;5-7``), head lists ``;`` (``vision_heads=0;1``). ``none`` means "the default" for an optional
field. The parsing needs no lmms-eval, so it is tested without it, and it fails before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMAND_LINE_DEFAULTS",
    "GENERATION_KEYS",
    "LOAD_KEYS",
    "PLUGIN_KEYS",
    "ModelArgs",
    "ModelArgsError",
    "generation_options",
    "merge_command_line",
    "parse_model_args",
    "valid_keys",
]

#: how the model is loaded (passed to ``CausalMM.from_pretrained``)
LOAD_KEYS = ("pretrained", "revision", "device", "device_map", "dtype", "attn_implementation")
#: the plugin's own options (``batch_size`` and ``max_batch_size`` come from lmms-eval's command line too;
#: ``max_batch_size`` bounds lmms-eval's ``batch_size=auto``, which the plugin refuses: it is checked, not used)
PLUGIN_KEYS = ("batch_size", "max_batch_size", "max_new_tokens", "sample_id")
#: what lmms-eval's command line hands every model beside ``model_args`` (``--batch_size``, ...), with the value
#: it hands when the flag is not given (``None`` values are dropped by lmms-eval itself)
COMMAND_LINE_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": None}
#: the dtypes ``dtype=`` accepts besides ``auto``
DTYPES = ("float32", "float16", "bfloat16")


class ModelArgsError(ValueError):
    """A ``model_args`` key or value the plugin cannot use; the message names it and what would work."""


@dataclass
class ModelArgs:
    """What ``model_args`` asked for, checked.

    Attributes:
        pretrained: the model (local folder or hub id).
        config: the :class:`CausalMMConfig` fields given (validated by building the config).
        switches: the engine switches given (``reuse_prefix``, ...).
        load: ``revision``, ``device``, ``device_map``, ``dtype`` as given.
        base: the attention under the hook (``sdpa`` or ``eager``, from ``attn_implementation``).
        batch_size: prompts per engine call.
        max_new_tokens: the answer length when a task sets none.
        sample_id: how a request's sample id (its seed) is found: ``auto``, ``doc_id`` or a doc field.
    """

    pretrained: str
    config: dict[str, Any] = field(default_factory=dict)
    switches: dict[str, bool] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    base: str = "sdpa"
    batch_size: int = 1
    max_new_tokens: int = 128
    sample_id: str = "auto"


def _config_fields() -> tuple[str, ...]:
    from ..config import CausalMMConfig

    return tuple(f.name for f in dataclasses.fields(CausalMMConfig))


def _switch_fields() -> tuple[str, ...]:
    # the engine's switches, named without importing torch (decoding imports it): kept equal by a test
    return ("reuse_prefix", "share_layers", "plausible_head", "preallocate_cache")


def _own_params(method: Any) -> dict[str, object]:
    """``method``'s own hyper-parameters and their defaults (none for a name the registry lacks: the config says
    so)."""
    from ..methods import METHODS

    known = METHODS.get(method) if isinstance(method, str) else None
    return {p.field: p.default for p in known.own_params()} if known is not None else {}


def _own_value(value: Any, default: object) -> Any:
    """A method's own parameter as lmms-eval read it, back in the parameter's type where lmms-eval changed it:
    text parameters (DoLa's and DeCo's layer specs, ICD's instruction) come as numbers when they look like one
    (``layers=2``) and write lists with ``;`` (``layers=0;2;4-6``); integral floats are ints."""
    if isinstance(default, str) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        return str(_int_like(value)).replace(";", ",")
    return _int_like(value)


def valid_keys(method: str = "causalmm") -> list[str]:
    """Every key ``model_args`` accepts with ``method=`` ``method`` (its own parameters by their names)."""
    fields = set(_config_fields()) - {"params"}
    return sorted({*LOAD_KEYS, *PLUGIN_KEYS, *fields, *_switch_fields(), *_own_params(method)})


def _none(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("none", "null", "")


def _int_like(value: Any) -> Any:
    """lmms-eval reads ``-1`` as the float -1.0: give integral floats back as ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _layers(key: str, value: Any) -> Any:
    if _none(value):
        return None
    value = _int_like(value)
    if isinstance(value, str):
        return value.replace(";", ",")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ModelArgsError(
        f"{key}={value!r}: give layer indices and ranges like 0-3 or 0;2;5-7, or all/shallow/middle/deep"
    )


def _heads(key: str, value: Any) -> Any:
    if _none(value):
        return None
    value = _int_like(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        try:
            return tuple(int(h) for h in value.replace(",", ";").split(";") if h.strip())
        except ValueError:
            pass
    raise ModelArgsError(f"{key}={value!r}: give head indices separated by ';' (e.g. {key}=0;1), or none")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ModelArgsError(f"{key}={value!r}: give true or false")


def _positive_int(key: str, value: Any) -> int:
    value = _int_like(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " (batch_size=auto is not supported)" if key == "batch_size" else ""
        raise ModelArgsError(f"{key}={value!r}: give a whole number >= 1{extra}")
    return value


def _same_value(a: Any, b: Any) -> bool:
    return str(_int_like(a)).strip().lower() == str(_int_like(b)).strip().lower()


def merge_command_line(model_args: dict[str, Any], command_line: dict[str, Any] | None) -> dict[str, Any]:
    """``model_args`` with what lmms-eval's command line hands every model beside them (``--batch_size``,
    ``--max_batch_size``, ``--device``; :data:`COMMAND_LINE_DEFAULTS`).

    lmms-eval passes both as keyword arguments of one call, so a key in both (``batch_size=4`` in ``model_args``,
    and ``--batch_size``, which is always there with its default 1) was Python's "got multiple values" error. The
    ``model_args`` value wins over a flag left at its default; a key given both ways with different values is
    refused, naming both, since either could be the one meant.
    """
    merged = dict(model_args)
    for key, value in (command_line or {}).items():
        if value is None:
            continue
        if key not in merged:
            merged[key] = value
        elif not _same_value(merged[key], value) and not _same_value(value, COMMAND_LINE_DEFAULTS.get(key)):
            raise ModelArgsError(
                f"{key} is given twice, {key}={merged[key]} in --model_args and --{key} {value}; give it once"
            )
    return merged


def parse_model_args(args: dict[str, Any]) -> ModelArgs:
    """Check and sort ``model_args`` (as lmms-eval parsed them, plus ``batch_size``/``device`` from its command
    line); raises :class:`ModelArgsError` naming an unknown key with the list of valid ones, or a bad value."""
    from ..config import CausalMMConfig, ConfigError

    method = args.get("method", "causalmm")
    unknown = sorted(set(args) - set(valid_keys(method)))
    if unknown:
        raise ModelArgsError(
            f"unknown model_args key(s) {', '.join(unknown)} for --model causalmm; "
            f"valid keys: {', '.join(valid_keys(method))}"
        )
    if _none(args.get("pretrained")) or "pretrained" not in args:
        raise ModelArgsError(
            "model_args needs pretrained=<model folder or hub id> (e.g. pretrained=llava-hf/llava-1.5-7b-hf)"
        )
    out = ModelArgs(pretrained=str(args["pretrained"]))
    fields, own = set(_config_fields()) - {"params"}, _own_params(method)
    for key, value in args.items():
        if key in own:
            out.config.setdefault("params", {})[key] = _own_value(value, own[key])
        elif key in fields:
            if key in ("vision_layers", "language_layers"):
                value = _layers(key, value)
            elif key in ("vision_heads", "language_heads"):
                value = _heads(key, value)
            elif key in ("legacy", "renormalize"):
                value = _bool(key, value)
            elif key in ("num_cf_samples", "seed", "noise_step"):
                value = _int_like(value)
            out.config[key] = value
        elif key in _switch_fields():
            out.switches[key] = _bool(key, value)
    try:
        CausalMMConfig(**out.config)
    except ConfigError as err:
        raise ModelArgsError(f"model_args: {err}") from None
    except TypeError as err:  # a value of a type the config cannot compare (e.g. a number for method)
        raise ModelArgsError(f"model_args: {err}") from None
    if "batch_size" in args and args["batch_size"] is not None:
        out.batch_size = _positive_int("batch_size", args["batch_size"])
    if "max_new_tokens" in args:
        out.max_new_tokens = _positive_int("max_new_tokens", args["max_new_tokens"])
    if args.get("max_batch_size") is not None and not _none(args["max_batch_size"]):
        _positive_int("max_batch_size", args["max_batch_size"])
    if "sample_id" in args:
        out.sample_id = str(args["sample_id"])
    for key in ("revision", "device", "device_map", "dtype"):
        if key in args and not _none(args[key]) and args[key] is not None:
            out.load[key] = str(args[key])
    dtype = out.load.get("dtype", "auto")
    if dtype not in ("auto", *DTYPES):
        raise ModelArgsError(f"dtype={dtype!r}: choose auto, {', '.join(DTYPES)}")
    impl = args.get("attn_implementation")
    if impl is not None and not _none(impl):
        if impl not in ("sdpa", "eager"):
            raise ModelArgsError(
                f"attn_implementation={impl!r}: causalmm runs its own attention hook over sdpa or eager; choose one"
            )
        out.base = str(impl)
    return out


#: generation options of lmms-eval tasks the plugin reads; others are ignored with a warning
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams",
                   "repetition_penalty")  # fmt: skip


def generation_options(
    gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """The engine's :class:`~causalmm.GenerationOptions` fields for one lmms-eval request, and the keys ignored.

    lmms-eval's convention is followed: ``temperature: 0`` (POPE, MME...) means greedy whatever ``top_p`` says
    (its ``top_p: 0`` too); sampling needs ``temperature > 0`` and no ``do_sample: false``. ``until`` becomes
    the stop strings (the answer is cut before the first). ``num_beams > 1`` is beam search (every method
    beams, deterministically: with sampling asked too it is refused).
    """
    kw = dict(gen_kwargs or {})
    beams = _int_like(kw.get("num_beams") or 1)
    if not isinstance(beams, int) or beams < 1:
        raise ModelArgsError(f"num_beams={beams!r}: give an integer >= 1")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [str(u) for u in until]
    max_new = kw.get("max_new_tokens")
    opts: dict[str, Any] = {
        "max_new_tokens": _positive_int("max_new_tokens", max_new) if max_new is not None else default_max_new_tokens,
        "stop_strings": tuple(u for u in until if u),
    }
    temperature = float(kw.get("temperature") or 0.0)
    if beams > 1:
        if temperature > 0 and kw.get("do_sample") is not False:
            raise ModelArgsError(
                f"num_beams={beams} with temperature={temperature}: causalmm's beam search is deterministic; set "
                "temperature: 0 (or do_sample: false) or num_beams: 1 in the task's generation_kwargs"
            )
        opts["num_beams"] = beams
    elif temperature > 0 and kw.get("do_sample") is not False:
        top_p, top_k = kw.get("top_p"), kw.get("top_k")
        opts.update(do_sample=True, temperature=temperature)
        if top_p is not None and 0 < float(top_p) < 1:
            opts["top_p"] = float(top_p)
        if top_k:
            opts["top_k"] = int(top_k)
    penalty = kw.get("repetition_penalty")
    if penalty is not None and float(penalty) != 1.0:
        opts["repetition_penalty"] = float(penalty)
    return opts, sorted(k for k in kw if k not in GENERATION_KEYS)
