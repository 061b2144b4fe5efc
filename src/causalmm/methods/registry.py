"""The one registry of decoding methods: it owns their names (config validates against it, the CLI lists it)."""

from __future__ import annotations

from .base import METHODS, Method

__all__ = ["METHODS", "get_method", "method_names", "register"]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to :data:`METHODS` under its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"a decoding method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names: ``regular`` (the reference) first, then in registration order."""
    return tuple(sorted(METHODS, key=lambda name: name != "regular"))


def get_method(name: str) -> Method:
    """The method called ``name``; ``KeyError`` lists the registered ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown decoding method {name!r}; registered: {', '.join(method_names())}") from None
