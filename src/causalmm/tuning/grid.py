"""What a tune tries: the rows of a comparison and each row's grid of settings, read from the method registry.

A *setting* is a dict of :class:`~causalmm.config.CausalMMConfig` keywords (a method's own parameters under
``params``), plus ``num_beams`` for a row that decodes by beam search. A *row* is a name in the tables and the
settings it fixes (``causalmm/language`` fixes ``mode="language"``). Its grid is the product of the values each
tunable parameter declares (:attr:`causalmm.methods.Param.grid`, the official default always added), with
*overrides* replacing an axis as given: the user's ``--grid`` and a world's model-sized values (a 4-layer model's
layer choices). Every row gets the same *budget*: when its grid is larger, the official setting and a seeded
sample of the rest.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..methods import METHODS, get_method
from ..methods.base import Method, Param
from ..settings import Settings

__all__ = ["Row", "grid", "parse_overrides", "parse_rows", "registry_rows", "setting_config"]

#: the generation options a row may fix beside its config (beam rows)
GENERATION_KEYS = ("num_beams",)


@dataclass(frozen=True)
class Row:
    """A row of a comparison: its name and the settings it fixes (never swept)."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return get_method(self.settings["method"])


def registry_rows() -> list[Row]:
    """Every row the registry offers: each method, or each of its variants (``causalmm/vision`` ...)."""
    out = []
    for method in METHODS.values():
        if method.variants:
            out += [Row(f"{method.name}/{v}", {"method": method.name, **fixed}) for v, fixed in method.variants.items()]
        else:
            out.append(Row(method.name, {"method": method.name}))
    return out


def parse_rows(text: str | Sequence[str]) -> list[Row]:
    """The rows ``--methods`` names (``all``, or names such as ``vcd,causalmm/language``), regular decoding first
    (the reference every rule measures against); an unknown name is refused with the names there are."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    known = {r.name: r for r in registry_rows()}
    if not names:
        raise ConfigError("--methods names no method; give names such as vcd,causalmm/language, or all")
    if names == ["all"]:
        return list(known.values())
    aliases = {m.name: f"{m.name}/{next(iter(m.variants))}" for m in METHODS.values() if m.variants}
    rows, seen = [], set()
    for name in ["regular", *names]:
        name = aliases.get(name, name) if name not in known else name
        if name not in known:
            raise ConfigError(f"--methods: unknown method {name!r}; choose from all, {', '.join(known)}")
        if name not in seen:
            seen.add(name)
            rows.append(known[name])
    return rows


def _param(method: Method, name: str) -> Param | None:
    return next((p for p in method.params if p.field == name), None)


def _shared(name: str) -> bool:
    return name in Settings.__dataclass_fields__


def _get(settings: Mapping[str, Any], name: str) -> Any:
    return settings.get(name) if _shared(name) or name in GENERATION_KEYS else settings.get("params", {}).get(name)


def _has(settings: Mapping[str, Any], name: str) -> bool:
    return name in settings if _shared(name) or name in GENERATION_KEYS else name in settings.get("params", {})


def _with(settings: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if k == "params" else v) for k, v in settings.items()}
    for name, value in values.items():
        if _shared(name) or name in GENERATION_KEYS:
            out[name] = value
        else:
            out.setdefault("params", {})[name] = value
    return out


def axes(row: Row, overrides: Mapping[str, Sequence[Any]] | None = None) -> dict[str, tuple[Any, ...]]:
    """Parameter name -> the values the row sweeps: each tunable parameter's grid with its official default added
    (those the row fixes excepted), then ``overrides`` replacing or adding axes as given."""
    method, overrides = row.method, dict(overrides or {})
    out: dict[str, tuple[Any, ...]] = {}
    for p in method.tunable(row.settings):
        if p.field in overrides or _has(row.settings, p.field):
            continue
        out[p.field] = p.grid if p.default in p.grid else (p.default, *p.grid)
    for name, values in overrides.items():
        if _param(method, name) is None and name not in GENERATION_KEYS:
            has = ", ".join(p.field for p in method.params) or "none"
            raise ConfigError(
                f"--grid {row.name}.{name}: method {method.name!r} has no parameter {name!r} (its: {has})"
            )
        out[name] = tuple(values)
    return out


def grid(
    row: Row,
    overrides: Mapping[str, Sequence[Any]] | None = None,
    *,
    budget: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The settings a tune runs for ``row``: the product of its :func:`axes`, the official setting first; with a
    ``budget`` smaller than that, the official setting and ``budget - 1`` others drawn by ``seed`` (and the row's
    name, so rows draw independently), kept in grid order. Each is checked as a config now, not hours in."""
    if budget is not None and budget < 1:
        raise ConfigError(f"--budget {budget}: give at least 1 (the official setting)")
    ax = axes(row, overrides)
    method = row.method
    settings = [_with(row.settings, dict(zip(ax, values, strict=True))) for values in itertools.product(*ax.values())]
    official = _with(row.settings, {n: _official(method, n, v) for n, v in ax.items()})
    first = settings.index(official) if official in settings else 0
    settings.insert(0, settings.pop(first))
    if budget is not None and len(settings) > budget:
        rng = random.Random(seed * 1_000_003 + zlib.crc32(row.name.encode()))
        keep = sorted(rng.sample(range(1, len(settings)), budget - 1))
        settings = [settings[0], *(settings[i] for i in keep)]
    for s in settings:
        setting_config(s)
    return settings


