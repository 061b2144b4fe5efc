"""Decode speed of CausalMM against regular decoding, measured side by side in one run.

    python speed/decode_speed.py                       # CPU preset (~50M LLaVA, 576 image tokens)
    python speed/decode_speed.py --preset toyworld     # the embedded toy-world model (trained, 16 image tokens)
    python speed/decode_speed.py --preset llava7b      # 7B-shaped LLaVA-1.5 in bf16, CUDA only
    python speed/decode_speed.py --preset tiny --new-tokens 8 --reps 1    # a smoke run
    python speed/decode_speed.py --memory              # CPU: also peak RSS, one fresh process per config

For each configuration it measures prefill time, per-token decode latency and peak memory, repeating the
configurations interleaved (rep 1 of every config, then rep 2, ...) so drift hits all alike, and prints
medians, spreads and ratios to regular greedy decoding. Weights are random (no download; speed does not
depend on them) except for the toy-world preset's, and generation is forced to the full length (eos disabled).
Before/after rows of the optimisations: "eager attention" runs every attention call on eager maths, as the
original code does (the before of routing the calls that are not intervened to SDPA); "no layer sharing" runs
language rows through every LLM layer; "full head" runs the LM head on every row in decode steps (the before of
computing counterfactual logits on the plausible tokens only, ``causalmm.decoding.head``); "DynamicCache" grows
the KV cache by ``torch.cat`` at every step (the before of writing it in place, ``causalmm.decoding.cache``). It
also times one pass over the decoder layers' linear weights with 1, 2 and 3 rows, as ``F.linear`` and laid out
as ``W @ x.T``: what this machine's BLAS charges per extra row, a floor under any batched engine's ratio here.

The *sequential reference* runs every branch as its own batch-1 forward pass per token with its own KV cache,
which is what the original CausalMM code and its peers do; our engine runs all branches as rows of one
batched forward per step. Where the peer library ``mitigv`` is installed, its VCD, ICD, PAI and M3ID run on the
same model beside ours (``--group baselines``: regular, CausalMM, the gate and every baseline, with those peers);
``--group beams``: regular, CausalMM and VCD with 5 beams against regular 5-beam decoding, and OPERA (official and
fast settings) beside mitigv's OPERA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from causalmm import CausalMM, CausalMMConfig
from causalmm.attention import Intervention, attention_name, intervene
from causalmm.config import ConfigError
from causalmm.decoding import GenerationOptions, contrast
from causalmm.decoding.features import ImageFeatures
from causalmm.seeds import derive_seed

# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


def build_llava(preset: str, device: str, dtype: torch.dtype) -> CausalMM:
    """A LLaVA-architecture model with random weights, shaped by ``preset``, wrapped with CausalMM."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from causalmm.tiny import build_tokenizer
    from causalmm.tiny.chat_templates import LLAVA as _LLAVA_CHAT_TEMPLATE

    tok = build_tokenizer("llava")
    image_token = tok.convert_tokens_to_ids("<image>")
    shapes = {
        # CLIP ViT-L/14-336 + Vicuna-7B, as published in llava-hf/llava-1.5-7b-hf's config
        "llava7b": dict(v=(1024, 24, 16, 4096), t=(4096, 32, 32, 11008), vocab=32064, image=336, patch=14),
        # ~50M parameters, 576 image tokens (24x24 patches of 14 px), answer 64 tokens
        "cpu": dict(v=(256, 4, 4, 1024), t=(512, 8, 8, 1408), vocab=32064, image=336, patch=14),
        # seconds-long smoke run
        "tiny": dict(v=(64, 2, 2, 128), t=(128, 2, 4, 256), vocab=1024, image=112, patch=14),
    }[preset]
    vh, vl, vheads, vff = shapes["v"]
    th, tl, theads, tff = shapes["t"]
    vision = CLIPVisionConfig(
        hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads, intermediate_size=vff,
        image_size=shapes["image"], patch_size=shapes["patch"], projection_dim=th,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=th, num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=theads,
        intermediate_size=tff, vocab_size=shapes["vocab"], max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
        # A trained model's next-token distribution is peaked: a handful of tokens pass the plausibility cut.
        # Random weights of the usual scale give logits of std ~0.5, so nearly the whole vocabulary would, and
        # the counterfactual logits could not be computed on the plausible tokens only. Logits of std 3
        # (hidden states of unit RMS after the final norm) leave about ten of 32k at epsilon 0.1.
        torch.nn.init.normal_(model.lm_head.weight, std=3.0 / th**0.5)
    model.generation_config.eos_token_id = None
    size = shapes["image"]
    improc = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=improc, tokenizer=tok, patch_size=shapes["patch"], vision_feature_select_strategy="default",
        chat_template=_LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    return CausalMM(model, processor, CausalMMConfig(method="regular"), base="sdpa")


def build_toyworld(device: str) -> tuple[CausalMM, Image.Image, str]:
    """The embedded toy-world model (trained weights, shipped in the package), a test-split scene of the world it
    was trained on, and the caption prompt it was trained with."""
    from causalmm.toyworld.demo import trained_world
    from causalmm.toyworld.model import shipped_model_path
    from causalmm.toyworld.render import render
    from causalmm.toyworld.splits import eval_scenes
    from causalmm.toyworld.texts import CAPTION_PROMPT

    path = shipped_model_path()
    cm = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"), base="sdpa")
    cm.model.to(device)
    world = trained_world(path)
    return cm, render(world, eval_scenes(world, "test", 1)[0]), CAPTION_PROMPT


def build(preset: str, device: str, dtype: torch.dtype) -> tuple[CausalMM, Image.Image, str]:
    """(model, image, prompt) of a preset; generation is forced to the full length by the runners (eos off)."""
    if preset == "toyworld":
        return build_toyworld(device)
    image = Image.radial_gradient("L").resize((400, 300)).convert("RGB")
    return build_llava(preset, device, dtype), image, "Please describe this image in detail."


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------


class _Peak:
    """Peak CUDA memory above the level at entry (allocator stats). On CPU it measures nothing: RSS in a
    long-lived process is no per-run peak (freed pages are reused), so ``--memory`` measures each configuration
    in a fresh process instead (:func:`cpu_peaks`), and no sampling thread disturbs the timings."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.value = 0

    def __enter__(self) -> _Peak:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def cpu_peak_in_this_process(run: Any) -> tuple[int, int]:
    """(bytes of resident memory ``run()`` adds at its peak, resident bytes before it) on Linux: free pages go
    back to the OS first (``malloc_trim``), the kernel's high-water mark is reset (``clear_refs`` 5), and VmHWM
    is read after. Meaningful in a fresh process that ran nothing else big, which is how ``--memory`` calls it."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) * 1024, base * 1024


def cpu_peaks(preset: str, names: list[str], new_tokens: int) -> dict[str, tuple[int, int]]:
    """Each configuration's CPU (peak above the loaded model, resident before the run), each in its own fresh
    interpreter (so no freed pages are reused)."""
    import json
    import subprocess

    out = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--preset", preset, "--new-tokens", str(new_tokens), "--peak-of", name],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = (rec["peak_bytes"], rec["base_bytes"])
        print(f"peak {name}: +{out[name][0] / 2**20:.0f} MiB over {out[name][1] / 2**20:.0f} MiB", file=sys.stderr)
    return out


class _StepClock:
    """Timestamps of every forward call of the model: the first is the prefill, the rest are decode steps."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.cuda = model, device.startswith("cuda")

    def __enter__(self) -> _StepClock:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.handles = [
            self.model.register_forward_pre_hook(lambda *a: self.starts.append(self._now())),
            self.model.register_forward_hook(lambda *a: self.ends.append(self._now())),
        ]
        return self

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def attention_base(cm: CausalMM, base: str) -> Iterator[None]:
    """Run every attention call that is not intervened on ``base`` ("eager": the before of the SDPA optimisation,
    as the original code runs all attention), then switch the model back."""
    before = cm.adapter.lm_attn[0].config._attn_implementation
    cm.model.set_attn_implementation(attention_name(base))
    try:
        yield
    finally:
        cm.model.set_attn_implementation(before)


@dataclass
class Sample:
    prefill: float
    per_token: float
    peak: int


def run_engine(
    cm: CausalMM,
    config: CausalMMConfig,
    image: Image.Image,
    prompt: str,
    n: int,
    device: str,
    options: dict[str, Any] | None = None,
    **switches: bool,
) -> Sample:
    """One generation of ``n`` tokens with our engine (all branches batched); ``switches`` turn optimisations off
    (``share_layers=False``, ``plausible_head=False``: the before of each); ``options``: more generation options
    (``num_beams``). OPERA runs two forwards per token (its candidates, then the chosen tokens) and a rollback
    more: its time per token is everything after the prefill over the ``n`` tokens."""
    runner = cm.with_config(config, **switches)
    runner.engine.eos = set()
    with _Peak(device) as peak, _StepClock(cm.model, device) as clock:
        t0 = clock._now()
        runner.engine.generate([image], [prompt], GenerationOptions(max_new_tokens=n, **(options or {})))
        t1 = clock._now()
    if config.method == "opera":
        return Sample(clock.ends[0] - t0, (t1 - clock.ends[0]) / n, peak.value)
    # the last n - 1 forwards are the decode steps; prefill is everything before them (vision tower, features, the
    # first LLM pass, and AvisC's probe prefill where it runs one)
    if len(clock.ends) < n:
        raise RuntimeError(f"{n} tokens took {len(clock.ends)} forward calls: the step clock cannot time them")
    first = clock.ends[len(clock.ends) - n]
    return Sample(first - t0, (t1 - first) / max(1, n - 1), peak.value)


@torch.no_grad()
def run_sequential(
    cm: CausalMM, config: CausalMMConfig, image: Image.Image, prompt: str, n: int, device: str
) -> Sample:
    """The peers' way: each branch is its own batch-1 forward per token with its own cache (greedy, K=1)."""
    from transformers import DynamicCache

    engine = cm.with_config(config).engine
    ad = cm.adapter
    seed = config.seed
    with _Peak(device) as peak:
        t0 = time.perf_counter()
        enc = ad.encode(image, prompt)
        imgs = [ad.image_inputs(enc)]
        branches = [None, *engine.branches]
        kinds = {"factual"} | {b.image for b in engine.branches}
        features = ImageFeatures(ad, engine.config, engine.vision_rule)
        feats = {kind: features.compute(imgs, kind, [seed], 1)[(0, 0)] for kind in kinds}
        ids = enc["input_ids"].to(ad.device)
        mask = enc["attention_mask"].to(ad.device)
        meta = {k: v.to(ad.device) for k, v in imgs[0].items() if k != "pixel_values"}
        pos0 = ad.prefill_positions({"input_ids": ids, "attention_mask": mask}, meta)
        state = []
        for b in branches:
            feat = feats["factual" if b is None else b.image]
            gen = None
            if b is not None and b.language:
                gen = torch.Generator(device=ad.device).manual_seed(derive_seed(seed, "language", b.name, 0))
            cache = DynamicCache(config=ad.model.config.get_text_config())
            inputs = {"input_ids": ids, **ad.features_input([feat])}
            state.append({"gen": gen, "cache": cache, "pos": pos0, "mask": mask, "inputs": inputs})
        prefill = None
        for step in range(n):
            logits = []
            for s in state:
                rule = Intervention(language=engine.language_rule, language_rows={0: s["gen"]}) if s["gen"] else None
                with intervene(rule or Intervention()):
                    out = ad.model(**s["inputs"], attention_mask=s["mask"], position_ids=s["pos"],
                                   past_key_values=s["cache"], use_cache=True, logits_to_keep=1)  # fmt: skip
                logits.append(out.logits[0, -1].float())
            z = (
                contrast(logits[0], logits[1:], gamma=config.gamma, epsilon=config.epsilon)
                if len(logits) > 1
                else logits[0]
            )
            tok = int(z.argmax())
            if step == 0:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                prefill = time.perf_counter() - t0
                t_first = time.perf_counter()
            for s in state:
                s["inputs"] = {"input_ids": torch.tensor([[tok]], device=ad.device)}
                s["pos"] = ad.next_positions(s["pos"])
                s["mask"] = torch.cat([s["mask"], s["mask"].new_ones(1, 1)], dim=1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
    return Sample(prefill, (t1 - t_first) / max(1, n - 1), peak.value)


def plausible_set_size(cm: CausalMM, image: Image.Image, prompt: str, n: int, device: str) -> tuple[float, int]:
    """(median number of tokens the plausibility cut keeps per decode step, vocabulary size), from the factual
    row's logits of a vision K=1 run: what ``plausible_head`` computes the counterfactual logits on."""
    from causalmm.decoding import plausible

    config = CausalMMConfig(mode="vision")
    sizes: list[int] = []
    hook = cm.model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: sizes.extend(plausible(out[:, -1], config.epsilon).sum(-1).tolist())
    )
    try:
        run_engine(cm, config, image, prompt, n, device)
    finally:
        hook.remove()
    return statistics.median(sizes[2:]), cm.model.get_output_embeddings().out_features  # after the prefill


#: mitigv's name and keyword arguments for each method it shares with us, set to our defaults (its own names:
#: ICD's lam/alpha are our gamma/epsilon, PAI's beta our epsilon, M3ID's forgetting_rate our lamb)
MITIGV_PEERS: dict[str, dict[str, float]] = {
    "vcd": {"alpha": 1.0, "beta": 0.1},
    "icd": {"lam": 1.0, "alpha": 0.1},
    "pai": {"alpha": 0.2, "gamma": 1.1, "beta": 0.1},
    "m3id": {"alpha": 0.3, "forgetting_rate": 0.02},
    "opera": {"num_beams": 5, "sigma": 50, "threshold": 15, "num_attn_candidates": 5, "penalty_weight": 1},
}


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
    # mitigv 0.1.7 looks for the decoder layers (PAI's and OPERA's attention edits) at its adapter's
    # `.language_model` or `.model.language_model`; on transformers 5.24 they sit one level deeper
    # (`model.model.language_model`), so it finds none and refuses. Point it at them; nothing else is changed.
    if getattr(peer.model, "language_model", None) is None:
        peer.model.language_model = cm.adapter.lm
    return peer


def run_mitigv(peer: Any, model: torch.nn.Module, image: Image.Image, prompt: str, n: int, device: str) -> Sample:
    """Its prefill is the time of a 1-token call; per token, the difference to an n-token call over n - 1.

    It returns text only, so the tokens it generated are counted from the model's forward calls: the n-token
    call must make n times the calls of the 1-token call, or the timing would be of a shorter answer."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with _Peak(device) as peak:
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
    if one == 0 or len(calls) - one != n * one:
        raise RuntimeError(
            f"mitigv's {n}-token call made {len(calls) - one} forward calls, its 1-token call {one}: it did not "
            "generate the full length, so its time per token would be wrong"
        )
    first = t1 - t0
    return Sample(first, ((t2 - t1) - first) / max(1, n - 1), peak.value)


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------

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
}  # fmt: skip

#: generation options of the rows that decode by beam search (OPERA takes its own 5)
BEAM_ROWS = {name: {"num_beams": 5} for name, *_ in CONFIGS if name.endswith("beams 5")}

#: the optimisation a configuration kind turns off (its before/after rows)
SWITCHES_OFF = {
    "unshared": {"share_layers": False},
    "full head": {"plausible_head": False},
    "dynamic cache": {"preallocate_cache": False},
}


def linear_cost_per_row(cm: CausalMM, device: str, reps: int = 5) -> dict[str, list[float]]:
    """Seconds one pass over every linear weight of the LLM's decoder layers takes, in layer order (the weights
    one decode step reads, less the LM head), for 1, 2 and 3 rows: as ``F.linear`` (what ``transformers``' layers
    call) and as the same product laid out ``W @ x.T``. Batching branches as rows is cheap only where a row costs
    much less than the weights' read; this measures what this machine's BLAS charges per row, in this run."""
    weights = [m.weight for layer in cm.adapter.lm_layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    out: dict[str, list[float]] = {"F.linear": [], "W @ x.T": []}
    now = _StepClock(cm.model, device)._now  # synchronises first on CUDA
    for rows in (1, 2, 3):
        xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights}
        for name in out:
            times = []
            for _ in range(reps + 1):
                t0 = now()
                for w in weights:
                    x = xs[w.shape[1]]
                    _ = torch.nn.functional.linear(x, w) if name == "F.linear" else w @ x.T
                times.append(now() - t0)
            out[name].append(statistics.median(times[1:]))
    return out


PRESETS = ("cpu", "toyworld", "llava7b", "tiny")


def resolve_device(preset: str, device: str | None) -> tuple[str, torch.dtype] | None:
    """(device, dtype) of a preset (the 7B preset: CUDA, bf16); None, after saying why, when CUDA is missing."""
    device = device or ("cuda" if preset == "llava7b" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {preset} needs a CUDA GPU; none is available here", file=sys.stderr)
        return None
    return device, torch.bfloat16 if preset == "llava7b" else torch.float32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda for llava7b, else cpu")
    parser.add_argument("--only", default=None, help="comma-separated substrings of config names to run")
    parser.add_argument("--group", choices=sorted(GROUPS), default=None, help="a named group of configurations")
    parser.add_argument(
        "--memory", action="store_true", help="CPU: also measure each config's peak RSS, each in a fresh process"
    )
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: one config's CPU peak
    args = parser.parse_args(argv)
    resolved = resolve_device(args.preset, args.device)
    if resolved is None:
        return 2
    device, dtype = resolved
    torch.set_grad_enabled(False)
    cm, image, prompt = build(args.preset, device, dtype)
    n_params = sum(p.numel() for p in cm.model.parameters())
    configs = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only.split(","))]
    if args.group:
        configs = [c for c in configs if c[0] in GROUPS[args.group]]
    if not configs:
        names = ", ".join(name for name, _, _ in CONFIGS)
        print(f"--only {args.only!r} matches no configuration; the names are: {names}", file=sys.stderr)
        return 2
    # mitigv beside each of our rows it has a method for (kept out of --only runs that select neither)
    peers = {}
    for name, _, cfg in list(configs):
        if name in MITIGV_PEERS and (peer := mitigv_peer(cm, name)) is not None:
            peers[name] = peer
            configs.append((f"mitigv {name} (peer)", "mitigv", cfg))

    def run(kind: str, cfg: CausalMMConfig, n: int, name: str = "") -> Sample:
        if kind == "mitigv":
            return run_mitigv(peers[cfg.method], cm.model, image, prompt, n, device)
        if kind == "sequential":
            return run_sequential(cm, cfg, image, prompt, n, device)
        if kind == "eager":
            with attention_base(cm, "eager"):
                return run_engine(cm, cfg, image, prompt, n, device)
        return run_engine(cm, cfg, image, prompt, n, device, BEAM_ROWS.get(name), **SWITCHES_OFF.get(kind, {}))

    run_engine(cm, configs[0][2], image, prompt, 2, device)  # warm-up
    if args.peak_of is not None:
        import json

        kind, cfg = next((k, c) for name, k, c in configs if name == args.peak_of)
        peak, base = cpu_peak_in_this_process(lambda: run(kind, cfg, args.new_tokens, args.peak_of))
        print(json.dumps({"peak_bytes": peak, "base_bytes": base}))
        return 0
    skipped_peers: dict[str, str] = {}
    for entry in list(configs):  # a configuration's first run pays one-time costs (allocator growth): untimed
        try:
            run(entry[1], entry[2], 2, entry[0])
        except ConfigError as err:  # a setting this model cannot take (PAI's start layer on a 2-layer LLM)
            print(f"skipped {entry[0]}: {err}", file=sys.stderr)
            configs.remove(entry)
        except Exception as err:  # noqa: BLE001  (a peer that refuses this model is reported, not fatal)
            if entry[1] != "mitigv":
                raise
            print(f"skipped {entry[0]}: mitigv failed: {type(err).__name__}: {err}", file=sys.stderr)
            configs.remove(entry)
            skipped_peers[entry[2].method] = f"{type(err).__name__}: {err}"
    results: dict[str, list[Sample]] = {name: [] for name, _, _ in configs}
    for rep in range(args.reps):
        for name, kind, cfg in configs:
            results[name].append(run(kind, cfg, args.new_tokens, name))
            print(
                f"rep {rep + 1}/{args.reps} {name}: {results[name][-1].per_token * 1e3:.1f} ms/token", file=sys.stderr
            )
    cuda = device.startswith("cuda")
    resident = {}
    if args.memory and not cuda:
        for name, (peak, base) in cpu_peaks(args.preset, [c[0] for c in configs], args.new_tokens).items():
            resident[name] = base
            for sample in results[name]:
                sample.peak = peak
    ref = statistics.median(s.per_token for s in results[configs[0][0]])
    ref_mem = max(1, statistics.median(s.peak for s in results[configs[0][0]]))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores visible)"
    print(f"\n## decode speed — preset {args.preset} ({n_params / 1e6:.3g}M params, {dtype}), {gpu}")
    print(f"{args.new_tokens} new tokens, {args.reps} interleaved repetitions, torch {torch.__version__}\n")
    print("| configuration | per-token ms (median [min, max]) | × regular | prefill ms | peak MiB | × regular mem |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in configs:
        rs = results[name]
        pt = [s.per_token * 1e3 for s in rs]
        med = statistics.median(pt)
        pre = statistics.median(s.prefill * 1e3 for s in rs)
        mem = statistics.median(s.peak for s in rs)
        mem_cells = f"{mem / 2**20:.0f} | {mem / ref_mem:.2f}" if cuda or args.memory else "n/a | n/a"
        print(
            f"| {name} | {med:.1f} [{min(pt):.1f}, {max(pt):.1f}] | {med / (ref * 1e3):.2f} | {pre:.0f} | {mem_cells} |"
        )
    cost = linear_cost_per_row(cm, device)
    print("\nlinear weights of the decoder layers, one pass, 1 / 2 / 3 rows (ms, and × 1 row of F.linear):")
    for name, ts in cost.items():
        print(f"- {name}: " + " / ".join(f"{t * 1e3:.2f} ({t / cost['F.linear'][0]:.2f}×)" for t in ts))
    kept, vocab = plausible_set_size(cm, image, prompt, args.new_tokens, device)
    print(f"\nplausible tokens per decode step (factual row, epsilon 0.1): median {kept:g} of {vocab}")
    beams = results.get("regular beams 5")
    if beams:
        ref_beams = statistics.median(s.per_token for s in beams)
        rows = [n for n, _, _ in configs if n in BEAM_ROWS or n.startswith(("opera", "mitigv opera"))]
        print("\nbeam search, per token × regular beams 5: " + ", ".join(
            f"{n} {statistics.median(s.per_token for s in results[n]) / ref_beams:.2f}" for n in rows))  # fmt: skip
    seq = results.get("sequential ref. multimodal")
    ours = results.get("causalmm multimodal K=1")
    if seq and ours:
        speedup = statistics.median(s.per_token for s in seq) / statistics.median(s.per_token for s in ours)
        print(f"\nmultimodal: engine is {speedup:.2f}× faster per token than the sequential reference")
    if not peers and any(name in MITIGV_PEERS for name, _, _ in configs):
        print("\nmitigv not installed (`pip install mitigv`): its implementations were not timed")
    for name, why in skipped_peers.items():
        print(f"{name}: mitigv's implementation did not run on this model ({why})")
        del peers[name]
    for name in peers:
        theirs = statistics.median(s.per_token for s in results[f"mitigv {name} (peer)"])
        ours = statistics.median(s.per_token for s in results[name])
        print(f"{name}: our engine is {theirs / ours:.2f}× faster per token than mitigv's on the same model")
    if resident:
        model = statistics.median(resident.values())
        first = configs[0][0]
        total = {n: model + statistics.median(s.peak for s in results[n]) for n, _, _ in configs}
        print(f"CPU peak memory: each config in a fresh process; the table gives RSS above the loaded model "
              f"({model / 2**20:.0f} MiB resident before the run). Including it, × regular: "
              + ", ".join(f"{n} {total[n] / total[first]:.2f}" for n, _, _ in configs))  # fmt: skip
    elif not cuda:
        print("CPU peak memory: not measured (pass --memory)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
