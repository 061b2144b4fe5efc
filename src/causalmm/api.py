"""The public entry point: ``CausalMM(model, processor, config).generate(images, prompts)``."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .adapters import Adapter, check_base, get_adapter
from .config import CausalMMConfig, ConfigError, is_int, is_real
from .decoding import Engine, GenerationOptions, GenerationResult, Switches

__all__ = [
    "CausalMM",
    "ImageInput",
    "InputError",
    "Switches",
    "WHITE",
    "check_output_file",
    "load_image",
    "to_rgb",
]


class InputError(ValueError):
    """Bad user input (image, prompt, model path); the message says what and how to fix it."""


# -- images ----------------------------------------------------------------------------------------------
#: What :func:`load_image` accepts as one image.
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
#: Colour that transparent pixels are composited onto: white, as image viewers and web pages show them.
WHITE: tuple[int, int, int] = (255, 255, 255)
#: Environment variable that sets PIL's pixel limit (``0``: no limit) for every command and API call.
PIXEL_LIMIT_ENV = "CAUSALMM_MAX_IMAGE_PIXELS"
_ACCEPTED = "a file path, a PIL image, encoded image bytes, an HxWxC numpy array or a CxHxW torch tensor"
_OPAQUE_MODES = ("1", "L", "RGB", "RGBX", "YCbCr", "HSV", "LAB", "CMYK")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(image: ImageInput, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The RGB image the model will see, from any accepted input; one clear :class:`InputError` otherwise.

    Accepted: a path; encoded image bytes (the file's content); a PIL image of any mode (see :func:`to_rgb`);
    a numpy array ``HxW`` or ``HxWxC`` (channels last, as PIL and most libraries lay them out) or a torch tensor
    ``CxHxW`` (channels first, the torch convention), with ``C`` 1, 3 (RGB) or 4 (RGBA). Arrays of uint8 are
    taken as they are, uint16 as 16-bit, bool as black/white, floats in [0, 1] are scaled by 255 (other value
    ranges: see :func:`to_rgb` for mode ``F``). A file over PIL's pixel limit (a guard against decompression
    bombs) is refused; :data:`PIXEL_LIMIT_ENV` or ``PIL.Image.MAX_IMAGE_PIXELS`` raises the limit.
    """
    _check_background(background)
    if image is None:
        raise InputError(f"the image is None; give {_ACCEPTED}")
    if isinstance(image, Image.Image):
        return to_rgb(image, background=background)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _open(io.BytesIO(data), f"image bytes ({len(data)} bytes)", background)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        return _from_array((tensor.float() if tensor.is_floating_point() else tensor).numpy(), True, background)
    if isinstance(image, np.ndarray):
        return _from_array(image, False, background)
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"cannot use a {type(image).__name__} as an image; give {_ACCEPTED}")
    text = os.fsdecode(os.fspath(image))
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise InputError(f"image {text} is a URL, which is not fetched; download it and give the file's path")
    path = Path(text)
    if path.is_dir():
        raise InputError(f"image {path} is a directory; give the path of an image file")
    if not path.is_file():
        raise InputError(f"image not found: {path} (give the path of an existing image file)")
    return _open(path, f"image {path}", background)


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """A new RGB image holding what ``image`` shows, for every PIL mode (``im.convert("RGB")`` is not: it clips
    16-bit and 32-bit images to white and drops transparency to whatever colour the transparent pixels hold).

    - EXIF orientation is applied (a phone photo stands as it was taken).
    - ``1``, ``L``, ``RGBX``, ``YCbCr``, ``HSV``, ``LAB``, ``CMYK``: PIL's conversion (``CMYK`` naively, without
      an embedded ICC profile).
    - ``I;16*``: scaled by the bit depth (16, or a TIFF's ``BitsPerSample``): 65535 is 255, mid-grey stays 128.
    - ``I`` (32-bit integers): by the bit depth where the file states it (16-bit PNG, PPM; a TIFF's
      ``BitsPerSample`` up to 16), otherwise by the values: within [0, 255] as 8-bit, within [0, 65535] as
      16-bit, else stretched from their minimum to their maximum.
    - ``F`` (floats): within [0, 1] scaled by 255, within [0, 255] as they are, else stretched from minimum to
      maximum; NaN or infinite values are refused.
    - ``P`` with a transparent colour, ``PA``, ``LA``, ``La``, ``RGBA``, ``RGBa``: composited onto
      ``background`` (white by default), as a viewer shows them; fully opaque images are unchanged.
    - any other mode is refused by name.
    """
    _check_background(background)
    if image.width == 0 or image.height == 0:
        raise InputError(f"the image has no pixels ({image.width}x{image.height}); give a non-empty image")
    im = _upright(image)
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im is image else im
    if mode in _OPAQUE_MODES or (mode == "P" and "transparency" not in im.info):
        return im.convert("RGB")
    if mode in _ALPHA_MODES or mode == "P":
        return _composite(im.convert("LA") if mode == "La" else im, background)
    if mode in _SIXTEEN_BIT_MODES:
        return _gray(np.asarray(im), _declared_bits(im) or 16)
    if mode == "I":
        return _gray(np.asarray(im), _declared_bits(im))
    if mode == "F":
        return _gray(np.asarray(im), None)
    raise InputError(f"images of PIL mode {mode!r} are not supported; convert the image to RGB first")


