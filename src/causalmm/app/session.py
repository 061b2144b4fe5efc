"""What the app does, without the page: one model loaded once, the methods' settings read from text, and the
answers, the per-token explanation and the attention figure of one image and question.

Kept apart from :mod:`.ui` so it is tested without a browser, and so every answer the page shows is the one
:meth:`causalmm.CausalMM.generate` gives for the same settings and seed (it is that call, on the image as
:func:`causalmm.images.load_image` reads the uploaded file).

Importing it loads neither torch nor gradio (the CLI checks its options first, at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from ..config import CausalMMConfig

__all__ = ["MAX_NEW_TOKENS", "AppError", "Answer", "Session", "default_settings", "parse_settings"]

#: the most tokens the page asks for (its answers are compared side by side, not read as essays)
MAX_NEW_TOKENS = 512


class AppError(ValueError):
    """Bad input in the page (no image, empty question, a bad setting) or a method that failed on its settings:
    shown as a message, never a traceback."""


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


@functools.cache
def _config_fields() -> frozenset[str]:
    """The config fields a page setting may name (the method's own parameters go to ``params``); computed when
    first asked, so that importing this module does not import torch."""
    from ..config import CausalMMConfig

    return frozenset(f.name for f in dataclasses.fields(CausalMMConfig)) - {"method", "params", "seed"}


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


def parse_settings(method: str, text: str, seed: int = 0) -> CausalMMConfig:
    """The :class:`~causalmm.config.CausalMMConfig` of ``method`` with the page's settings text (``name=value``
    per line or separated by spaces; unset names keep their defaults). Raises :class:`AppError`."""
    from ..config import CausalMMConfig, ConfigError
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
        elif name in _config_fields():
            fields[name] = _value(name, value)
        else:
            known = ", ".join(p.field for p in get_method(method).params) or "none"
            raise AppError(f"{method} has no setting {name!r}; its settings: {known}")
    try:
        return CausalMMConfig(method=method, params=params, seed=seed, **fields)
    except ConfigError as err:
        raise AppError(f"{method}: {err}") from None


def whole_number(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` (a page's number box: an int, a float, or ``None`` when left empty) as an int, or
    :class:`AppError` naming the box: a box is never silently rounded, nor replaced by a default."""
    span = f" from {low} to {high}" if low is not None and high is not None else ""
    if value is None:
        raise AppError(f"{what} is empty: give a whole number{span}")
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or int(value) != value:
        raise AppError(f"{what} {value!r} is not a whole number: give one{span}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        raise AppError(f"{what} {n} is out of range: give a whole number{span}")
    return n


def _settings_text(method: str, config: CausalMMConfig) -> str:
    """The method's settings as the answers table shows them: ``name=value`` separated by spaces."""
    from ..methods import get_method

    shown = config.to_dict() | config.params
    return " ".join(f"{p.field}={shown.get(p.field)}" for p in get_method(method).params)


#: What a method's arithmetic can raise inside generation on settings far from its defaults (a division by zero
#: or an overflow in Python floats, an error from torch, which also reports running out of memory), where a
#: bad input is refused before: the page names the method and its settings; the server log keeps the traceback
#: (a bug can raise these too).
NUMERIC_ERRORS: tuple[type[Exception], ...] = (ArithmeticError, RuntimeError)


def _failed(method: str, settings: str, err: BaseException) -> AppError:
    """The page's message for a method that failed inside generation; the traceback goes to the server log."""
    traceback.print_exception(err, file=sys.stderr)
    defaults = " ".join(default_settings(method).split())
    hint = f"; settings far from its defaults ({defaults}) can overflow or divide by zero" if defaults else ""
    where = f" with {settings}" if settings else ""
    return AppError(f"{method}{where} failed: {type(err).__name__}: {err}{hint} (the traceback is in the server's log)")


def _not_numbers(method: str, settings: str, combined: Any) -> AppError | None:
    """The message for combined scores that are no longer numbers (NaN, +inf, or every token cut), which greedy
    decoding would turn into an arbitrary token; ``None`` where every step's scores are usable."""
    import torch

    for step, z in enumerate(combined):
        if torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all():
            defaults = " ".join(default_settings(method).split())
            where = f" with {settings}" if settings else ""
            return AppError(
                f"{method}{where}: the combined scores of token {step + 1} are not numbers (NaN or infinite): a "
                f"setting overflows the float32 arithmetic; use values nearer its defaults ({defaults or 'none'})"
            )
    return None


class Session:
    """The model (loaded once) and what the page asks of it."""

    def __init__(self, model: str, *, base: str = "sdpa", **hf_kwargs: Any) -> None:
        from ..api import CausalMM

        self.model_name = model
        self.cm = CausalMM.from_pretrained(model, base=base, **hf_kwargs)

    @staticmethod
    def image(upload: Any) -> Image.Image:
        """The RGB image the model sees from an upload: the file itself (a path, or its bytes) read by
        :func:`causalmm.images.load_image`, as ``CausalMM.generate`` reads it (16-bit, EXIF rotation,
        transparency, the pixel limit). An upload's path is the server's temporary copy: the message names the
        file by its own name."""
        from ..images import load_image
        from ..inputs import InputError

        if upload is None:
            raise AppError("no image: drop one in the image box, or pick one of the examples below it")
        try:
            return load_image(upload)
        except (InputError, OSError) as err:
            text = str(err)
            if isinstance(upload, (str, os.PathLike)):
                path = os.fsdecode(os.fspath(upload))
                text = text.replace(path, Path(path).name)
            raise AppError(f"the image cannot be read: {text}") from None

    def _check(self, image: Any, question: str | None) -> Image.Image:
        pil = self.image(image)
        if not (question or "").strip():
            raise AppError("the question is empty: type a question about the image")
        return pil

    def answer(
        self,
        image: Any,
        question: str,
        methods: list[str],
        settings: dict[str, str],
        *,
        seed: Any = 0,
        max_new_tokens: Any = 32,
    ) -> list[Answer]:
        """Each ticked method's answer, with its wall time (the same as ``CausalMM.generate`` with that
        config and seed). ``seed`` and ``max_new_tokens`` are the page's number boxes, checked here."""
        from ..inputs import user_errors

        pil = self._check(image, question)
        if not methods:
            raise AppError("no method ticked: tick at least one method")
        n = whole_number(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS)
        seed = whole_number(seed, "seed")
        configs = [(m, parse_settings(m, settings.get(m, ""), seed)) for m in methods]  # all checked first
        out = []
        for method, config in configs:
            generation = {"max_new_tokens": n}
            if method == "opera":
                generation["num_beams"] = int(config.param("beams"))
            shown = _settings_text(method, config)
            start = time.perf_counter()
            try:
                result = self.cm.with_config(config).generate(pil, question, **generation)
            except user_errors() as err:
                raise AppError(f"{method}: {err}") from None
            except NUMERIC_ERRORS as err:
                raise _failed(method, shown, err) from None
            out.append(Answer(method, result.text, time.perf_counter() - start, shown))
        return out

    def explain(
        self, image: Any, question: str, method: str, settings: str, *, seed: Any = 0, max_new_tokens: Any = 16
    ) -> tuple[list[str], list[list[str]], Path]:
        """The per-token table of ``causalmm explain`` for ``method`` and the attention figure of ``causalmm
        visualize`` (a PNG in a temporary folder). Scores that stopped being numbers are a message, not a
        table of NaN."""
        from ..explain import explain as run_explain
        from ..inputs import user_errors
        from ..visualize import visualize as draw

        pil = self._check(image, question)
        n = whole_number(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS)
        seed = whole_number(seed, "seed")
        config = parse_settings(method, settings, seed)
        shown = _settings_text(method, config)
        try:
            cm = self.cm.with_config(config)  # a setting this model cannot take is refused here
            ex = run_explain(cm, pil, question, max_new_tokens=n, seed=seed)
            folder = Path(tempfile.mkdtemp(prefix="causalmm-app-"))
            figure = draw(cm, pil, question, seed=seed, out=folder / "attention.png")
        except user_errors() as err:
            raise AppError(f"{method}: {err}") from None
        except NUMERIC_ERRORS as err:
            raise _failed(method, shown, err) from None
        broken = _not_numbers(method, shown, ex.branch_logits.get("combined", ()))
        if broken is not None:
            raise broken
        head, rows = ex.rows()
        return head, rows, figure
