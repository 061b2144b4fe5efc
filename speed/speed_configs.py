"""The configurations ``decode_speed.py`` measures, its named groups (``--group``), and the layer settings of the
methods whose official ones are for a 32-layer LLM, scaled to the preset's depth (:func:`at_depth`).

Each configuration is ``(name, kind, config)``; the kind says how it runs: ``engine`` (our engine), ``unshared``,
``full head``, ``dynamic cache`` (our engine with one optimisation off, :data:`SWITCHES_OFF`), ``eager`` (every
attention call on eager maths), ``sequential`` (the sequential reference) and ``mitigv`` (a peer row, added by
the script where mitigv is installed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from causalmm import CausalMMConfig

CONFIGS: list[tuple[str, str, CausalMMConfig]] = [
    ("regular greedy", "engine", CausalMMConfig(method="regular")),
    ("causalmm vision K=1", "engine", CausalMMConfig(mode="vision")),
    ("causalmm language K=1", "engine", CausalMMConfig(mode="language")),
    ("causalmm language K=1, no layer sharing", "unshared", CausalMMConfig(mode="language")),
    ("causalmm multimodal K=1", "engine", CausalMMConfig(mode="multimodal")),
    ("causalmm multimodal K=1, no layer sharing", "unshared", CausalMMConfig(mode="multimodal")),
    ("causalmm joint K=1", "engine", CausalMMConfig(mode="joint")),
    ("causalmm vision K=1, full head", "full head", CausalMMConfig(mode="vision")),
    ("causalmm multimodal K=1, full head", "full head", CausalMMConfig(mode="multimodal")),
    ("regular greedy, eager attention", "eager", CausalMMConfig(method="regular")),
    ("causalmm vision K=1, eager attention", "eager", CausalMMConfig(mode="vision")),
    ("causalmm multimodal K=1, eager attention", "eager", CausalMMConfig(mode="multimodal")),
    ("regular greedy, DynamicCache", "dynamic cache", CausalMMConfig(method="regular")),
    ("causalmm vision K=1, DynamicCache", "dynamic cache", CausalMMConfig(mode="vision")),
    ("causalmm multimodal K=1, DynamicCache", "dynamic cache", CausalMMConfig(mode="multimodal")),
    ("causalmm vision K=4", "engine", CausalMMConfig(mode="vision", num_cf_samples=4)),
    ("causalmm multimodal K=4", "engine", CausalMMConfig(mode="multimodal", num_cf_samples=4)),
    ("vcd", "engine", CausalMMConfig(method="vcd")),
    # the baselines at their official defaults, and the original release's feature gate
    ("causalmm gate K=1", "engine", CausalMMConfig(mode="vision", vision_style="gate")),
    ("icd", "engine", CausalMMConfig(method="icd")),
    ("m3id", "engine", CausalMMConfig(method="m3id")),
    ("pai", "engine", CausalMMConfig(method="pai")),
    ("avisc", "engine", CausalMMConfig(method="avisc")),
    ("sid", "engine", CausalMMConfig(method="sid")),
    ("sid, no layer sharing", "unshared", CausalMMConfig(method="sid")),
    ("dola", "engine", CausalMMConfig(method="dola")),
    ("deco", "engine", CausalMMConfig(method="deco")),
    # beam search (5 beams, the CHAIR protocols' and OPERA's), each row against "regular beams 5"
    ("regular beams 5", "engine", CausalMMConfig(method="regular")),
    ("causalmm language K=1 beams 5", "engine", CausalMMConfig(mode="language")),
    ("causalmm multimodal K=1 beams 5", "engine", CausalMMConfig(mode="multimodal")),
    ("vcd beams 5", "engine", CausalMMConfig(method="vcd")),
    ("opera", "engine", CausalMMConfig(method="opera")),
    ("opera fast", "engine", CausalMMConfig(method="opera", params={"threshold": 25, "candidates": 1})),
    # VISTA, VAF and MemVR at their official settings; their layer settings are scaled to the preset's LLM depth by
    # at_depth before the run. MemVR's entropy threshold is kept at the official 0.75, which the random presets'
    # early exits mostly exceed (normalised top-10 entropy about 0.6-0.98 after each layer with their std-3 LM
    # head), so the read triggers: in every forward of 8-layer tiny-shaped models, in one of four of a 4-layer one.
    # The script prints in how many forwards it did (none where the LLM has 2 layers: see depth_params).
    ("ritual", "engine", CausalMMConfig(method="ritual")),
    ("agla", "engine", CausalMMConfig(method="agla")),  # a tiny random BLIP matcher: with_fits
    ("vista", "engine", CausalMMConfig(method="vista")),
    ("vti", "engine", CausalMMConfig(method="vti")),  # its directions fitted on the preset's model: with_fits
    ("vaf", "engine", CausalMMConfig(method="vaf")),
    ("memvr", "engine", CausalMMConfig(method="memvr", params={"threshold": 0.75})),
    ("only", "engine", CausalMMConfig(method="only")),
    ("sequential ref. vision", "sequential", CausalMMConfig(mode="vision")),
    ("sequential ref. multimodal", "sequential", CausalMMConfig(mode="multimodal")),
]


#: named groups of configurations (``--group``)
GROUPS: dict[str, tuple[str, ...]] = {
    "baselines": (
        "regular greedy", "causalmm multimodal K=1", "vcd", "causalmm gate K=1", "icd", "m3id", "pai", "avisc", "sid",
        "dola", "deco",
    ),
    "beams": (
        "regular greedy", "regular beams 5", "causalmm language K=1 beams 5", "causalmm multimodal K=1 beams 5",
        "vcd beams 5", "opera", "opera fast",
    ),
    "methods2": ("regular greedy", "ritual", "agla", "vista", "vti", "vaf", "memvr", "only"),
}  # fmt: skip

#: generation options of the rows that decode by beam search (OPERA takes its own 5)
BEAM_ROWS = {name: {"num_beams": 5} for name, *_ in CONFIGS if name.endswith("beams 5")}

#: the optimisation a configuration kind turns off (its before/after rows)
SWITCHES_OFF = {
    "unshared": {"share_layers": False},
    "full head": {"plausible_head": False},
    "dynamic cache": {"preallocate_cache": False},
}


#: the LLM depth the official layer settings of VISTA, VAF and MemVR are for (LLaVA-1.5's Vicuna-7B)
OFFICIAL_DEPTH = 32


def _scaled(layer: int, n_layers: int) -> int:
    """Layer index ``layer`` of a 32-layer LLM at the same relative depth in one of ``n_layers`` (half rounds up)."""
    return int(layer * n_layers / OFFICIAL_DEPTH + 0.5)


def depth_params(method: str, n_layers: int) -> dict[str, Any]:
    """The layer settings of ``method`` for an LLM of ``n_layers`` layers: the official ones (for 32 layers) at the
    same relative depth, each span's ends scaled by ``n_layers / 32`` and rounded, then held inside what the method
    accepts on that model (at least one layer). At 32 layers they are the official settings exactly; empty for a
    method with no layer setting.

    - VISTA, ``logits_layers`` 25-30 (the span [25, 31) of 32): scaled, and ended below the last layer (whose output
      is the final logits' own, refused): 6-6 of 8 layers, 2-2 of 4, 0-0 of 2.
    - VAF, ``layers`` 9-14 (the span [9, 15)): scaled: 2-3 of 8 layers, 1-1 of 4, 1-1 of 2.
    - MemVR, ``start`` 5 / ``end`` 16 (the layers strictly between them may trigger a read in the next one): both
      scaled, and kept two apart where the LLM has 3 layers or more so that one layer can trigger: 1 / 4 of 8 layers,
      1 / 3 of 4. An LLM of 2 layers admits only 0 / 1, which leaves no layer to trigger: there the row times the
      method's set-up without the read (the script says so).
    """
    if method == "vista":
        hi = min(_scaled(31, n_layers), n_layers - 1)
        lo = max(0, min(_scaled(25, n_layers), hi - 1))
        return {"logits_layers": f"{lo}-{hi - 1}"}
    if method == "vaf":
        lo = min(_scaled(9, n_layers), n_layers - 1)
        hi = min(max(_scaled(15, n_layers), lo + 1), n_layers)
        return {"layers": f"{lo}-{hi - 1}"}
    if method == "memvr":
        end = min(max(_scaled(16, n_layers), _scaled(5, n_layers) + 2), n_layers - 1)
        start = max(0, min(_scaled(5, n_layers), end - 2))
        return {"start": start, "end": end}
    return {}


def at_depth(config: CausalMMConfig, n_layers: int) -> CausalMMConfig:
    """``config`` with its method's layer settings scaled to an LLM of ``n_layers`` layers (:func:`depth_params`)."""
    scaled = depth_params(config.method, n_layers)
    return config.replace(params={**config.params, **scaled}) if scaled else config


def with_fits(config: CausalMMConfig, cm: Any, image: Any, prompt: str) -> CausalMMConfig:
    """``config`` with what its method reads beside the model: VTI's directions fitted on the preset's model, from
    one demo (the timed image, 2 masked trials; the shift costs the same whatever they hold, and the file is the
    model's own, as VTI requires); AGLA's matcher, a tiny random BLIP ITM model with the official 384-pixel input
    (no hub here: BLIP-large's own cost would add to the prefill, not to the per-token figure)."""
    if config.method == "agla":
        from causalmm.matcher import DEFAULT_MATCHER
        from causalmm.tiny.blip import build_tiny_matcher

        if config.param("matcher") != DEFAULT_MATCHER:
            return config
        matcher = build_tiny_matcher(tempfile.mkdtemp(prefix="causalmm-speed-agla-"), image_size=384)
        return config.replace(params={**config.params, "matcher": str(matcher)})
    if config.method != "vti" or config.param("vectors"):
        return config
    from causalmm.fit.store import save_fitted
    from causalmm.fit.vti import Demo, fit_vti

    root = Path(tempfile.mkdtemp(prefix="causalmm-speed-vti-"))
    image.save(root / "demo.png")
    demo = Demo(root / "demo.png", prompt, "A picture.", "A picture of a dog.")
    fit = fit_vti(cm.adapter, [demo], n_demos=1, trials=2, vision=not cm.adapter.packed)
    vectors = save_fitted(fit, root / "vti.safetensors")
    return config.replace(params={**config.params, "vectors": str(vectors)})
