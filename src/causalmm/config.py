"""``CausalMMConfig``: every knob of a decoding method, validated when built against the method registry,
serialisable to JSON.

Errors name the field, the value given and what would be accepted, so a bad command line fails before any
model is loaded. The shared settings, their ranges and the checks that need no method are in
:mod:`causalmm.settings` (re-exported here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .settings import (
    ALWAYS_READ,
    ANY_DEPTH,
    FALLBACK,
    FIELD_RANGES,
    GAMMA_MAX,
    MAX_CF_SAMPLES,
    SEED_RANGE,
    LayerSpec,
    Range,
    Settings,
    check_choice,
    is_int,
    is_real,
    resolve_layers,
    shown,
)

if TYPE_CHECKING:
    from .methods import Method

__all__ = [
    "ANY_DEPTH", "FIELD_RANGES", "GAMMA_MAX", "MAX_CF_SAMPLES", "SEED_RANGE", "CausalMMConfig", "ConfigError",
    "LayerSpec", "Range", "is_int", "is_real", "resolve_layers", "shown",
]  # fmt: skip


@dataclass
class CausalMMConfig(Settings):
    """The settings of :class:`~causalmm.settings.Settings` (every field documented there), checked when built: the
    method must be registered, ``None`` for ``gamma``/``epsilon`` takes the method's default, ``params`` are checked
    against those it declares, and a shared setting it does not read is refused unless at its default."""

    def __post_init__(self) -> None:
        from .methods import get_method, method_names
        from .methods.causalmm import MODES

        check_choice("method", self.method, method_names())
        method = get_method(self.method)
        for name, fallback in FALLBACK.items():
            if getattr(self, name) is None:
                setattr(self, name, method.default(name, fallback))
        self.params = method.check_params(self.params)
        check_choice("mode", self.mode, tuple(MODES))
        self._check_fields()
        self._refuse_unread(method)

    def _refuse_unread(self, method: Method) -> None:
        """Refuse a shared setting the method does not read (``gamma`` for ``regular``, ``mode`` for ``vcd``,
        ``vision_layers`` in ``mode='language'``), so that no run records a setting as if it had applied.

        A value equal to the field's default is taken as not given: a config written by :meth:`to_dict` names every
        field, and reading it back must give the same config (the command line, which knows what the user typed,
        refuses those too)."""
        read = method.reads(vars(self))
        for f in dataclasses.fields(self):
            if f.name in read or f.name in ALWAYS_READ:
                continue
            default = FALLBACK.get(f.name, f.default)  # gamma, epsilon: what None resolved to (not declared)
            value = getattr(self, f.name)
            if value != default:
                raise ConfigError(f"{f.name}={shown(value)} {method.unread_reason(f.name, vars(self))}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalMMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            from .methods import METHODS

            owners = [m.name for m in METHODS.values() if unknown[0] in {p.field for p in m.own_params()}]
            if owners:  # a method's own parameter at the top level: say where it goes
                raise ConfigError(
                    f"unknown config field {unknown[0]}: it is a parameter of method {', '.join(owners)}, which goes "
                    f'under "params", e.g. {{"method": "{owners[0]}", "params": {{"{unknown[0]}": ...}}}}'
                )
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def replace(self, **changes: Any) -> CausalMMConfig:
        """A validated copy with ``changes`` applied. Changing the method without giving ``params`` starts the
        new method's parameters from their defaults (the old method's would not be its own), and the shared
        settings the new method does not read from theirs (they would be refused as set for it)."""
        if "method" in changes and changes["method"] != self.method:
            from .methods import METHODS

            changes.setdefault("params", {})
            new = METHODS.get(changes["method"])
            if new is not None:
                read = new.reads({**vars(self), **changes})
                for f in dataclasses.fields(self):
                    if f.name not in read and f.name not in ALWAYS_READ and f.name not in changes:
                        changes[f.name] = None if f.name in FALLBACK else f.default
        return dataclasses.replace(self, **changes)