def _check_background(background: Any) -> None:
    ok = isinstance(background, tuple) and len(background) == 3
    if not ok or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in background):
        raise InputError(f"background={background!r} must be an RGB tuple of three ints in [0, 255]")


def _pixel_limit() -> int | None:
    """PIL's pixel limit, after applying :data:`PIXEL_LIMIT_ENV` where it is set."""
    value = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"{PIXEL_LIMIT_ENV}={value!r} must be an integer (0: no limit)") from None
        Image.MAX_IMAGE_PIXELS = n if n > 0 else None
    return Image.MAX_IMAGE_PIXELS


def _too_large(name: str, pixels: str, limit: int | None) -> InputError:
    return InputError(
        f"{name} has {pixels} pixels, more than the limit of {limit} (PIL's guard against decompression bombs); "
        f"if you trust the file, raise it: {PIXEL_LIMIT_ENV}=0 (no limit) or a larger number in the environment, "
        "or PIL.Image.MAX_IMAGE_PIXELS = None in Python"
    )


def _open(source: Path | io.BytesIO, name: str, background: tuple[int, int, int]) -> Image.Image:
    """Open, check against the pixel limit, decode and convert one image file."""
    limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice it; we refuse the image there too (below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if limit is not None and w * h > limit:
                    raise _too_large(name, f"{w}x{h} = {w * h}", limit)
                return to_rgb(im, background=background)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        count = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(name, count[1] if count else "too many", limit) from err
    except PermissionError as err:
        raise InputError(f"cannot read {name}: permission denied") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        # SyntaxError and ValueError: what some PIL plugins raise on a malformed file
        what = "not an image file PIL can open" if isinstance(err, UnidentifiedImageError) else "a damaged image"
        raise InputError(f"cannot read {name}: {what} ({err})") from err


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says (``im`` itself where there is nothing to turn)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, TypeError, SyntaxError):  # unreadable EXIF: take the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if orientation not in (None, 1) else im


def _composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # fully opaque
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def _declared_bits(im: Image.Image) -> int | None:
    """The bit depth an integer image's file declares (None: not stated, or more than 16 bits)."""
    if im.format in ("PNG", "PPM"):  # PIL reads their deep samples as 16-bit values
        return 16
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    signed = tags is not None and tags.get(339) in (2, (2,))  # SampleFormat: signed integers
    return int(bits) if isinstance(bits, int) and 0 < bits <= 16 and not signed else None


