"""The toy world's offline fits: VTI's demos, drawn from the training distribution as the official ones are COCO
train captions, and its directions, written beside the model (``causalmm toyworld fit-vti``).

A demo is a scene of the ``vti_demos`` stream (no val or test image), the captioning prompt the model was trained
on, its caption, and the same caption with one absent object of the language prior's favoured ones put in (the
official ``h_value`` is its caption with co-occurring objects hallucinated into it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..fit.store import save_fitted
from ..fit.vti import DEFAULTS, fit_vti, read_demos
from .render import render
from .scenes import sample_scene
from .texts import CAPTION_PROMPT, caption
from .world import WorldConfig

__all__ = ["VTI_FILE", "fit_toy_vti", "write_vti_demos"]

#: the file name of the directions beside a toy-world model (the grid's ``vectors`` is relative to the model)
VTI_FILE = "vti.safetensors"


def write_vti_demos(config: WorldConfig, root: Path, n: int) -> Path:
    """``n`` demos in the official format under ``root`` (``demos.jsonl`` and the images); the file's path."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = sample_scene(config, "vti_demos", i, min_types=2)
        absent = [name for name in config.favoured if name not in scene.objects]
        if not absent:  # every favoured object is there: nothing to hallucinate
            continue
        extra = absent[i % len(absent)]
        colour = config.colours[i % len(config.colours)]
        hallucinated = replace(scene, objects={**scene.objects, extra: (colour, 1)})  # the others keep their order
        image = f"{i:04d}.png"
        render(config, scene).save(root / image, format="PNG")
        lines.append({"image": image, "question": CAPTION_PROMPT, "value": caption(config, scene),
                      "h_value": caption(config, hallucinated)})  # fmt: skip
    path = root / "demos.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def fit_toy_vti(cm: Any, model_dir: Path, config: WorldConfig, work: Path, log: Callable[[str], None]) -> Path:
    """Write the official number of demos under ``work`` and fit VTI's directions on them with the official
    settings; the directions go to ``model_dir / VTI_FILE``."""
    demos = read_demos(write_vti_demos(config, work, 2 * DEFAULTS["demos"]))
    fitted = fit_vti(cm.adapter, demos, model_name=model_dir.name, log=log)
    return save_fitted(fitted, model_dir / VTI_FILE)
