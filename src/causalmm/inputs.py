"""The user's inputs, checked before any work is done: prompts, the images that pair with them, seeds, generation
options and output files; :class:`InputError`, the one error type for all of them (images are read by
:mod:`causalmm.images`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import USER_ERRORS, ConfigError, InputError
from .settings import SEED_RANGE, is_int, is_real, shown

__all__ = [
    "InputError",
    "check_output_file",
    "checked_options",
    "image_list",
    "prompt_list",
    "seed_list",
    "user_errors",
    "write_failed",
]


def user_errors() -> tuple[type[Exception], ...]:
    """The errors whose message is for the user (bad input, a bad setting, a model the engine cannot run): the CLI
    and the app show them as one line, where any other exception is a bug."""
    return USER_ERRORS


def prompt_list(prompts: Any) -> list[str]:
    """``prompts`` (a string or a list of strings) as a list of non-empty strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a string or a list of strings; got a {type(prompts).__name__}")
    if not prompts:
        raise InputError("no prompts given; give a question or instruction about the image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise InputError(f"prompt {i} is empty; give a question or instruction about the image")
    return list(prompts)


#: Types that are one image (not a list of images).
_ONE_IMAGE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)


def image_list(images: Any, n_prompts: int, single: bool) -> list[Any]:
    """One image per prompt: a single image (or a list of one) serves every prompt."""
    if images is None or isinstance(images, _ONE_IMAGE):
        out = [images]
    elif isinstance(images, (list, tuple)):
        out = list(images)
    else:
        raise InputError(f"images must be one image or a list of images; got a {type(images).__name__}")
    if not out:
        raise InputError("no images given; give one image per prompt, or one image for all prompts")
    if len(out) == 1:
        return out * n_prompts
    if len(out) != n_prompts:
        what = "one prompt" if single else f"{n_prompts} prompts"
        raise InputError(f"{len(out)} images for {what}; give one image per prompt, or one image for all prompts")
    return out


def seed_list(name: str, seeds: Any, n: int) -> list[int] | None:
    """``seeds`` checked: ``None``, or a list of ``n`` 64-bit integers (bools, floats and strings are refused)."""
    if seeds is None:
        return None
    if isinstance(seeds, np.ndarray):
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple, range)):
        hint = f" (for one prompt: {name}=[{seeds!r}])" if is_int(seeds) else ""
        raise InputError(f"{name} must be a list of integers, one per prompt; got {seeds!r}{hint}")
    for s in seeds:
        if not is_int(s):
            raise InputError(f"{name} must hold integers; {s!r} is a {type(s).__name__}")
        if SEED_RANGE(s):
            raise InputError(f"{name} holds {shown(s)}, which {SEED_RANGE(s)}")
    if len(seeds) != n:
        raise InputError(f"{name} has {len(seeds)} values for {n} prompts; give one per prompt")
    return [int(s) for s in seeds]


def checked_options(kwargs: dict[str, Any], known: Sequence[str]) -> dict[str, Any]:
    """Generation options with the right types (a bool or a string is no number; numpy scalars become Python
    ones), so that no option is silently misread. ``known``: the option names; any other is an
    :class:`InputError`, a value of the wrong type a :class:`~causalmm.config.ConfigError`."""
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise InputError(f"unknown generation option: {', '.join(unknown)}; known: " + ", ".join(known))
    out = dict(kwargs)
    for name, value in kwargs.items():
        if value is None and name in ("top_k", "top_p"):
            continue
        if name in ("max_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size"):
            if not is_int(value):
                raise ConfigError(f"{name}={shown(value)} must be an integer")
            out[name] = int(value)
        elif name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not is_real(value):
                raise ConfigError(f"{name}={shown(value)} must be a finite number")
            out[name] = float(value)
        elif name == "early_stopping":
            if not (isinstance(value, (bool, np.bool_)) or value == "never"):
                raise ConfigError(f"early_stopping={value!r} must be True, False or 'never'")
            out[name] = value if value == "never" else bool(value)
        elif name == "do_sample" and not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"do_sample={value!r} must be True or False")
        elif name == "stop_strings" and not (
            isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        ):
            raise ConfigError(f"stop_strings={value!r} must be a string or a list of strings")
    if "do_sample" in out:
        out["do_sample"] = bool(out["do_sample"])
    return out


def check_output_file(path: str | os.PathLike, what: str = "output", example: str = "output.txt") -> Path:
    """``path`` as a :class:`Path` if a file can be written there; an :class:`InputError` naming the problem
    otherwise (a directory, a parent that is a file, no permission), checked before any work is done.
    ``example`` is the file name suggested inside a directory given by mistake."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{what} {out} is a directory; give a file path inside it, e.g. {out / example}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"cannot write {what} {out}: {parent} is a file, not a directory")
    blocked = out if out.exists() else parent
    if not os.access(blocked, os.W_OK):
        raise InputError(f"cannot write {what} {out}: permission denied on {blocked}")
    return out


def write_failed(err: OSError, path: str | os.PathLike, what: str = "output") -> InputError:
    """The one-line error for a write of ``path`` that failed at the OS (disk full, read-only, permissions)."""
    return InputError(f"cannot write {what} {path}: {err.strerror or err}")
