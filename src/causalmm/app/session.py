"""What the app does, without the page: one model loaded once, the methods' settings read from text, and the
answers, the per-token explanation and the attention figure of one image and question.

Kept apart from :mod:`.ui` so it is tested without a browser, and so every answer the page shows is the one
:meth:`causalmm.CausalMM.generate` gives for the same settings and seed (it is that call).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import CausalMMConfig

__all__ = ["AppError", "Answer", "Session", "default_settings", "parse_settings"]


class AppError(ValueError):
    """Bad input in the page (no image, empty question, a bad setting): shown as a message, never a traceback."""


@dataclasses.dataclass
class Answer:
    method: str
    text: str
    seconds: float
    settings: str


def default_settings(method: str) -> str:
    """A method's settings as the page shows them to edit: ``name=value`` per line, its defaults."""
    from ..methods import get_method

    return "\n".join(f"{p.field}={'none' if p.default is None else p.default}" for p in get_method(method).params)


#: the config fields a page setting may name (the method's own parameters go to ``params``)
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(CausalMMConfig)} - {"method", "params", "seed"}


def _value(name: str, text: str) -> Any:
    """A config field's value from its text (the method's own parameters type themselves)."""
    low = text.strip().lower()
    if low in ("none", ""):
        return None
    if name in ("gamma", "epsilon"):
        try:
            return float(text)
        except ValueError:
            raise AppError(f"{name}={text!r} must be a number") from None
    if name in ("num_cf_samples", "noise_step"):
        try:
            return int(text)
        except ValueError:
            raise AppError(f"{name}={text!r} must be an integer") from None
    if name in ("legacy", "renormalize"):
        if low not in ("true", "false"):
            raise AppError(f"{name}={text!r} must be true or false")
        return low == "true"
    return text.strip()


def parse_settings(method: str, text: str, seed: int = 0):
    """The :class:`~causalmm.config.CausalMMConfig` of ``method`` with the page's settings text (``name=value``
    per line or separated by spaces; unset names keep their defaults). Raises :class:`AppError`."""
    from ..config import ConfigError
    from ..methods import get_method, method_names

    if method not in method_names():
        raise AppError(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    own = {p.field for p in get_method(method).own_params()}
    fields: dict[str, Any] = {}
    params: dict[str, str] = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise AppError(f"{method} setting {item!r}: write NAME=VALUE, e.g. gamma=1.0")
        if name in own:
            params[name] = value
        elif name in _CONFIG_FIELDS:
            fields[name] = _value(name, value)
        else:
            known = ", ".join(p.field for p in get_method(method).params) or "none"
            raise AppError(f"{method} has no setting {name!r}; its settings: {known}")
    try:
        return CausalMMConfig(method=method, params=params, seed=seed, **fields)
    except ConfigError as err:
        raise AppError(f"{method}: {err}") from None


class Session:
    """The model (loaded once) and what the page asks of it."""

    def __init__(self, model: str, *, base: str = "sdpa", **hf_kwargs: Any) -> None:
        from ..api import CausalMM

        self.model_name = model
        self.cm = CausalMM.from_pretrained(model, base=base, **hf_kwargs)

    @staticmethod
    def _check(image: Any, question: str | None) -> Any:
        from ..images import load_image
        from ..inputs import InputError

        if image is None:
            raise AppError("no image: drop one in the image box, or pick one of the examples below it")
        if not (question or "").strip():
            raise AppError("the question is empty: type a question about the image")
        try:
            return load_image(image)
        except (InputError, OSError) as err:
            raise AppError(f"the image cannot be read: {err}") from None

    def answer(
        self,
        image: Any,
        question: str,
        methods: list[str],
        settings: dict[str, str],
        *,
        seed: int = 0,
        max_new_tokens: int = 32,
    ) -> list[Answer]:
        """Each ticked method's answer, with its wall time (the same as ``CausalMM.generate`` with that
        config and seed)."""
        from ..inputs import user_errors
        from ..methods import get_method

        pil = self._check(image, question)
        if not methods:
            raise AppError("no method ticked: tick at least one method")
        if not 1 <= int(max_new_tokens) <= 512:
            raise AppError(f"max new tokens {max_new_tokens} must be between 1 and 512")
        configs = [(m, parse_settings(m, settings.get(m, ""), seed)) for m in methods]  # all checked first
        out = []
        for method, config in configs:
            generation = {"max_new_tokens": int(max_new_tokens)}
            if method == "opera":
                generation["num_beams"] = int(config.param("beams"))
            start = time.perf_counter()
            try:
                result = self.cm.with_config(config).generate(pil, question, **generation)
            except user_errors() as err:
                raise AppError(f"{method}: {err}") from None
            shown = config.to_dict() | config.params
            text = " ".join(f"{p.field}={shown.get(p.field)}" for p in get_method(method).params)
            out.append(Answer(method, result.text, time.perf_counter() - start, text))
        return out

    def explain(
        self, image: Any, question: str, method: str, settings: str, *, seed: int = 0, max_new_tokens: int = 16
    ) -> tuple[list[str], list[list[str]], Path]:
        """The per-token table of ``causalmm explain`` for ``method`` and the attention figure of ``causalmm
        visualize`` (a PNG in a temporary folder)."""
        from ..explain import explain as run_explain
        from ..inputs import user_errors
        from ..visualize import visualize as draw

        pil = self._check(image, question)
        config = parse_settings(method, settings, seed)
        try:
            cm = self.cm.with_config(config)  # a setting this model cannot take is refused here
            ex = run_explain(cm, pil, question, max_new_tokens=int(max_new_tokens), seed=seed)
            folder = Path(tempfile.mkdtemp(prefix="causalmm-app-"))
            figure = draw(cm, pil, question, seed=seed, out=folder / "attention.png")
        except user_errors() as err:
            raise AppError(f"{method}: {err}") from None
        head, rows = ex.rows()
        return head, rows, figure
