"""Seeded scene sampling in the toy world (:mod:`.world` holds the configuration and its priors): what an image
holds (object types, colours, counts, under the co-occurrence and colour priors), where each glyph goes, its
background and, in a world with a vision-encoder prior, its cue.

Every draw comes from :func:`~.world.make_rng` with its own purpose (contents, layout, cue), so a scene is a pure
function of the configuration, the stream and the index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .world import _CONTENTS, _CUE, _LAYOUT, _NOISE, BACKGROUNDS, STREAMS, WorldConfig, make_rng

__all__ = ["Item", "Scene", "draw_cue", "sample_scene"]

#: the streams drawn from the training distribution (the LLM stage's images, the statistics, VTI's demos)
_TRAINING_STREAMS = frozenset({"train", "stats", "vti_demos"})


@dataclass(frozen=True)
class Item:
    """One object instance: name, colour name, side in pixels, top-left corner; ``height`` is the box's height
    where it is not ``size`` (a two-part object: its bottom part is drawn ``height - size`` pixels lower)."""

    name: str
    colour: str
    size: int
    x: int
    y: int
    height: int = 0

    @property
    def h(self) -> int:
        """The box's height in pixels."""
        return self.height or self.size


@dataclass(frozen=True)
class Scene:
    """An image's contents: ``objects`` maps each present type to (colour, count), in vocabulary order;
    ``items`` is the layout (empty for contents-only scenes); ``background`` its RGB; ``noise_key`` seeds
    the pixel noise; ``cue`` the background texture of the vision-encoder prior (``None``: plain)."""

    objects: dict[str, tuple[str, int]]
    items: tuple[Item, ...] = ()
    background: tuple[int, int, int] = (0, 0, 0)
    noise_key: tuple[int, ...] = ()
    cue: str | None = None

    @property
    def present(self) -> frozenset[str]:
        return frozenset(self.objects)

    def colour(self, name: str) -> str:
        return self.objects[name][0]

    def count(self, name: str) -> int:
        return self.objects[name][1] if name in self.objects else 0


def _weights(config: WorldConfig, names: Sequence[str]) -> np.ndarray:
    w = np.array([config.favoured_weight if n in config.favoured else 1.0 for n in names])
    return w / w.sum()


def _pick(config: WorldConfig, rng: np.random.Generator, candidates: Sequence[str]) -> str:
    return candidates[int(rng.choice(len(candidates), p=_weights(config, candidates)))]


