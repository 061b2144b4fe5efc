"""The settings every decoding method shares, their ranges and their method-independent checks.

:class:`Settings` is what a method reads; :class:`~causalmm.config.CausalMMConfig` is the same settings checked
against the method registry as well (the method's defaults filled in, a setting it does not read refused). The
split keeps the methods below the config: a method imports this module, the config imports the methods.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .interventions import COUNTERFACTUALS

__all__ = [
    "ALWAYS_READ", "ANY_DEPTH", "FIELD_RANGES", "GAMMA_MAX", "LAYER_WORDS", "MAX_BEAMS", "MAX_CF_SAMPLES", "SEED_RANGE",
    "VISION_STYLES", "ConfigError", "LayerSpec", "Range", "Settings", "is_int", "is_real", "resolve_layers", "shown",
]  # fmt: skip

VISION_STYLES: tuple[str, ...] = ("attention", "gate")
LAYER_WORDS: tuple[str, ...] = ("all", "shallow", "middle", "deep")

LayerSpec = str | int | list[int] | tuple[int, ...] | None


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool: ``True`` is an int to Python but never a count or a seed."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool and not a string; an integer too large for a float is
    not (no computation here could use it)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _num(x: float) -> str:
    """A bound as people write it: ``0``, ``0.01``, ``100``, ``2**63 - 1`` in full."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, but an integer too long to print (Python refuses to write one of
    over 4300 digits) as its size."""
    if is_int(value) and int(value).bit_length() > 200:
        return f"<an integer of {int(value).bit_length()} bits>"
    return repr(value)


@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in, and a check of it: ``Range(0, 1, low_open=True)`` is ``(0, 1]``,
    ``Range(0)`` is ``[0, inf)``. ``note`` says what the ends mean (``"0 = no contrast"``). One object gives the
    check, the error text and the range ``causalmm methods`` and the docs show, so they cannot drift apart."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __str__(self) -> str:
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        low = "-inf" if self.low is None else _num(self.low)
        high = "inf" if self.high is None else _num(self.high)
        return f"{left}{low}, {high}{right}"

    def __call__(self, value: float) -> str | None:
        """Why ``value`` is outside (``must be in [0, 1] (note)``), or ``None``."""
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        return f"must be in {self}" + (f" ({self.note})" if self.note else "")


#: the fields every method reads: which method, its own parameters, and the seed of its draws and of sampling
ALWAYS_READ = frozenset({"method", "params", "seed"})
#: what ``gamma`` and ``epsilon`` resolve to for a method that declares no default of its own
FALLBACK = {"gamma": 1.0, "epsilon": 0.1}

#: the largest contrast strength: at 100 the factual term weighs 1% of the score, so the rule ranks by the
#: contrast alone; far above it the float32 scores overflow (``inf - inf``) and the choice is noise
GAMMA_MAX = 100.0
#: the most beams: every beam carries its prompt's factual and branch rows, each with its KV cache, through every
#: forward; past a few dozen the search costs that many times the memory and time for no better answer
MAX_BEAMS = 64
#: the most counterfactual draws per branch: each is a row of its own in every forward, with its own KV cache
MAX_CF_SAMPLES = 64
#: seeds are 64-bit signed integers, what torch generators, numpy and JSON readers all carry
SEED_RANGE = Range(-(2**63), 2**63 - 1, note="a 64-bit signed integer")

#: each shared field's accepted values, as ``causalmm methods`` and docs/methods.md show them
FIELD_RANGES: dict[str, str] = {
    "mode": "vision | language | multimodal | joint",
    "vision_cf": " | ".join(COUNTERFACTUALS),
    "language_cf": " | ".join(COUNTERFACTUALS),
    "vision_layers": "layer indices, ranges (2,5-7; 4:8) or all/shallow/middle/deep, within the vision layers up "
    "to the one that feeds the LLM (checked with the model)",
    "language_layers": "the same syntax, within the LLM's layers (checked with the model)",
    "vision_heads": "head indices >= 0, below the tower's head count (checked with the model); none: all",
    "language_heads": "head indices >= 0, below the LLM's head count (checked with the model); none: all",
    "gamma": f"[0, {_num(GAMMA_MAX)}]",
    "epsilon": "[0, 1]",
    "num_cf_samples": f"[1, {MAX_CF_SAMPLES}]",
    "seed": "a 64-bit signed integer",
    "legacy": "true | false",
    "vision_style": " | ".join(VISION_STYLES),
    "renormalize": "true | false",
    "noise_step": "[0, 999]",
    "noise_schedule": "linear | sigmoid",
}


def check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(options)}")


#: the depth a layer spec is read against before the model is known (its syntax, and no absurd index)
ANY_DEPTH = 10_000


def _out_of_range(what: str, index: int, n_layers: int) -> str:
    if n_layers >= ANY_DEPTH:  # no model yet: the syntax check
        return f"{what} index {index} is beyond any model's layers; give an index within the model's layers"
    return f"{what} index {index} is out of range: the module has {n_layers} layers (0..{n_layers - 1})"


def resolve_layers(spec: LayerSpec, n_layers: int, *, what: str = "layers") -> list[int]:
    """Turn a layer spec into sorted 0-based indices among ``n_layers``.

    Accepts an int or list of ints (negative counts from the end), a string of comma-separated indices and
    ranges (``"2,5-7"`` is 2, 5, 6, 7; ``"4:8"`` is 4..7), or a word: ``all``, ``shallow`` / ``middle`` /
    ``deep`` (the first, middle and last third of the layers).

    >>> resolve_layers("middle", 32)
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    >>> resolve_layers("1,-1", 4)
    [1, 3]
    """
    if n_layers <= 0:
        raise ConfigError(f"cannot select {what}: the module has no layers")
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str) and spec in LAYER_WORDS:
        third = max(1, n_layers // 3)
        start = {"shallow": 0, "middle": (n_layers - third) // 2, "deep": n_layers - third}[spec]
        return list(range(start, start + third))
    items: list[int] = []
    if is_int(spec):
        items = [int(spec)]
    elif isinstance(spec, (list, tuple)):
        bad = [x for x in spec if not is_int(x)]
        if bad:
            raise ConfigError(f"cannot read {what} {spec!r}: {bad[0]!r} is not an integer layer index")
        items = [int(x) for x in spec]
    elif isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            m = re.fullmatch(r"(-?\d+)\s*([-:])\s*(-?\d+)", part)
            if m:
                lo, sep, hi = int(m[1]), m[2], int(m[3])
                for end in (lo, hi - (sep == ":")):  # the ends first: '0-10**12' must not be expanded to be refused
                    if lo <= end and not -n_layers <= end < n_layers:
                        raise ConfigError(_out_of_range(what, end, n_layers))
                items.extend(range(lo, hi + 1 if sep == "-" else hi))
            elif re.fullmatch(r"-?\d+", part):
                items.append(int(part))
            else:
                raise ConfigError(
                    f"cannot read {what} {spec!r}: use indices and ranges like '2,5-7' or one of "
                    f"{', '.join(LAYER_WORDS)}"
                )
    else:
        raise ConfigError(f"cannot read {what} {spec!r}: expected an int, a list of ints or a string")
    out = set()
    for i in items:
        if not -n_layers <= i < n_layers:
            raise ConfigError(_out_of_range(what, i, n_layers))
        out.add(i % n_layers)
    if not out:
        raise ConfigError(f"{what} {spec!r} selects no layer")
    return sorted(out)


def _check_heads(name: str, heads: Any) -> tuple[int, ...] | None:
    if heads is None:
        return None
    if isinstance(heads, str):
        parts = [h.strip() for h in heads.split(",") if h.strip()]
        if not all(re.fullmatch(r"\d+", h) for h in parts):
            raise ConfigError(f"{name}={heads!r}: give comma-separated head indices like '0,3', or None for all heads")
        heads = [int(h) for h in parts]
    if is_int(heads):
        heads = [heads]
    if not isinstance(heads, (list, tuple)) or not all(is_int(h) for h in heads):
        raise ConfigError(f"{name}={heads!r}: give a list of integer head indices, or None for all heads")
    heads = tuple(int(h) for h in heads)
    if not heads or any(h < 0 for h in heads):
        raise ConfigError(f"{name}={heads!r}: give non-negative head indices, or None for all heads")
    return heads


@dataclass
class Settings:
    """How to decode: the method, its branches and the contrast rule (``docs/method.md``); built and checked as a
    :class:`~causalmm.config.CausalMMConfig`.

    Attributes:
        method: a registered decoding method (``causalmm.methods``): ``regular``, ``causalmm``, ``vcd``, ...
        mode: CausalMM branches: ``vision`` {F,V}, ``language`` {F,L}, ``multimodal`` {F,V,L}, ``joint`` {F,J}.
        vision_cf / language_cf: the counterfactual attention method in the vision encoder / LLM.
        vision_layers / language_layers: which layers are intervened (see :func:`resolve_layers`);
            ``None`` takes the model's default (vision: the layer that feeds the LLM; LLM: ``"middle"``).
        vision_heads / language_heads: head indices to intervene, ``None`` for all.
        gamma: contrast strength, ``z = l + gamma * sum_b (l - l_b)``, in ``[0, 100]`` (:data:`GAMMA_MAX`); 0 gives
            regular decoding. ``None``: the method's own default (:class:`~causalmm.methods.Param`), 1.0 where it
            declares none.
        epsilon: plausibility cut-off on the factual probabilities, in [0, 1]; 1 keeps only the top token
            (regular greedy). The original scripts' 0.6 often leaves a single token and so disables the contrast.
            ``None``: the method's own default, 0.1 where it declares none.
        num_cf_samples: K draws of each counterfactual branch, logits averaged (a Monte-Carlo estimate of the
            expectation over a~), 1 to :data:`MAX_CF_SAMPLES`.
        seed: base seed, a 64-bit signed integer; each sample's counterfactual draws and sampling come from
            generators seeded from it.
        legacy: reproduce the original release: the counterfactual acts on the first generated token only
            (its branch shared the factual KV cache afterwards).
        vision_style: ``attention`` (replace attention in the encoder) or ``gate`` (the original release's
            feature gate, LLaVA-style towers only).
        renormalize: counterfactual maps are valid distributions; ``False`` keeps the original raw maps.
        noise_step: VCD diffusion noise step (of 1000).
        noise_schedule: ``linear`` (DDPM betas) or ``sigmoid`` (VCD's released code).
        params: the method's own hyper-parameters (those its :class:`~causalmm.methods.Param` entries declare
            beyond the fields above), by name; every one is filled in with its default, and a name the method
            does not declare is refused with the list it does.

    A field the method does not read (:meth:`~causalmm.methods.Method.reads`: ``gamma`` for ``regular``, ``mode``
    for ``vcd``, the vision fields in ``mode="language"``) is refused unless it is at its default
    (:data:`FIELD_RANGES` lists what each field accepts).
    """

    method: str = "causalmm"
    mode: str = "multimodal"
    vision_cf: str = "random"
    language_cf: str = "random"
    vision_layers: LayerSpec = None
    language_layers: LayerSpec = None
    vision_heads: tuple[int, ...] | None = None
    language_heads: tuple[int, ...] | None = None
    gamma: float | None = None
    epsilon: float | None = None
    num_cf_samples: int = 1
    seed: int = 0
    legacy: bool = False
    vision_style: str = "attention"
    renormalize: bool = True
    noise_step: int = 500
    noise_schedule: str = "linear"
    params: dict[str, Any] = field(default_factory=dict)

    def _check_fields(self) -> None:
        """The checks that need no method: choices, types, ranges and layer-spec syntax (normalising in place)."""
        check_choice("vision_cf", self.vision_cf, COUNTERFACTUALS)
        check_choice("language_cf", self.language_cf, COUNTERFACTUALS)
        check_choice("vision_style", self.vision_style, VISION_STYLES)
        check_choice("noise_schedule", self.noise_schedule, ("linear", "sigmoid"))
        self.vision_heads = _check_heads("vision_heads", self.vision_heads)
        self.language_heads = _check_heads("language_heads", self.language_heads)
        for name in ("gamma", "epsilon"):
            value = getattr(self, name)
            if not is_real(value):
                raise ConfigError(f"{name}={shown(value)} must be a finite number")
            setattr(self, name, float(value))
        if self.gamma < 0:
            raise ConfigError(f"gamma={self.gamma} must be a finite number >= 0 (0 = no contrast)")
        if self.gamma > GAMMA_MAX:
            raise ConfigError(
                f"gamma={self.gamma} is above {_num(GAMMA_MAX)}, the largest this accepts: there the factual term "
                "weighs 1% of the score already, and further on the float32 scores overflow; give a gamma in "
                f"[0, {_num(GAMMA_MAX)}]"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"epsilon={self.epsilon} must be in [0, 1] (0 = no plausibility cut-off)")
        for name in ("num_cf_samples", "seed", "noise_step"):
            value = getattr(self, name)
            if not is_int(value):
                raise ConfigError(f"{name}={shown(value)} must be an integer")
            setattr(self, name, int(value))
        if not 1 <= self.num_cf_samples <= MAX_CF_SAMPLES:
            raise ConfigError(
                f"num_cf_samples={shown(self.num_cf_samples)} must be an integer in [1, {MAX_CF_SAMPLES}]: each draw "
                "is a row of its own in every forward, with its own KV cache"
            )
        if SEED_RANGE(self.seed):
            raise ConfigError(f"seed={shown(self.seed)} {SEED_RANGE(self.seed)}")
        if not 0 <= self.noise_step <= 999:
            raise ConfigError(f"noise_step={shown(self.noise_step)} must be an integer in [0, 999]")
        for name in ("legacy", "renormalize"):
            if not isinstance(getattr(self, name), bool):  # "no" or 0 would otherwise read as a switch
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("vision_layers", "language_layers"):
            spec = getattr(self, name)
            if spec is not None and not (isinstance(spec, str) and spec in LAYER_WORDS):
                resolve_layers(spec, ANY_DEPTH, what=name)  # type and syntax now; range once the model is known

    def param(self, name: str) -> Any:
        """The value of the method's own hyper-parameter ``name`` (given, or its default)."""
        try:
            return self.params[name]
        except KeyError:
            has = ", ".join(self.params) or "none"
            raise KeyError(f"method {self.method!r} has no parameter {name!r}; its parameters: {has}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["params"]:  # the methods without parameters of their own describe a run as before
            del d["params"]
        for k in ("vision_heads", "language_heads"):
            if d[k] is not None:
                d[k] = list(d[k])
        if isinstance(d["vision_layers"], tuple):
            d["vision_layers"] = list(d["vision_layers"])
        if isinstance(d["language_layers"], tuple):
            d["language_layers"] = list(d["language_layers"])
        return d