def _to_uint8(arr: np.ndarray, bits: int | None) -> np.ndarray:
    """Samples scaled to 0..255: by ``bits`` where known, otherwise by their value range (see :func:`to_rgb`)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if bits is None and arr.dtype == np.uint16:
        bits = 16
    x = arr.astype(np.float64)
    if bits is not None:
        x = x * (255.0 / (2**bits - 1))
    else:
        if not np.isfinite(x).all():
            raise InputError("the image holds NaN or infinite values; give finite pixel values")
        lo, hi = float(x.min()), float(x.max())
        floating = np.issubdtype(arr.dtype, np.floating)
        if lo >= 0 and hi <= 1 and floating:
            x = x * 255.0
        elif lo >= 0 and hi <= 65535 and not floating and hi > 255:
            x = x * (255.0 / 65535)
        elif lo < 0 or hi > 255:
            x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gray(arr: np.ndarray, bits: int | None) -> Image.Image:
    return Image.fromarray(_to_uint8(arr, bits)).convert("RGB")


def _from_array(arr: np.ndarray, channels_first: bool, background: tuple[int, int, int]) -> Image.Image:
    """An image from an array: ``HxW``, or ``HxWxC`` / ``CxHxW`` with ``C`` in 1, 3, 4 (``channels_first``:
    the layout to prefer where both would fit)."""
    shape = tuple(arr.shape)
    layout = "give HxW or HxWxC (numpy) / CxHxW (torch), with C = 1, 3 or 4 channels"
    if arr.ndim == 4:
        raise InputError(f"an array of shape {shape} holds a batch of images; pass a list of images instead")
    if arr.ndim not in (2, 3) or 0 in shape:
        raise InputError(f"an array of shape {shape} is not an image; {layout}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"an image array of dtype {arr.dtype} is not supported; give integers, floats or bools")
    if arr.ndim == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if not (first or last):
            raise InputError(f"an array of shape {shape} is not an image; {layout}")
        if first and (channels_first or not last):
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    pixels = np.ascontiguousarray(_to_uint8(arr, None))
    return to_rgb(Image.fromarray(pixels), background=background)  # L, RGB or RGBA by shape


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


def _load_pretrained(name_or_path: str, **hf_kwargs: Any):
    """The model and processor, by :func:`causalmm.loading.load_pretrained` (imported here: it imports this
    module's :class:`InputError`)."""
    from .loading import load_pretrained

    return load_pretrained(name_or_path, **hf_kwargs)


class CausalMM:
    """A vision-language model wrapped for counterfactual-attention decoding.

    Example:
        >>> cfg = CausalMMConfig(mode="multimodal")  # doctest: +SKIP
        >>> cm = CausalMM.from_pretrained("llava-hf/llava-1.5-7b-hf", cfg)  # doctest: +SKIP
        >>> cm.generate("cat.jpg", "Is there a dog in the image?").text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        config: CausalMMConfig | None = None,
        *,
        base: str = "sdpa",
        switches: Switches | None = None,
        **switch_changes: bool,
    ) -> None:
        """``switches`` (or single ones by name, e.g. ``reuse_prefix=False``): the engine's optimisations, see
        :class:`~causalmm.decoding.Switches`."""
        self.config = config or CausalMMConfig()
        self.switches = (switches or Switches()).replace(**switch_changes)
        model.eval()
        self.adapter: Adapter = get_adapter(model, processor, base=base)
        self.engine = Engine(self.adapter, self.config, self.switches)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: CausalMMConfig | None = None,
        *,
        base: str = "sdpa",
        switches: Switches | None = None,
        **hf_kwargs: Any,
    ) -> CausalMM:
        """Load a model and its processor (local directory or hub id) and wrap them. Keyword arguments named
        after a :class:`~causalmm.decoding.Switches` field set that switch; the rest go to ``from_pretrained``.
        ``base`` is checked first, so a typo fails before a model is loaded."""
        check_base(base)
        names = set(Switches.__dataclass_fields__)
        changes = {k: hf_kwargs.pop(k) for k in list(hf_kwargs) if k in names}
        model, processor = _load_pretrained(str(name_or_path), **hf_kwargs)
        return cls(model, processor, config, base=base, switches=switches, **changes)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def with_config(self, config: CausalMMConfig, **switch_changes: bool | None) -> CausalMM:
        """The same model under another config (no reload); switches given by name change, the rest are this
        one's (see :class:`~causalmm.decoding.Switches`)."""
        other = object.__new__(CausalMM)
        other.switches = self.switches.replace(**switch_changes)
        other.config, other.adapter = config, self.adapter
        other.engine = Engine(self.adapter, config, other.switches)
        return other

    def generate(
        self,
        images: Any,
        prompts: str | list[str],
        *,
        seeds: list[int] | None = None,
        image_seeds: list[int] | None = None,
        return_branch_logits: bool = False,
        **generation_kwargs: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer ``prompts`` about ``images`` (one image per prompt; anything :func:`load_image` accepts).

        ``images`` is one image (used for every prompt) or a list, one per prompt. ``generation_kwargs`` are
        :class:`GenerationOptions` fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``repetition_penalty``, ``stop_strings``). A single prompt gives a single result, a list gives a
        list. ``seeds`` / ``image_seeds``: lists of ints, one per prompt (see :meth:`Engine.generate`).

        Raises:
            InputError: no or empty prompts, an unreadable image, images and prompts or seeds that do not pair
                up, a prompt that leaves no room for ``max_new_tokens`` in the model's positions.
            ConfigError: an unknown or invalid generation option.
        """
        single = isinstance(prompts, str)
        prompt_list = _prompt_list(prompts)
        image_list = _image_list(images, len(prompt_list), single)
        seed_list = _seed_list("seeds", seeds, len(prompt_list))
        image_seed_list = _seed_list("image_seeds", image_seeds, len(prompt_list))
        unknown = sorted(set(generation_kwargs) - {f.name for f in dataclasses.fields(GenerationOptions)})
        if unknown:
            raise InputError(
                f"unknown generation option: {', '.join(unknown)}; known: "
                + ", ".join(f.name for f in dataclasses.fields(GenerationOptions))
            )
        options = GenerationOptions(**_checked_options(generation_kwargs))
        pil = []
        for i, im in enumerate(image_list):
            try:
                pil.append(load_image(im))
            except InputError as err:
                raise InputError(f"image {i}: {err}" if len(image_list) > 1 else str(err)) from err
        with self.adapter.reserving(options.max_new_tokens):  # a prompt must leave room for the answer
            results = self.engine.generate(
                pil,
                prompt_list,
                options,
                seeds=seed_list,
                image_seeds=image_seed_list,
                return_branch_logits=return_branch_logits,
            )
        return results[0] if single else results


def _prompt_list(prompts: Any) -> list[str]:
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


def _image_list(images: Any, n_prompts: int, single: bool) -> list[Any]:
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


def _seed_list(name: str, seeds: Any, n: int) -> list[int] | None:
    """``seeds`` checked: ``None``, or a list of ``n`` integers (bools, floats and strings are refused)."""
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
    if len(seeds) != n:
        raise InputError(f"{name} has {len(seeds)} values for {n} prompts; give one per prompt")
    return [int(s) for s in seeds]


def _checked_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Generation options with the right types (a bool or a string is no number; numpy scalars become Python
    ones), so that no option is silently misread."""
    out = dict(kwargs)
    for name, value in kwargs.items():
        if value is None and name in ("top_k", "top_p"):
            continue
        if name in ("max_new_tokens", "top_k"):
            if not is_int(value):
                raise ConfigError(f"{name}={value!r} must be an integer")
            out[name] = int(value)
        elif name in ("temperature", "top_p", "repetition_penalty"):
            if not is_real(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
            out[name] = float(value)
        elif name == "do_sample" and not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"do_sample={value!r} must be True or False")
        elif name == "stop_strings" and not (
            isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        ):
            raise ConfigError(f"stop_strings={value!r} must be a string or a list of strings")
    if "do_sample" in out:
        out["do_sample"] = bool(out["do_sample"])
    return out
