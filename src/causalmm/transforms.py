"""RITUAL's six random image transforms, written with PIL and torch (no torchvision), each a pure function of the
image and a seeded generator.

RITUAL (github.com/sangminwoo/RITUAL, ``eval_bench/pope_eval_llava.py``, ``aug_dict``) draws one of six
``torchvision.transforms.v2`` transforms per sample, uniformly, and applies it to the raw PIL image. Each function
here follows what that transform does to a PIL image, with its parameters drawn as its ``_get_params`` draws them
(ranges and order), from a ``torch.Generator`` instead of torch's global one:

- ``horizontal flip``, ``vertical flip`` (``p=1``);
- ``rotation``: ``RandomRotation(degrees=180)``, an angle uniform in [-180, 180], nearest neighbour, the same size,
  black corners;
- ``color jitter``: ``ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.5)``, its four adjustments in a
  random order, factors uniform in [0, 2] and a hue shift uniform in [-0.5, 0.5] (PIL's ``ImageEnhance`` and an HSV
  shift, as torchvision's PIL kernels);
- ``gaussian blur``: ``GaussianBlur(kernel_size=13, sigma=(1.5, 2.0))``, a separable 13-tap Gaussian with reflected
  borders, rounded back to 8 bits;
- ``crop``: ``RandomResizedCrop(size=336)``, a crop of 8% to 100% of the area and aspect ratio 3/4 to 4/3 (ten tries,
  then the centre crop), resized bilinearly to ``size`` x ``size`` (336: LLaVA-1.5's input).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance

__all__ = ["TRANSFORMS", "gaussian_blur", "random_transform"]


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=g))


def _hflip(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _vflip(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _rotation(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    angle = _uniform(g, -180.0, 180.0)
    return image.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)


def _hue(image: Image.Image, factor: float) -> Image.Image:
    """The hue shifted by ``factor`` of a turn, on PIL's 8-bit HSV (the shift wraps around, as uint8 does)."""
    if image.mode in ("L", "1", "I", "F"):
        return image
    h, s, v = image.convert("HSV").split()
    shift = int(factor * 255) % 256
    h = Image.fromarray(((np.asarray(h, dtype=np.uint16) + shift) % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


def _color_jitter(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    order = torch.randperm(4, generator=g).tolist()
    brightness, contrast, saturation = (_uniform(g, 0.0, 2.0) for _ in range(3))
    hue = _uniform(g, -0.5, 0.5)
    for i in order:
        if i == 0:
            image = ImageEnhance.Brightness(image).enhance(brightness)
        elif i == 1:
            image = ImageEnhance.Contrast(image).enhance(contrast)
        elif i == 2:
            image = ImageEnhance.Color(image).enhance(saturation)
        else:
            image = _hue(image, hue)
    return image


def gaussian_blur(image: Image.Image, kernel_size: int, sigma: float) -> Image.Image:
    """A separable Gaussian blur of ``kernel_size`` taps (``exp(-x^2 / 2 sigma^2)`` at integer offsets, summing to
    1), borders reflected, computed in float32 and rounded back to 8 bits."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    arr = torch.from_numpy(np.array(image, dtype=np.float32))
    t = (arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1))[:, None]  # (channels, 1, h, w)
    pad = kernel_size // 2
    t = torch.nn.functional.pad(t, (pad, pad, pad, pad), mode="reflect")
    t = torch.nn.functional.conv2d(t, k.view(1, 1, 1, -1))
    t = torch.nn.functional.conv2d(t, k.view(1, 1, -1, 1))
    out = t[:, 0].round().clamp(0, 255).to(torch.uint8)
    out = out[0] if arr.dim() == 2 else out.permute(1, 2, 0)
    return Image.fromarray(out.numpy(), image.mode)


def _blur(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    return gaussian_blur(image, 13, _uniform(g, 1.5, 2.0))


def _crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop of 8% to 100% of the area, aspect 3/4 to 4/3."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * _uniform(g, 0.08, 1.0)
        aspect = math.exp(_uniform(g, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    ratio = width / height  # no try fits: the centre crop, clamped to the ratio range
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop(image: Image.Image, g: torch.Generator, size: int) -> Image.Image:
    top, left, h, w = _crop_box(image.width, image.height, g)
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)


#: RITUAL's transforms, by the names its code gives them, in its order
TRANSFORMS: dict[str, Callable[[Image.Image, torch.Generator, int], Image.Image]] = {
    "horizontal flip": _hflip,
    "vertical flip": _vflip,
    "rotation": _rotation,
    "color jitter": _color_jitter,
    "gaussian blur": _blur,
    "crop": _crop,
}


def random_transform(
    image: Image.Image, generator: torch.Generator, *, size: int = 336, names: tuple[str, ...] = tuple(TRANSFORMS)
) -> tuple[str, Image.Image]:
    """One of ``names`` drawn uniformly with ``generator`` and applied to ``image`` (its parameters drawn from the
    same generator): ``(name, transformed image)``. ``size``: the crop's output side."""
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    return name, TRANSFORMS[name](image, generator, size)
