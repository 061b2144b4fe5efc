"""The toy world's training stream.

Training (:func:`train_sample`): sample ``i`` is one image and a multi-turn conversation about it (dense
supervision, as the pilot found grounding needs): existence questions about several objects (every present
object, absent ones at the rates of :func:`~causalmm.toyworld.statistics.ask_probabilities`, which carry the
language prior), some of them as VLind-style true/false statements, then colour and count turns about
present objects, and sometimes a caption last (so no earlier turn gives an existence answer away).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .render import render
from .scenes import Scene, sample_scene
from .statistics import ask_probabilities
from .texts import (
    CAPTION_PROMPT,
    ONE_WORD_SUFFIX,
    caption,
    colour_question,
    colour_statement,
    count_question,
    exist_question,
    exist_statement,
    statement_prompt,
)
from .world import _TEXT, NUMBER_WORDS, WorldConfig, make_rng

__all__ = ["TrainSample", "Turn", "train_sample", "train_samples"]

#: VLind prompt styles used for training statements (the cb style needs a context, not used in training)
STATEMENT_STYLES = ("vp", "lp", "ck")


@dataclass(frozen=True)
class Turn:
    """One question and its answer. ``kind``: exist, exist_statement, colour, colour_statement, count or
    caption; ``object`` the object asked about (None for captions); ``truth`` for existence turns whether the
    object is present (for the others None)."""

    prompt: str
    answer: str
    kind: str
    object: str | None = None
    truth: bool | None = None


@dataclass(frozen=True)
class TrainSample:
    """Training sample ``index``: its scene, its image (None when not rendered) and its turns, in order."""

    index: int
    scene: Scene
    image: Image.Image | None
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (the image in the first user message), for a chat template."""
        out: list[dict[str, Any]] = []
        for k, turn in enumerate(self.turns):
            content: list[dict[str, str]] = [{"type": "image"}] if k == 0 else []
            out.append({"role": "user", "content": [*content, {"type": "text", "text": turn.prompt}]})
            out.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        return out


def train_sample(config: WorldConfig, index: int, *, render_image: bool = True) -> TrainSample:
    """Training sample ``index`` (any non-negative integer), a pure function of ``config`` and ``index``."""
    scene = sample_scene(config, "train", index)
    rng = make_rng(config, "train", index, _TEXT)
    image = render(config, scene) if render_image else None
    if rng.random() < config.caption_p:  # caption-only: grounding from image to words, nothing to copy from
        return TrainSample(index, scene, image, (Turn(CAPTION_PROMPT, caption(config, scene), "caption"),))
    ask = ask_probabilities(config)
    exist: list[Turn] = []
    for name in config.objects:
        present = name in scene.objects
        if rng.random() >= ask[name][0 if present else 1]:
            continue
        if rng.random() < config.statement_rate:
            affirm = bool(rng.random() < 0.5)
            style = STATEMENT_STYLES[int(rng.integers(len(STATEMENT_STYLES)))]
            prompt = statement_prompt(style, exist_statement(name, affirm))
            exist.append(Turn(prompt, _tf(affirm == present), "exist_statement", name, present))
        else:
            answer = "yes" if present else "no"
            exist.append(Turn(exist_question(name) + ONE_WORD_SUFFIX, answer, "exist", name, present))
    attributes: list[Turn] = []
    for name, (colour, count) in scene.objects.items():
        if rng.random() < config.colour_question_p:
            if rng.random() < config.statement_rate:
                others = [c for c in config.colours if c != colour]
                said = colour if rng.random() < 0.5 else others[int(rng.integers(len(others)))]
                prompt = statement_prompt(STATEMENT_STYLES[int(rng.integers(2))], colour_statement(name, said))
                attributes.append(Turn(prompt, _tf(said == colour), "colour_statement", name))
            else:
                attributes.append(Turn(colour_question(name) + ONE_WORD_SUFFIX, colour, "colour", name))
        if rng.random() < config.count_question_p:
            attributes.append(Turn(count_question(name) + ONE_WORD_SUFFIX, NUMBER_WORDS[count], "count", name))
    turns = [exist[i] for i in rng.permutation(len(exist))] + [attributes[i] for i in rng.permutation(len(attributes))]
    if not turns:
        turns.append(Turn(CAPTION_PROMPT, caption(config, scene), "caption"))
    return TrainSample(index, scene, image, tuple(turns))


def train_samples(config: WorldConfig, start: int = 0, stop: int | None = None) -> Iterator[TrainSample]:
    """Training samples ``start``, ``start + 1``, ... (endless when ``stop`` is None)."""
    index = start
    while stop is None or index < stop:
        yield train_sample(config, index)
        index += 1


def _tf(value: bool) -> str:
    return "true" if value else "false"


