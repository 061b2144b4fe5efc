"""The toy world's text tasks: POPE questions, VLind-style statements and contexts, captions, and the vocabulary
of every text the world can hold."""

from __future__ import annotations

import re

from ..benchmarks.chair import DEFAULT_PROMPT as CAPTION_PROMPT
from ..benchmarks.pope import DEFAULT_SUFFIX as ONE_WORD_SUFFIX
from ..benchmarks.vlind_prompts import prompt_gpt4o, prompt_instructblip
from .scenes import Scene
from .world import NUMBER_WORDS, SPECIAL_TOKENS, WorldConfig

__all__ = [
    "CAPTION_PROMPT",
    "ONE_WORD_SUFFIX",
    "article",
    "caption",
    "colour_context",
    "colour_question",
    "colour_statement",
    "count_question",
    "exist_context",
    "exist_question",
    "exist_statement",
    "partner_context",
    "plural",
    "split_words",
    "statement_prompt",
    "vocabulary",
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def exist_question(name: str) -> str:
    """POPE's question (the loader appends the one-word suffix)."""
    return f"Is there {article(name)} {name} in the image?"


def exist_statement(name: str, present: bool) -> str:
    """The VLind-Bench visual-perception statement ("There is a cup in the given image.") or its negation."""
    return f"There is {article(name) if present else 'no'} {name} in the given image."


def colour_question(name: str) -> str:
    return f"What color is the {name}?"


def colour_statement(name: str, colour: str) -> str:
    return f"The {name} is {colour}."


def count_question(name: str) -> str:
    return f"How many {plural(name)} are there?"


def caption(config: WorldConfig, scene: Scene) -> str:
    """The scene's reference caption: its objects left to right, e.g. "A red apple, two blue kites and a cup."."""
    first_x = {}
    for it in scene.items:
        first_x[it.name] = min(first_x.get(it.name, it.x), it.x)
    order = sorted(scene.objects, key=lambda o: (first_x.get(o, 0), config.objects.index(o)))
    parts = []
    for name in order:
        colour, count = scene.objects[name]
        noun = name if count == 1 else plural(name)
        parts.append(f"{article(colour) if count == 1 else NUMBER_WORDS[count]} {colour} {noun}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def statement_prompt(style: str, statement: str, context: str = "") -> str:
    """A true/false prompt worded as VLind-Bench's (gpt4o prompts): ``style`` ck, vp, cb or lp."""
    return prompt_gpt4o(style, statement, context)


_WORD = re.compile(r"<[a-z/]+>|[a-z]+|[0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """The word-level tokenizer's split: lower-cased words, numbers and single punctuation signs."""
    return _WORD.findall(text.lower())


def vocabulary(config: WorldConfig) -> list[str]:
    """Every token the world's texts can hold: :data:`SPECIAL_TOKENS`, then the words in sorted order.

    Covers the training turns, the POPE/CHAIR/VLind prompts (both VLind prompt sets), the answers, and the
    words of llava's chat template ("USER:", "ASSISTANT:").
    """
    texts = [ONE_WORD_SUFFIX, CAPTION_PROMPT, "USER: ASSISTANT:", "yes no true false"]
    texts += [" ".join(NUMBER_WORDS), " ".join(config.colours), "and ,"]
    for name in config.objects:
        texts += [exist_question(name), exist_statement(name, True), exist_statement(name, False)]
        texts += [colour_question(name), count_question(name), f"{article(name)} {name} {plural(name)}"]
        texts += [colour_statement(name, c) for c in config.colours]
        texts += _vlind_texts(name)
    for style in ("ck", "vp", "cb", "lp"):
        texts += [prompt_gpt4o(style, "x", "x"), prompt_instructblip(style, "x", "x")]
    words = {w for t in texts for w in split_words(t)} - {"x"}
    return [*SPECIAL_TOKENS, *sorted(words)]


def _vlind_texts(name: str) -> list[str]:
    texts = [exist_context(name, True), exist_context(name, False)]
    return texts + [partner_context(name, name, True), partner_context(name, name, False), colour_context(name, "x")]


def exist_context(name: str, present: bool) -> str:
    """A VLind context (also a folder name) for the language prior: "There is an apple" / "There is no apple"."""
    return f"There is {article(name) if present else 'no'} {name}"


def partner_context(anchor: str, partner: str, present: bool) -> str:
    """A VLind context for the co-occurrence prior: "The cup has a bottle" / "The cup has no bottle"."""
    return f"The {anchor} has {article(partner) if present else 'no'} {partner}"


def colour_context(name: str, colour: str) -> str:
    """A VLind context for the colour prior: "The pizza is yellow"."""
    return f"The {name} is {colour}"
