"""The toy worlds that ship with a trained model, by name: what ``--world`` picks in ``causalmm demo``,
``causalmm toyworld train|tune|splits`` and where each model lives in the package.

* ``default``: the language prior (favoured objects asked about mostly when present), the co-occurrence and
  colour priors; one glyph per patch.
* ``vision-prior``: the same language prior plus a vision prior that reaches the answer (a background texture
  that comes with an object in every training image, the tower's and the LLM's, and is drawn independently of the
  objects in val and test; :func:`~causalmm.toyworld.world.vision_prior_world`), with each object drawn in two
  parts across two patches, so the tower has to assemble it through attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .world import WorldConfig, vision_prior_world

__all__ = ["WORLDS", "ShippedWorld", "get_world", "shipped_model_path"]


@dataclass(frozen=True)
class ShippedWorld:
    """A world, the training settings its model was made with (``TrainConfig`` fields that differ from the
    defaults) and the package directory its model is in."""

    name: str
    config: WorldConfig
    directory: str
    training: dict[str, Any] = field(default_factory=dict)


WORLDS: dict[str, ShippedWorld] = {
    "default": ShippedWorld("default", WorldConfig(), "model"),
    # stage 1 has more to learn (an object is two patches): 1500 steps. At 3000 LLM steps answers to existence
    # questions were still 86% right in training (the default world's: 97%), so stage 2 gets 4500
    "vision-prior": ShippedWorld(
        "vision-prior", vision_prior_world(), "model_vision", {"vision_steps": 1500, "steps": 4500}
    ),
}


def get_world(name: str) -> ShippedWorld:
    """The shipped world called ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
    if name not in WORLDS:
        raise ConfigError(f"unknown toy world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


def shipped_model_path(world: str = "default") -> Path:
    """The directory of ``world``'s trained model shipped inside the package (``from_pretrained`` loads it)."""
    path = Path(str(resources.files("causalmm.toyworld") / get_world(world).directory))
    if not (path / "config.json").is_file():
        flag = "" if world == "default" else f" --world {world}"
        raise FileNotFoundError(
            f"the shipped toy-world model {world!r} is missing from {path}; reinstall causalmm, or train one with "
            f"`causalmm toyworld train{flag} --out DIR` and pass --model DIR"
        )
    return path
