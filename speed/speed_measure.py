"""The measurement machinery of ``decode_speed.py``: clocks, memory peaks, one sample of a configuration, and the
runners that produce one (our engine, the sequential reference), with the side measurements the script prints
(plausible-set size, BLAS cost per row, MemVR's read count).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from causalmm import CausalMM, CausalMMConfig
from causalmm.decoding import GenerationOptions, contrast
from causalmm.decoding.features import ImageFeatures
from causalmm.seeds import derive_seed
from causalmm.sites import Intervention, attention_name, intervene


class Peak:
    """Peak CUDA memory above the level at entry (allocator stats). On CPU it measures nothing: RSS in a
    long-lived process is no per-run peak (freed pages are reused), so ``--memory`` measures each configuration
    in a fresh process instead (:func:`cpu_peaks`), and no sampling thread disturbs the timings."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.value = 0

    def __enter__(self) -> Peak:
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


def cpu_peaks(script: str, preset: str, names: list[str], new_tokens: int) -> dict[str, tuple[int, int]]:
    """Each configuration's CPU (peak above the loaded model, resident before the run), each in its own fresh
    interpreter running ``script`` (``decode_speed.py``) with ``--peak-of`` (so no freed pages are reused)."""
    import json
    import subprocess

    out = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, script, "--preset", preset, "--new-tokens", str(new_tokens), "--peak-of", name],
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
    with Peak(device) as peak, _StepClock(cm.model, device) as clock:
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
    with Peak(device) as peak:
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


def memvr_reads(
    cm: CausalMM, config: CausalMMConfig, image: Image.Image, prompt: str, n: int, device: str
) -> tuple[int, int] | None:
    """(forwards in which MemVR's read triggered for the factual row, forwards) of one ``n``-token run of
    ``config``: whether the memvr row timed the read or only its entropy checks. None where the engine's MemVR
    state (``causalmm.sites.mlp.MemoryRead``) is not where this looks for it."""
    try:
        from causalmm.sites.mlp import MemoryRead
    except ImportError:
        return None
    seen: dict[int, Any] = {}  # one MemoryRead per forward, filled in its `layers` reader
    original = MemoryRead.layers

    def layers(self: Any, site: Any, hidden: torch.Tensor) -> None:
        original(self, site, hidden)
        seen[id(self)] = self

    MemoryRead.layers = layers
    try:
        run_engine(cm, config, image, prompt, n, device)
    finally:
        MemoryRead.layers = original
    return sum(bool(m.read_at) for m in seen.values()), len(seen)
