"""Reading images: :func:`load_image` turns any accepted input (a path, bytes, a PIL image of any mode, an array
or a tensor) into the RGB image the model sees; :func:`to_rgb` converts each PIL mode faithfully; PIL's pixel
limit guards against decompression bombs (:data:`PIXEL_LIMIT_ENV`)."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .inputs import InputError

__all__ = ["PIXEL_LIMIT_ENV", "WHITE", "ImageInput", "load_image", "to_rgb"]

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
