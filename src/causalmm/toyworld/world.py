"""The toy world: its configuration, with documented priors (scene sampling in :mod:`.scenes`, rendering in
:mod:`.render`, the text tasks in :mod:`.texts`, training statistics in :mod:`.statistics`).

A *scene* is a small set of object types (each with one colour and a count of 1-3 instances) laid out
without overlap on a noisy plain background. Objects are drawn as distinct glyphs (a disc, a ring, a
triangle, ...) named with one-word COCO category names, so the captions are read by CHAIR's COCO synonym
table unchanged (see :mod:`causalmm.toyworld.splits`).

The priors, all fields of :class:`WorldConfig`:

* **language prior** (the main one, what CausalMM is meant to remove): in the *training text* the
  ``favoured`` objects are asked about mostly when they are present, so P(answer "yes" | a training
  question about a favoured object) = ``language_prior`` (0.9), while the other objects' absent-question rate
  is set so that the overall yes rate of training existence questions is ``yes_rate`` (0.5). The image
  distribution does not carry this prior: it lives in which questions are asked
  (:func:`ask_probabilities`). ``favoured_weight`` also makes the favoured objects the most frequent in
  images (POPE's "popular" objects); 1.0 isolates the text prior.
* **co-occurrence (visual) prior**: for each ``(anchor, partner)`` of ``cooccurrence``, a training image
  with the anchor holds the partner with probability ``cooccurrence_p`` (0.9). Evaluation images use
  ``eval_cooccurrence_p`` (0.5), so "anchor present, partner absent" is common enough to measure.
* **colour prior**: each ``(object, colour)`` of ``colour_prior`` has that colour with probability
  ``colour_prior_p`` (0.9) in training images; counterfactual (VLind-style) images break it.
* **vision-encoder prior** (off by default; :func:`vision_prior_world` turns it on): each ``(object, cue)`` of
  ``vision_prior`` ties a background texture (:data:`CUES`, drawn in every background patch, so one patch shows
  it without attention) to an object. In the vision tower's pre-training images (stage 1, ``tower=True``) an
  image holding the object has its cue with probability ``vision_prior_p`` (0.9; when it holds no other cued
  object) and an image without it with probability ``cue_stray_p`` (0.05); at test time an image has a cue with
  probability ``cue_rate`` (0.5), drawn independently of what it holds, and so in the LLM stage, unless
  ``cue_tied_in_llm``, where the LLM-stage images follow stage 1's rule (the cue reaches the answer). The hallucination
  this prior causes is "yes" to the cued object when its cue is present and the object absent. With
  ``drawing="parts"`` each object is two half-glyphs in two stacked patches (:func:`parts_of`), shared
  between objects, so knowing the object takes both patches: evidence the tower assembles through attention,
  while the cue needs none.

Randomness: every draw comes from ``numpy.random.default_rng([seed, stream, index, purpose])`` (no global
state), with separate purposes for contents, layout, pixel noise and text, so a scene's image does not change
when text options change. Rendering uses PIL's ImageDraw (no anti-aliasing) and integer noise: the same
config gives the same pixels and the same PNG bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "CUES",
    "GLYPHS",
    "PART_GLYPHS",
    "SPECIAL_TOKENS",
    "STREAMS",
    "WorldConfig",
    "make_rng",
    "parts_of",
    "vision_prior_world",
]

#: colour name -> RGB. Bright, saturated colours that stand out on the dark backgrounds. ("orange" is left
#: out on purpose: it is a COCO object, and CHAIR would read "an orange cup" as an orange.)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (170, 70, 210),
    "white": (240, 240, 240),
}

#: background base colours (never named in text); each image jitters its base by up to +-8 per channel
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((20, 20, 24), (64, 64, 64), (22, 34, 72), (62, 42, 26))

#: the glyphs objects are drawn as, in the order :data:`WorldConfig.objects` gets them by default
GLYPHS: tuple[str, ...] = (
    "disc",  # apple
    "ring",  # donut
    "square",  # book
    "frame",  # tv
    "triangle",  # pizza (a slice, point down)
    "diamond",  # kite
    "umbrella",  # umbrella (half disc on a stick)
    "vbar",  # bottle (tall bar)
    "hbar",  # bed (flat bar)
    "cup",  # cup (a U)
    "cross",
    "xcross",
)

#: the glyphs a ``drawing="parts"`` object is built from: object ``i`` is part ``i % 5`` above part
#: ``(i % 5 + 1 + i // 5) % 5``, so every part is the top of two objects and the bottom of two others, and only
#: the pair names the object (:func:`parts_of`)
PART_GLYPHS: tuple[str, ...] = ("disc", "ring", "square", "frame", "triangle")

#: background textures of the vision-encoder prior: name -> (period in pixels, orientation); each is a line of
#: the background lightened by 48 every ``period`` pixels, so every 12-pixel patch holds several
CUES: dict[str, tuple[int, str]] = {"stripes": (3, "horizontal"), "columns": (3, "vertical")}

#: count -> word
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

#: special tokens of the word-level tokenizer (llava-hf's Llama tokenizer has the same ones)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

#: stream name -> the integer that seeds it (train text and images, training statistics, eval splits)
STREAMS: dict[str, int] = {
    "train": 1, "stats": 2, "val": 3, "test": 4, "val_vlind": 5, "test_vlind": 6, "vti_demos": 7,
}  # fmt: skip

_CONTENTS, _LAYOUT, _NOISE, _TEXT, _CUE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a toy world; hashable, and the whole of it is written to ``splits.json``."""

    #: the world's seed: every image and text is a function of (config, stream, index)
    seed: int = 0
    #: object names (one word each; COCO category names by default so CHAIR reads them)
    objects: tuple[str, ...] = ("apple", "donut", "book", "tv", "pizza", "kite", "umbrella", "bottle", "bed", "cup")
    #: glyph of each object (see :data:`GLYPHS`); ``None``: the first ``len(objects)`` glyphs in order
    glyphs: tuple[str, ...] | None = None
    #: colour names (keys of :data:`COLOURS`)
    colours: tuple[str, ...] = tuple(COLOURS)
    #: image side in pixels (a multiple of the vision tower's patch, e.g. 48 = 6 x 8)
    image_size: int = 48
    #: glyph side in pixels, inclusive range
    object_size: tuple[int, int] = (8, 10)
    #: grid layout: each glyph sits inside one ``cell`` x ``cell`` square of the image (the model's patch: a
    #: from-scratch ViT learns whole glyphs per patch far faster than glyphs cut across patches); 0 = free layout
    cell: int = 12
    #: distinct object types per image, inclusive range (co-occurrence may add one partner beyond the max)
    min_objects: int = 1
    max_objects: int = 4
    #: probability that a type has one more instance (applied twice: counts 1, 2, 3)
    duplicate_p: float = 0.2
    #: most glyphs in one image (counts are lowered, largest first, to fit)
    max_instances: int = 6
    #: pixel noise: every channel of every pixel gets an integer in [-noise, noise]
    noise: int = 10
    #: how objects are drawn: ``"glyph"`` (one glyph in one cell) or ``"parts"`` (two half-glyphs in two
    #: vertically stacked cells, see :data:`PART_GLYPHS`; needs ``cell``)
    drawing: str = "glyph"

    # -- priors ---------------------------------------------------------------------------------------
    #: the language-prior-favoured objects: asked about in training text mostly when present
    favoured: tuple[str, ...] = ("apple", "book", "kite")
    #: P(answer "yes" | a training existence question about a favoured object)
    language_prior: float = 0.9
    #: overall P("yes") of training existence questions (the other objects' absent-question rate is solved for it)
    yes_rate: float = 0.5
    #: sampling weight of a favoured object in images relative to 1 for the others (> 1: they are the most
    #: frequent objects, i.e. POPE's popular negatives; 1: the language prior lives in the text only)
    favoured_weight: float = 2.5
    #: (anchor, partner) pairs of the co-occurrence prior
    cooccurrence: tuple[tuple[str, str], ...] = (("cup", "bottle"), ("donut", "umbrella"))
    #: P(partner in a training image | anchor in it)
    cooccurrence_p: float = 0.9
    #: the same in evaluation images (``None``: as in training); lower, so absent partners are measurable
    eval_cooccurrence_p: float | None = 0.5
    #: (object, colour) pairs of the colour prior
    colour_prior: tuple[tuple[str, str], ...] = (("pizza", "yellow"), ("bed", "white"))
    #: P(the object has its prior colour) in training and evaluation images (counterfactual images break it)
    colour_prior_p: float = 0.9
    #: (object, cue) pairs of the vision-encoder prior (cues are keys of :data:`CUES`); () = no such prior
    vision_prior: tuple[tuple[str, str], ...] = ()
    #: P(the object's cue | the object in a stage-1 image that holds no other cued object)
    vision_prior_p: float = 0.9
    #: P(a cue | its object absent) in stage-1 images
    cue_stray_p: float = 0.05
    #: P(an image has a cue) in LLM-stage and evaluation images; the cue is drawn uniformly, whatever the image holds
    cue_rate: float = 0.5
    #: the cue follows the prior in the LLM-stage training images too (and in VTI's demos), as in stage 1: the cue
    #: reaches the answer, as stripes and TVs co-occur in all of a real VLM's data; only val and test draw it at
    #: ``cue_rate``, independently of the objects
    cue_tied_in_llm: bool = False

    # -- training text --------------------------------------------------------------------------------
    #: fraction of existence decisions asked as a VLind-style true/false statement instead of a question
    statement_rate: float = 0.1
    #: per present object: probability of a colour turn (question, or a true/false colour statement)
    colour_question_p: float = 0.5
    #: per present object: probability of a "how many" turn
    count_question_p: float = 0.3
    #: probability that a training sample is a caption alone (otherwise it is questions and statements)
    caption_p: float = 0.25
    #: training scenes the frequency / co-occurrence statistics are measured on (POPE popular/adversarial
    #: negatives, and the presence rates the language prior's ask probabilities are solved from)
    stats_images: int = 4000

    # -- evaluation -----------------------------------------------------------------------------------
    #: POPE: positive (and negative) questions per image; images need at least this many object types
    pope_positives: int = 3

    def __post_init__(self) -> None:
        glyphs = self.glyphs if self.glyphs is not None else GLYPHS[: len(self.objects)]
        problems = []
        if len(set(self.objects)) != len(self.objects) or len(self.objects) < 2 * self.pope_positives:
            problems.append(f"objects must be distinct and at least {2 * self.pope_positives}")
        if len(glyphs) != len(self.objects) or not set(glyphs) <= set(GLYPHS):
            problems.append(f"need one glyph of {GLYPHS} per object")
        for name in self.objects:
            if not re.fullmatch(r"[a-z]+", name):
                problems.append(f"object name {name!r} must be one lower-case word")
        if not self.colours or not set(self.colours) <= set(COLOURS):
            problems.append(f"colours must be among {tuple(COLOURS)}")
        if not set(self.favoured) <= set(self.objects):
            problems.append("favoured objects must be objects")
        for a, b in self.cooccurrence:
            if a not in self.objects or b not in self.objects or a == b:
                problems.append(f"co-occurrence pair ({a}, {b}) must be two different objects")
        for o, c in self.colour_prior:
            if o not in self.objects or c not in self.colours:
                problems.append(f"colour prior ({o}, {c}) must be an object and a colour")
        if not 1 <= self.min_objects <= self.max_objects < len(self.objects):
            problems.append("need 1 <= min_objects <= max_objects < number of objects")
        if self.max_objects < self.pope_positives:
            problems.append("max_objects must be at least pope_positives")
        lo, hi = self.object_size
        if not 4 <= lo <= hi or (hi + 2) * 2 > self.image_size:
            problems.append("object_size must fit two glyphs across the image")
        if self.cell and (self.image_size % self.cell or hi + 2 > self.cell):
            problems.append("cell must divide image_size and hold a glyph of the largest object_size plus 2 px")
        if self.cell and self.max_instances > (self.image_size // self.cell) ** 2:
            problems.append("max_instances must not exceed the number of grid cells")
        for name in ("language_prior", "yes_rate", "cooccurrence_p", "colour_prior_p"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name} must be in (0, 1)")
        if self.drawing not in ("glyph", "parts"):
            problems.append(f"drawing must be 'glyph' or 'parts', not {self.drawing!r}")
        elif self.drawing == "parts":
            grid = self.image_size // self.cell if self.cell else 0
            if not self.cell or len(self.objects) > 2 * len(PART_GLYPHS) or self.max_instances > grid * (grid // 2):
                problems.append(
                    f"drawing='parts' needs a cell grid, at most {2 * len(PART_GLYPHS)} objects and max_instances "
                    "within the stacked cell pairs"
                )
        partners = {b for _, b in self.cooccurrence}
        cued = [o for o, _ in self.vision_prior]
        for o, cue in self.vision_prior:
            if o not in self.objects or cue not in CUES:
                problems.append(f"vision prior ({o}, {cue}) must be an object and a cue of {tuple(CUES)}")
            elif o in self.favoured or o in partners:
                problems.append(f"vision-prior object {o!r} must be neither favoured nor a co-occurrence partner")
        if len(set(cued)) != len(cued) or len({c for _, c in self.vision_prior}) != len(cued):
            problems.append("each vision-prior object and cue must appear once")
        for name in ("vision_prior_p", "cue_stray_p", "cue_rate"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems))

    @functools.cached_property
    def glyph_of(self) -> dict[str, str]:
        """object -> glyph."""
        glyphs = self.glyphs if self.glyphs is not None else GLYPHS[: len(self.objects)]
        return dict(zip(self.objects, glyphs, strict=True))

    @functools.cached_property
    def cue_of(self) -> dict[str, str]:
        """cued object -> its cue (the vision-encoder prior; empty when the world has none)."""
        return dict(self.vision_prior)

    def partners(self, present: Iterable[str]) -> set[str]:
        """The co-occurrence partners of the anchors in ``present``."""
        present = set(present)
        return {b for a, b in self.cooccurrence if a in present}


def make_rng(config: WorldConfig, stream: str, index: int, purpose: int, *extra: int) -> np.random.Generator:
    """The generator of one (stream, index, purpose): independent of every other one, no global state."""
    return np.random.default_rng([config.seed, STREAMS[stream], index, purpose, *extra])


def parts_of(config: WorldConfig, name: str) -> tuple[str, str]:
    """The (top, bottom) part glyphs of ``name`` in a ``drawing="parts"`` world (see :data:`PART_GLYPHS`)."""
    i, n = config.objects.index(name), len(PART_GLYPHS)
    return PART_GLYPHS[i % n], PART_GLYPHS[(i % n + 1 + i // n) % n]


def vision_prior_world(**changes: object) -> WorldConfig:
    """The world with a vision prior that reaches the answer, beside the language prior: objects drawn in two parts
    across two patches, *tv* cued by horizontal stripes and *cup* by vertical ones, each cue present exactly when its
    object is in every training image (tower and LLM stages), drawn independently of the objects in val and test
    (``changes`` override any field; ``cue_tied_in_llm=False, vision_prior_p=0.9, cue_stray_p=0.05`` is the
    earlier world whose prior stayed in the tower, docs/toyworld.md)."""
    fields: dict[str, object] = {
        "drawing": "parts",
        "vision_prior": (("tv", "stripes"), ("cup", "columns")),
        "vision_prior_p": 1.0,
        "cue_stray_p": 0.0,
        "cue_tied_in_llm": True,
        "max_instances": 6,
        **changes,
    }
    return WorldConfig(**fields)  # type: ignore[arg-type]