def _contents(
    config: WorldConfig,
    rng: np.random.Generator,
    *,
    cooccurrence_p: float,
    require: dict[str, str | None],
    forbid: frozenset[str],
) -> dict[str, tuple[str, int]]:
    """Sample types, colours and counts. ``require``: object -> forced colour (or None); ``forbid``: absent."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    pool = [o for o in config.objects if o not in forbid]
    chosen = [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False, p=_weights(config, pool))]
    for a, b in config.cooccurrence:
        if a not in chosen:
            continue
        if rng.random() < cooccurrence_p:
            if b not in chosen and b not in forbid:
                chosen.append(b)
        elif b in chosen and b not in require:
            others = [o for o in config.objects if o not in chosen and o != b and o not in forbid]
            if others:
                chosen[chosen.index(b)] = _pick(config, rng, others)
            else:
                chosen.remove(b)
    for name in require:
        if name not in chosen:
            free = [i for i, o in enumerate(chosen) if o not in require]
            if len(chosen) >= config.max_objects and free:
                chosen[free[int(rng.integers(len(free)))]] = name
            else:
                chosen.append(name)
    prior = dict(config.colour_prior)
    objects: dict[str, tuple[str, int]] = {}
    for name in config.objects:
        if name not in chosen:
            continue
        if require.get(name) is not None:
            colour = require[name]
        elif name in prior and rng.random() < config.colour_prior_p:
            colour = prior[name]
        else:
            options = [c for c in config.colours if c != prior.get(name)]
            colour = options[int(rng.integers(len(options)))]
        count = 1 + int(rng.random() < config.duplicate_p)
        if count == 2:
            count += int(rng.random() < config.duplicate_p)
        objects[name] = (colour, count)
    while sum(c for _, c in objects.values()) > config.max_instances:
        name = max(objects, key=lambda o: (objects[o][1], -config.objects.index(o)))
        objects[name] = (objects[name][0], objects[name][1] - 1)
    return objects


def _apart(x: int, y: int, size: int, it: Item) -> bool:
    """Whether a box at (x, y) of side ``size`` leaves at least 1 px between itself and ``it``."""
    return x + size + 1 < it.x or it.x + it.size + 1 < x or y + size + 1 < it.y or it.y + it.size + 1 < y


def _layout(config: WorldConfig, rng: np.random.Generator, objects: dict[str, tuple[str, int]]) -> tuple[Item, ...]:
    """Non-overlapping glyph boxes (1 px apart at least): one per grid cell, at a random offset inside it, or
    (``cell=0``) anywhere by rejection sampling, with smaller glyphs if crowded."""
    lo, hi = config.object_size
    wanted = [(name, colour) for name, (colour, count) in objects.items() for _ in range(count)]
    if config.drawing == "parts":  # one object per pair of stacked cells, each part at its own cell's offset
        per_row = config.image_size // config.cell
        slots = rng.choice(per_row * (per_row // 2), size=len(wanted), replace=False)
        items = []
        for (name, colour), slot in zip(wanted, slots, strict=True):
            size = int(rng.integers(lo, hi + 1))
            dx, dy = (int(v) for v in rng.integers(1, config.cell - size, size=2))
            x, y = int(slot % per_row) * config.cell + dx, int(slot // per_row) * 2 * config.cell + dy
            items.append(Item(name, colour, size, x, y, config.cell + size))
        return tuple(items)
    if config.cell:
        per_row = config.image_size // config.cell
        cells = rng.choice(per_row * per_row, size=len(wanted), replace=False)
        items = []
        for (name, colour), cell in zip(wanted, cells, strict=True):
            size = int(rng.integers(lo, hi + 1))
            dx, dy = (int(v) for v in rng.integers(1, config.cell - size, size=2))
            x, y = int(cell % per_row) * config.cell + dx, int(cell // per_row) * config.cell + dy
            items.append(Item(name, colour, size, x, y))
        return tuple(items)
    for attempt in range(50):
        top = hi if attempt < 25 else lo
        items: list[Item] = []
        for name, colour in wanted:
            size = int(rng.integers(lo, top + 1))
            for _ in range(200):
                x, y = (int(v) for v in rng.integers(1, config.image_size - size, size=2))
                if all(_apart(x, y, size, it) for it in items):
                    items.append(Item(name, colour, size, x, y))
                    break
            else:
                break
        if len(items) == len(wanted):
            return tuple(items)
    raise RuntimeError(f"cannot lay out {len(wanted)} glyphs in {config.image_size} px; lower max_instances")


def sample_scene(
    config: WorldConfig,
    stream: str,
    index: int,
    *,
    layout: bool = True,
    evaluation: bool = False,
    min_types: int = 1,
    require: dict[str, str | None] | None = None,
    forbid: Iterable[str] = (),
    tower: bool = False,
) -> Scene:
    """Scene ``index`` of ``stream``, a pure function of its arguments.

    ``evaluation`` uses ``eval_cooccurrence_p``; ``min_types`` rejects (and redraws from the same generator)
    scenes with fewer object types, as POPE keeps only images with at least 3 objects; ``require`` maps
    objects that must be present to a forced colour or ``None``; ``forbid`` lists objects that must be absent.
    ``layout=False`` skips placing the glyphs (statistics need the contents only). ``tower``: an image of the
    vision tower's pre-training (stage 1), whose cue follows the vision-encoder prior (:func:`draw_cue`).
    """
    require = dict(require or {})
    forbid = frozenset(forbid)
    p = config.cooccurrence_p
    if evaluation and config.eval_cooccurrence_p is not None:
        p = config.eval_cooccurrence_p
    rng = make_rng(config, stream, index, _CONTENTS)
    for _ in range(1000):
        objects = _contents(config, rng, cooccurrence_p=p, require=require, forbid=forbid)
        if len(objects) >= min_types:
            break
    else:
        raise RuntimeError(f"no scene with {min_types} object types after 1000 draws")
    # stage 1 ties the cue to its object; the LLM stage (and VTI's demos, drawn from its distribution) too in a
    # world whose cue reaches the answer; evaluation never does
    tied = tower or (config.cue_tied_in_llm and not evaluation and stream in _TRAINING_STREAMS)
    cue = draw_cue(config, make_rng(config, stream, index, _CUE), objects, tower=tied) if config.vision_prior else None
    if not layout:
        return Scene(objects, cue=cue)
    rng = make_rng(config, stream, index, _LAYOUT)
    items = _layout(config, rng, objects)
    base = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    jitter = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(base, jitter, strict=True))
    return Scene(objects, items, background, (config.seed, STREAMS[stream], index, _NOISE), cue)  # type: ignore[arg-type]


def draw_cue(
    config: WorldConfig, rng: np.random.Generator, objects: dict[str, tuple[str, int]], *, tower: bool
) -> str | None:
    """The image's cue. Stage 1 (``tower``): each cued object present, in order, brings its cue with probability
    ``vision_prior_p``; failing that each absent one's cue comes with ``cue_stray_p``. Elsewhere: a cue with
    probability ``cue_rate``, uniform over the cues, independent of ``objects``."""
    if not tower:
        if rng.random() < config.cue_rate:
            return config.vision_prior[int(rng.integers(len(config.vision_prior)))][1]
        return None
    for name, cue in config.vision_prior:
        if name in objects and rng.random() < config.vision_prior_p:
            return cue
    for name, cue in config.vision_prior:
        if name not in objects and rng.random() < config.cue_stray_p:
            return cue
    return None
