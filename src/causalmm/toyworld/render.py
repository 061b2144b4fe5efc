"""Deterministic rendering of a toy-world scene: PIL's ImageDraw (no anti-aliasing), then integer pixel noise,
so the same config gives the same pixels and the same PNG bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from .scenes import Item, Scene
from .world import COLOURS, CUES, WorldConfig, parts_of

__all__ = ["render"]


def _draw(draw: ImageDraw.ImageDraw, glyph: str, it: Item, rgb: tuple[int, int, int]) -> None:
    x0, y0, s = it.x, it.y, it.size
    x1, y1 = x0 + s - 1, y0 + s - 1
    xc, yc = x0 + s // 2, y0 + s // 2
    t = max(2, s // 4)  # stroke width
    if glyph == "disc":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif glyph == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=rgb, width=t)
    elif glyph == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=rgb)
    elif glyph == "frame":
        draw.rectangle((x0, y0, x1, y1), outline=rgb, width=max(2, s // 5))
    elif glyph == "triangle":
        draw.polygon([(x0, y0), (x1, y0), (xc, y1)], fill=rgb)
    elif glyph == "diamond":
        draw.polygon([(xc, y0), (x1, yc), (xc, y1), (x0, yc)], fill=rgb)
    elif glyph == "umbrella":
        draw.pieslice((x0, y0, x1, y0 + s), 180, 360, fill=rgb)
        draw.rectangle((xc - 1, yc, xc, y1), fill=rgb)
    elif glyph == "vbar":
        w = max(3, s // 3)
        draw.rectangle((xc - w // 2, y0, xc - w // 2 + w - 1, y1), fill=rgb)
    elif glyph == "hbar":
        h = max(3, s // 3)
        draw.rectangle((x0, yc - h // 2, x1, yc - h // 2 + h - 1), fill=rgb)
    elif glyph == "cup":
        draw.rectangle((x0, y0, x0 + t - 1, y1), fill=rgb)
        draw.rectangle((x1 - t + 1, y0, x1, y1), fill=rgb)
        draw.rectangle((x0, y1 - t + 1, x1, y1), fill=rgb)
    elif glyph == "cross":
        draw.rectangle((xc - t // 2, y0, xc - t // 2 + t - 1, y1), fill=rgb)
        draw.rectangle((x0, yc - t // 2, x1, yc - t // 2 + t - 1), fill=rgb)
    elif glyph == "xcross":
        draw.line((x0, y0, x1, y1), fill=rgb, width=t)
        draw.line((x0, y1, x1, y0), fill=rgb, width=t)
    else:  # pragma: no cover - WorldConfig validates glyphs
        raise ValueError(f"unknown glyph {glyph!r}")


#: how much a cue's lines lighten the background (each channel)
CUE_LIFT = 48


def _draw_cue(draw: ImageDraw.ImageDraw, cue: str, side: int, background: tuple[int, int, int]) -> None:
    period, orientation = CUES[cue]
    rgb = tuple(min(255, c + CUE_LIFT) for c in background)
    for k in range(1, side, period):
        draw.line((0, k, side - 1, k) if orientation == "horizontal" else (k, 0, k, side - 1), fill=rgb)


def render(config: WorldConfig, scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``image_size`` pixels: background (and its cue's texture), objects, then
    integer pixel noise. A two-part object (``drawing="parts"``) is its top part at the item's corner and its
    bottom part ``height - size`` pixels below."""
    if not scene.items:
        raise ValueError("the scene has no layout (sampled with layout=False)")
    img = Image.new("RGB", (config.image_size, config.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    if scene.cue is not None:
        _draw_cue(draw, scene.cue, config.image_size, scene.background)
    for it in scene.items:
        if config.drawing == "parts":
            top, bottom = parts_of(config, it.name)
            _draw(draw, top, it, COLOURS[it.colour])
            _draw(draw, bottom, replace(it, y=it.y + it.h - it.size), COLOURS[it.colour])
        else:
            _draw(draw, config.glyph_of[it.name], it, COLOURS[it.colour])
    if config.noise:
        rng = np.random.default_rng(list(scene.noise_key))
        noise = rng.integers(-config.noise, config.noise + 1, size=(config.image_size, config.image_size, 3))
        pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
    return img
