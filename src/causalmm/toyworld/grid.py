"""What the toy-world study runs: the methods (headline and leaderboard), their defaults and ``tune``'s grid.

Every entry is a name in the tables (``causalmm/language``, ``pai``) mapped to the keyword arguments of
:class:`~causalmm.config.CausalMMConfig` (a method's own hyper-parameters under ``params``), plus ``num_beams``
for the rows that decode by beam search (:func:`split`). The grids are sized
to the model: the shipped one has 4 LLM layers, 3 vision-tower layers and 16 image tokens, so the layer choices
and SID's kept-token counts below are the official settings scaled to it, not the 32-layer values.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..config import CausalMMConfig
from ..methods import get_method

__all__ = ["BEAMS", "METHODS", "LEADERBOARD", "DEFAULTS", "grid", "seeded", "split"]

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

GAMMAS = (1.0, 2.0, 4.0)
EPSILONS = (0.01, 0.1)


def _product(base: dict[str, Any], **axes: tuple[Any, ...]) -> list[dict[str, Any]]:
    """``base`` with every combination of ``axes``; axes named ``params_x`` go under ``params`` as ``x``."""
    out = []
    for values in itertools.product(*axes.values()):
        settings = dict(base)
        params: dict[str, Any] = {}
        for key, value in zip(axes, values, strict=True):
            if key.startswith("params_"):
                params[key.removeprefix("params_")] = value
            else:
                settings[key] = value
        if params:
            settings["params"] = params
        out.append(settings)
    return out


def grid(n_vision_layers: int, n_text_layers: int) -> dict[str, list[dict[str, Any]]]:
    """method -> the settings ``tune`` tries (layer choices sized to the model).

    CausalMM and VCD sweep the layers intervened, gamma and epsilon, as the paper's ablations do; each baseline
    sweeps the knobs its paper reports (ICD/AvisC/SID alpha, M3ID's forgetting rate and gate, PAI's alpha,
    gamma and whether the prefill is edited, SID's kept tokens, RITUAL's alpha, AGLA's alpha, cut and share kept
    (with the model's own attention as its matcher), VISTA's strength and mix, VTI's
    strengths (its directions fitted beside the model: ``causalmm toyworld fit-vti``), VAF's
    factors and layers, MemVR's ratio and threshold, ONLY's gamma and beta, DoLa's candidate layers, DeCo's alpha
    and layers) around its official default, which every grid contains.
    """
    last_text = n_text_layers - 1
    half = n_text_layers // 2
    text_layers = ["all", f"0-{max(0, half - 1)}", f"{half}-{last_text}"]
    vision_layers = [None, "all"]  # None: the layer that feeds the LLM
    ge = {"gamma": GAMMAS, "epsilon": EPSILONS}
    out: dict[str, list[dict[str, Any]]] = {"regular": [{"method": "regular"}]}
    out["vcd"] = _product({"method": "vcd"}, noise_step=(500, 999), **ge)
    out["causalmm/vision"] = _product({"method": "causalmm", "mode": "vision"}, vision_layers=vision_layers, **ge)
    out["causalmm/language"] = _product({"method": "causalmm", "mode": "language"}, language_layers=text_layers, **ge)
    # both branches: all LLM layers (the widest language setting), each vision choice
    out["causalmm/multimodal"] = _product(
        {"method": "causalmm", "mode": "multimodal", "language_layers": "all"}, vision_layers=vision_layers, **ge
    )
    out["causalmm/gate"] = _product(
        {"method": "causalmm", "mode": "vision", "vision_style": "gate"}, vision_layers=vision_layers, **ge
    )
    out["icd"] = _product({"method": "icd"}, **ge)
    out["m3id"] = _product({"method": "m3id"}, params_lamb=(0.02, 0.2, 1.0), params_alpha=(0.3, 1.0), epsilon=EPSILONS)
    out["pai"] = _product(
        {"method": "pai"}, gamma=(1.1, 2.0), params_alpha=(0.2, 0.5, 1.0), params_edit_prefill=(False, True)
    )
    out["avisc"] = _product({"method": "avisc"}, gamma=GAMMAS, params_lamb=(0.5, 1.0))
    out["sid"] = _product({"method": "sid"}, gamma=(0.5, 1.0, 2.0), params_keep=(2, 4, 8))
    out["ritual"] = _product({"method": "ritual"}, params_alpha=(1.0, 3.0, 5.0), params_size=(48,), epsilon=EPSILONS)
    # AGLA with the model's own attention as its matcher: alpha around the official 2, the cut's official 0.5 and
    # 0.1, the share kept around what the ITC rule keeps
    out["agla"] = _product(
        {"method": "agla"}, params_matcher=("self",), params_alpha=(1.0, 2.0, 3.0), params_keep=(0.5, 0.75),
        epsilon=(0.1, 0.5),
    )  # fmt: skip
    # the single-pass edits, their official layers scaled to the model's depth (see DEFAULTS) and their strengths
    # around the official values: VISTA's lam (POPE 0.01, MMHal 0.1, CHAIR 0.17) and mix, VAF's factors, MemVR's
    # ratio (MME 0.12, CHAIR 0.31) and threshold
    late, middle = f"{max(0, last_text - 2)}-{max(0, last_text - 1)}", str(max(0, half - 1))
    out["vista"] = _product(
        {"method": "vista"}, params_lam=(0.01, 0.1, 0.17), params_mix=(0.1, 0.3, 0.5), params_logits_layers=(late,)
    )
    # VTI: its strengths around the official 0.9 (MMHal), the tower's 0 too (the text direction alone)
    out["vti"] = _product(
        {"method": "vti"}, params_vectors=("vti.safetensors",), params_alpha_text=(0.3, 0.9, 2.0),
        params_alpha_image=(0.0, 0.9, 2.0),
    )  # fmt: skip
    out["vaf"] = _product(
        {"method": "vaf"}, params_enhance=(1.15, 1.5, 2.0), params_suppress=(0.95, 0.5),
        params_layers=(middle, f"{middle}-{max(0, last_text - 1)}"),
    )  # fmt: skip
    out["memvr"] = _product(
        {"method": "memvr"}, params_ratio=(0.12, 0.31, 0.6), params_threshold=(0.75, 0.5), params_start=(0,),
        params_end=(last_text,),
    )  # fmt: skip
    out["only"] = _product({"method": "only"}, gamma=(0.2, 0.25, 0.6), epsilon=(0.1, 0.4))
    out["dola"] = _product({"method": "dola"}, params_layers=("low", "high", f"0-{half}"), epsilon=EPSILONS)
    out["deco"] = _product({"method": "deco"}, params_alpha=(0.2, 0.6, 1.0), params_layers=("auto", f"1-{last_text}"))
    # beam search: the beams' regular decoding, CausalMM's language branch with beams (its greedy grid), and OPERA
    # (official and fast settings; a 3-token answer only ever gets its image term, so its weight is swept)
    out["regular/beams"] = [{"method": "regular", "num_beams": BEAMS}]
    out["causalmm/language/beams"] = [{**s, "num_beams": BEAMS} for s in out["causalmm/language"]]
    out["opera"] = _product({"method": "opera"}, params_candidates=(5, 1), params_penalty=(1.0, 4.0))
    return out


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
