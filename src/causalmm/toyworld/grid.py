"""What the toy-world study runs: the methods (headline and leaderboard), their defaults and ``tune``'s grid.

Every entry is a name in the tables (``causalmm/language``, ``pai``) mapped to the keyword arguments of
:class:`~causalmm.config.CausalMMConfig` (a method's own hyper-parameters under ``params``), plus ``num_beams``
for the rows that decode by beam search (:func:`split`). The grids are sized
to the model: the shipped one has 4 LLM layers, 3 vision-tower layers and 16 image tokens, so the layer choices
and SID's kept-token counts below are the official settings scaled to it, not the 32-layer values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import CausalMMConfig
from ..methods import get_method
from ..tuning.grid import Row
from ..tuning.grid import grid as tuning_grid

__all__ = ["BEAMS", "METHODS", "LEADERBOARD", "DEFAULTS", "grid", "rows", "seeded", "split"]

#: the beam rows' number of beams (OPERA's and the CHAIR protocols' 5)
BEAMS = 5

#: the default demo's methods, in table order (``causalmm demo``)
METHODS: tuple[str, ...] = ("regular", "vcd", "causalmm/vision", "causalmm/language", "causalmm/multimodal")

#: the full leaderboard (``causalmm demo --all``): the headline methods, the original release's feature gate and
#: every baseline of the registry (AGLA with the model's own attention as its matcher: no BLIP weights fit these images)
LEADERBOARD: tuple[str, ...] = (
    *METHODS, "causalmm/gate", "icd", "m3id", "pai", "avisc", "sid", "ritual", "agla", "vista", "vti", "vaf",
    "memvr", "only", "dola", "deco",
    "regular/beams", "causalmm/language/beams", "opera",
)  # fmt: skip

#: settings used where the model directory's tuning.json has no choice for a method: each method's own defaults
DEFAULTS: dict[str, dict[str, Any]] = {
    "regular": {"method": "regular"},
    "vcd": {"method": "vcd", "gamma": 1.0, "epsilon": 0.1},
    "causalmm/vision": {"method": "causalmm", "mode": "vision", "gamma": 1.0, "epsilon": 0.1},
    "causalmm/language": {"method": "causalmm", "mode": "language", "gamma": 1.0, "epsilon": 0.1},
    "causalmm/multimodal": {"method": "causalmm", "mode": "multimodal", "gamma": 1.0, "epsilon": 0.1},
    "causalmm/gate": {"method": "causalmm", "mode": "vision", "vision_style": "gate", "gamma": 1.0, "epsilon": 0.1},
    **{name: {"method": name} for name in ("icd", "m3id", "pai", "avisc")},
    "sid": {"method": "sid", "params": {"keep": 4}},  # 100 of 576 image tokens in LLaVA-1.5; 16 here
    "ritual": {"method": "ritual", "params": {"size": 48}},  # the crop to the model's input side (LLaVA-1.5: 336)
    "agla": {"method": "agla", "params": {"matcher": "self"}},  # no BLIP matcher knows these images
    # the single-pass edits' official layers are LLaVA-1.5's 32, scaled to the shipped models' 4: VISTA's late
    # layers below the last (25-30 of 32), VAF's middle (9-14 of 32), MemVR's window (5 < l < 16 of 32)
    "vista": {"method": "vista", "params": {"logits_layers": "1-2"}},
    "vti": {"method": "vti", "params": {"vectors": "vti.safetensors"}},  # `causalmm toyworld fit-vti` writes it
    "vaf": {"method": "vaf", "params": {"layers": "1"}},
    "memvr": {"method": "memvr", "params": {"start": 0, "end": 3}},
    "only": {"method": "only"},  # its layer 0 and the last layer fit any depth
    **{name: {"method": name} for name in ("dola", "deco")},
    "regular/beams": {"method": "regular", "num_beams": BEAMS},
    "causalmm/language/beams": {"method": "causalmm", "mode": "language", "gamma": 1.0, "epsilon": 0.1,
                                "num_beams": BEAMS},
    "opera": {"method": "opera"},
}  # fmt: skip


def rows(n_vision_layers: int, n_text_layers: int) -> dict[str, tuple[Row, dict[str, tuple[Any, ...]]]]:
    """name -> (the row: the settings it fixes, its overrides of the registry's grid), sized to the model.

    Each grid is the registry's (:mod:`causalmm.tuning.grid`: the values each parameter declares, the official one
    among them), as ``causalmm tune`` builds it for a benchmark; what is fixed or overridden here is what a
    4-layer model with 16 image tokens needs in place of LLaVA-1.5's 32 layers and 576 tokens: the layer choices
    (CausalMM's language layers: all, the first half, the second half; VAF's, DoLa's and DeCo's layers; VISTA's
    and MemVR's fixed windows), SID's kept-token counts, RITUAL's crop side, AGLA's matcher (the model's own
    attention: no BLIP weights know these images) and VTI's fitted directions. CausalMM's multimodal row fixes
    the widest language setting (all layers) and sweeps the vision choice.
    """
    last_text = n_text_layers - 1
    half = n_text_layers // 2
    text_layers = ("all", f"0-{max(0, half - 1)}", f"{half}-{last_text}")
    late, middle = f"{max(0, last_text - 2)}-{max(0, last_text - 1)}", str(max(0, half - 1))
    language = {"language_layers": text_layers}
    table: dict[str, tuple[dict[str, Any], dict[str, tuple[Any, ...]]]] = {
        "regular": ({"method": "regular"}, {}),
        "vcd": ({"method": "vcd"}, {}),
        "causalmm/vision": ({"method": "causalmm", "mode": "vision"}, {}),
        "causalmm/language": ({"method": "causalmm", "mode": "language"}, language),
        "causalmm/multimodal": ({"method": "causalmm", "mode": "multimodal", "language_layers": "all"}, {}),
        "causalmm/gate": ({"method": "causalmm", "mode": "vision", "vision_style": "gate"}, {}),
        "icd": ({"method": "icd"}, {}),
        "m3id": ({"method": "m3id"}, {}),
        "pai": ({"method": "pai"}, {}),
        "avisc": ({"method": "avisc"}, {}),
        "sid": ({"method": "sid"}, {"keep": (2, 4, 8)}),
        "ritual": ({"method": "ritual", "params": {"size": 48}}, {}),
        "agla": ({"method": "agla", "params": {"matcher": "self"}}, {}),
        "vista": ({"method": "vista", "params": {"logits_layers": late}}, {}),
        "vti": ({"method": "vti", "params": {"vectors": "vti.safetensors"}}, {}),
        "vaf": ({"method": "vaf"}, {"layers": (middle, f"{middle}-{max(0, last_text - 1)}")}),
        "memvr": ({"method": "memvr", "params": {"start": 0, "end": last_text}}, {}),
        "only": ({"method": "only"}, {}),
        "dola": ({"method": "dola"}, {"layers": ("low", "high", f"0-{half}")}),
        "deco": ({"method": "deco"}, {"layers": ("auto", f"1-{last_text}")}),
        "regular/beams": ({"method": "regular", "num_beams": BEAMS}, {}),
        "causalmm/language/beams": ({"method": "causalmm", "mode": "language", "num_beams": BEAMS}, language),
        "opera": ({"method": "opera"}, {}),
    }
    return {name: (Row(name, fixed), overrides) for name, (fixed, overrides) in table.items()}


def grid(n_vision_layers: int, n_text_layers: int) -> dict[str, list[dict[str, Any]]]:
    """method -> the settings ``tune`` tries: each row's whole grid (:func:`rows`; no budget: they are small)."""
    return {
        name: tuning_grid(row, overrides) for name, (row, overrides) in rows(n_vision_layers, n_text_layers).items()
    }


def split(settings: dict[str, Any], model_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A setting's :class:`CausalMMConfig` keywords and its generation options (``num_beams``); a file a method
    reads (VTI's ``vectors``) named relative to the model is resolved against ``model_dir``."""
    config = {k: v for k, v in settings.items() if k != "num_beams"}
    vectors = config.get("params", {}).get("vectors")
    if model_dir is not None and vectors and not Path(vectors).is_absolute():
        config["params"] = {**config["params"], "vectors": str(model_dir / vectors)}
    return config, ({"num_beams": settings["num_beams"]} if "num_beams" in settings else {})


#: counterfactual attention maps that draw random numbers (the others are functions of the factual map)
_RANDOM_MAPS = ("random", "shuffle")


def seeded(settings: dict[str, Any]) -> bool:
    """Whether a setting's answers depend on the counterfactual seed (VCD's noise, RITUAL's transform, random or
    shuffled attention):
    the demo runs those over every seed and the others once, since more seeds would repeat the same answers."""
    config = CausalMMConfig(**split(settings)[0])
    method = get_method(config.method)
    for branch in method.branches(config):
        if branch.noise or (branch.transform and method.random_transform):
            return True
        if branch.vision and config.vision_cf in _RANDOM_MAPS:
            return True
        if branch.language and config.language_cf in _RANDOM_MAPS:
            return True
    return False