def _official(method: Method, name: str, values: tuple[Any, ...]) -> Any:
    """The axis's official value: the method's default where the axis holds it, else its first value."""
    p = _param(method, name)
    return p.default if p is not None and p.default in values else values[0]


def setting_config(settings: Mapping[str, Any], seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A setting's checked :class:`~causalmm.config.CausalMMConfig` and its generation options (``num_beams``)."""
    from ..config import CausalMMConfig

    config = {k: v for k, v in settings.items() if k not in GENERATION_KEYS}
    generation = {k: settings[k] for k in GENERATION_KEYS if k in settings}
    return CausalMMConfig(**config, seed=seed), generation


def parse_overrides(items: Sequence[str], rows: Sequence[Row]) -> dict[str, dict[str, tuple[Any, ...]]]:
    """``--grid ROW.PARAM=V1,V2`` (``ROW``: a row such as ``causalmm/language``, or a method, for all its rows) as
    row name -> parameter -> values, each value read as the parameter's type (``none`` for a layer spec's
    default). One value fixes the parameter; the official default is added only where the user lists it."""
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        where, dot, name = key.rpartition(".")
        if not sep or not dot or not where or not name or not text.strip():
            raise ConfigError(
                f"--grid {item!r}: write ROW.PARAM=V1,V2 (e.g. causalmm/language.gamma=1,2 or vti.vectors=F)"
            )
        targets = [r for r in rows if r.name == where or r.settings["method"] == where]
        if not targets:
            raise ConfigError(
                f"--grid {item!r}: {where!r} is none of the rows tuned ({', '.join(r.name for r in rows)})"
            )
        for row in targets:
            p = _param(row.method, name)
            values = []
            for raw in (v.strip() for v in text.split(",")):
                if name in GENERATION_KEYS:
                    values.append(int(raw))
                elif p is None:
                    axes(row, {name: ()})  # names the parameters it has
                elif raw.lower() == "none" and p.default is None:
                    values.append(None)
                elif p.default is None or _shared(name):
                    values.append(_coerce_shared(name, raw))
                else:
                    values.append(p.coerce(raw))
            out.setdefault(row.name, {})[name] = tuple(values)
    return out


def _coerce_shared(name: str, raw: str) -> Any:
    """A shared field's value from text, typed as its :class:`Settings` default (layer specs stay text)."""
    default = Settings.__dataclass_fields__[name].default if _shared(name) else None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"--grid {name}={raw!r}: give true or false")
        return raw.lower() == "true"
    if isinstance(default, int) or name in ("gamma", "epsilon"):
        try:
            return float(raw) if name in ("gamma", "epsilon") else int(raw)
        except ValueError:
            raise ConfigError(f"--grid {name}={raw!r}: give a number") from None
    return raw
