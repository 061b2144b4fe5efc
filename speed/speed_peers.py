"""The peer rows of ``decode_speed.py``: mitigv's implementation of a method we share, on the same model.

mitigv (``pip install mitigv``; 0.1.7 was timed) is optional: where it is not importable, :func:`mitigv_peer`
returns None and the script prints that its rows were not timed.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image
from speed_measure import Peak, Sample

from causalmm import CausalMM

#: mitigv's name and keyword arguments for each method it shares with us, set to our defaults (its own names:
#: ICD's lam/alpha are our gamma/epsilon, PAI's beta our epsilon, M3ID's forgetting_rate our lamb, VISTA's
#: steer_strength our lam)
MITIGV_PEERS: dict[str, dict[str, float]] = {
    "vcd": {"alpha": 1.0, "beta": 0.1},
    "icd": {"lam": 1.0, "alpha": 0.1},
    "pai": {"alpha": 0.2, "gamma": 1.1, "beta": 0.1},
    "m3id": {"alpha": 0.3, "forgetting_rate": 0.02},
    "opera": {"num_beams": 5, "sigma": 50, "threshold": 15, "num_attn_candidates": 5, "penalty_weight": 1},
    # mitigv's VISTA (algorithms/vista.py) is the steering alone, added to each decoder layer's output; ours also
    # keeps the norm-preserving gated form on the MLP outputs and mixes the late layers' logits in (mix 0.3), so
    # ours does more work per token than the peer
    "vista": {"steer_strength": 0.01},
    # mitigv's ONLY (algorithms/only.py) runs a second full forward per step with the chosen heads zeroed; ours
    # recomputes layer 0's attention for the newest query on the side and takes it through the last layer's MLP
    "only": {"alpha1": 3.0, "alpha2": 1.0, "gamma": 0.2},
    # mitigv's AGLA (algorithms/agla.py) has no matcher model: one eager probe forward gives the last prompt token's
    # attention on the image, and a square around its centroid is cropped; ours runs BLIP ITM's GradCAM (here the
    # tiny random matcher the speed script builds: its cost is in the prefill, not in the per-token figure)
    "agla": {"alpha": 2.0, "crop_ratio": 0.5},
}

#: forward calls a mitigv call makes before it generates, whatever its length: VISTA's two probe prefills (the
#: prompt with its image and without) that give its steering vectors, AGLA's eager probe for its saliency
MITIGV_PROBES: dict[str, int] = {"vista": 2, "agla": 1}


def mitigv_peer(cm: CausalMM, method: str) -> Any | None:
    """mitigv's implementation of ``method`` (a peer library on transformers 5) on the same model, eos disabled;
    None if mitigv is not installed."""
    try:
        from mitigv import load_mitigator
    except ImportError:
        return None
    peer = load_mitigator(
        method, model=cm.model, processor=cm.adapter.processor, model_type="llava", **MITIGV_PEERS[method]
    )
    peer._eos_token_id = lambda: None  # full length, as for our engine
    # mitigv 0.1.7 looks for the decoder layers (PAI's and OPERA's attention edits, VISTA's steering) at its
    # adapter's `.language_model` or `.model.language_model`; on transformers 5.24 they sit one level deeper
    # (`model.model.language_model`), so it finds none and refuses. Point it at them; nothing else is changed.
    if getattr(peer.model, "language_model", None) is None:
        peer.model.language_model = cm.adapter.lm
    return peer


def run_mitigv(
    peer: Any, model: torch.nn.Module, image: Image.Image, prompt: str, n: int, device: str, probes: int = 0
) -> Sample:
    """Its prefill is the time of a 1-token call; per token, the difference to an n-token call over n - 1.

    It returns text only, so the tokens it generated are counted from the model's forward calls: past its
    ``probes`` forwards before generating (:data:`MITIGV_PROBES`), the n-token call must make n times the calls of
    the 1-token call, or the timing would be of a shorter answer."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with Peak(device) as peak:
            t0 = time.perf_counter()
            peer(image, prompt, max_new_tokens=1)
            sync()
            t1 = time.perf_counter()
            one = len(calls)
            peer(image, prompt, max_new_tokens=n)
            sync()
            t2 = time.perf_counter()
    finally:
        handle.remove()
    per_token = one - probes
    if per_token <= 0 or len(calls) - one - probes != n * per_token:
        raise RuntimeError(
            f"mitigv's {n}-token call made {len(calls) - one} forward calls, its 1-token call {one} (of which "
            f"{probes} before generating): it did not generate the full length, so its time per token would be wrong"
        )
    first = t1 - t0
    return Sample(first, ((t2 - t1) - first) / max(1, n - 1), peak.value)
