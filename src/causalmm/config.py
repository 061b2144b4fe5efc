"""``CausalMMConfig``: every knob of a decoding method, validated when built, serialisable to JSON.

Errors name the field, the value given and what would be accepted, so a bad command line fails before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .interventions import COUNTERFACTUALS

__all__ = ["CausalMMConfig", "ConfigError", "LayerSpec", "is_int", "is_real", "resolve_layers"]

VISION_STYLES: tuple[str, ...] = ("attention", "gate")
LAYER_WORDS: tuple[str, ...] = ("all", "shallow", "middle", "deep")

LayerSpec = str | int | list[int] | tuple[int, ...] | None


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and how to fix it."""


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool: ``True`` is an int to Python but never a count or a seed."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool and not a string."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and type(value).__name__ != "bool_"
        and math.isfinite(value)
    )


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(options)}")


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
            raise ConfigError(f"{what} index {i} is out of range: the module has {n_layers} layers (0..{n_layers - 1})")
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
class CausalMMConfig:
    """How to decode: the method, its branches and the contrast rule (``docs/method.md``).

    Attributes:
        method: a registered decoding method (``causalmm.methods``): ``regular``, ``causalmm``, ``vcd``, ...
        mode: CausalMM branches: ``vision`` {F,V}, ``language`` {F,L}, ``multimodal`` {F,V,L}, ``joint`` {F,J}.
        vision_cf / language_cf: the counterfactual attention method in the vision encoder / LLM.
        vision_layers / language_layers: which layers are intervened (see :func:`resolve_layers`);
            ``None`` takes the model's default (vision: the layer that feeds the LLM; LLM: ``"middle"``).
        vision_heads / language_heads: head indices to intervene, ``None`` for all.
        gamma: contrast strength, ``z = l + gamma * sum_b (l - l_b)``; 0 gives regular decoding. ``None``: the
            method's own default (:class:`~causalmm.methods.Param`), 1.0 where it declares none.
        epsilon: plausibility cut-off on the factual probabilities, in [0, 1]; 1 keeps only the top token
            (regular greedy). The original scripts' 0.6 often leaves a single token and so disables the contrast.
            ``None``: the method's own default, 0.1 where it declares none.
        num_cf_samples: K draws of each counterfactual branch, logits averaged (a Monte-Carlo estimate of the
            expectation over a~).
        seed: base seed; each sample's counterfactual draws and sampling come from generators seeded from it.
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

    def __post_init__(self) -> None:
        from .methods import get_method, method_names
        from .methods.causalmm import MODES

        _choice("method", self.method, method_names())
        method = get_method(self.method)
        for name, fallback in (("gamma", 1.0), ("epsilon", 0.1)):
            if getattr(self, name) is None:
                setattr(self, name, method.default(name, fallback))
        self.params = method.check_params(self.params)
        _choice("mode", self.mode, tuple(MODES))
        _choice("vision_cf", self.vision_cf, COUNTERFACTUALS)
        _choice("language_cf", self.language_cf, COUNTERFACTUALS)
        _choice("vision_style", self.vision_style, VISION_STYLES)
        _choice("noise_schedule", self.noise_schedule, ("linear", "sigmoid"))
        self.vision_heads = _check_heads("vision_heads", self.vision_heads)
        self.language_heads = _check_heads("language_heads", self.language_heads)
        for name in ("gamma", "epsilon"):
            value = getattr(self, name)
            if not is_real(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
            setattr(self, name, float(value))
        if self.gamma < 0:
            raise ConfigError(f"gamma={self.gamma} must be a finite number >= 0 (0 = no contrast)")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"epsilon={self.epsilon} must be in [0, 1] (0 = no plausibility cut-off)")
        for name in ("num_cf_samples", "seed", "noise_step"):
            value = getattr(self, name)
            if not is_int(value):
                raise ConfigError(f"{name}={value!r} must be an integer")
            setattr(self, name, int(value))
        if self.num_cf_samples < 1:
            raise ConfigError(f"num_cf_samples={self.num_cf_samples!r} must be an integer >= 1")
        if not 0 <= self.noise_step <= 999:
            raise ConfigError(f"noise_step={self.noise_step!r} must be an integer in [0, 999]")
        for name in ("legacy", "renormalize"):
            if not isinstance(getattr(self, name), bool):  # "no" or 0 would otherwise read as a switch
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("vision_layers", "language_layers"):
            spec = getattr(self, name)
            if spec is not None and not (isinstance(spec, str) and spec in LAYER_WORDS):
                resolve_layers(spec, 10**6, what=name)  # type and syntax now; range once the model is known

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalMMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def replace(self, **changes: Any) -> CausalMMConfig:
        """A validated copy with ``changes`` applied. Changing the method without giving ``params`` starts the
        new method's parameters from their defaults (the old method's would not be its own)."""
        if "method" in changes and changes["method"] != self.method and "params" not in changes:
            changes["params"] = {}
        return dataclasses.replace(self, **changes)
