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
batched forward per step. Where the peer library ``mitigv`` is installed, its VCD, ICD, PAI, M3ID and VISTA run
on the same model beside ours (``--group baselines``: regular, CausalMM, the gate and every baseline, with those
peers); ``--group beams``: regular, CausalMM and VCD with 5 beams against regular 5-beam decoding, and OPERA
(official and fast settings) beside mitigv's OPERA; ``--group methods2``: VISTA, VAF and MemVR, with their layer
settings scaled to the preset's LLM depth, beside mitigv's VISTA.

This file is the command line; the rest sits beside it: ``speed_models.py`` (the presets), ``speed_measure.py``
(clocks, memory peaks, samples, runners), ``speed_configs.py`` (the configurations, groups and depth scaling)
and ``speed_peers.py`` (mitigv's rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from speed_configs import BEAM_ROWS, CONFIGS, GROUPS, SWITCHES_OFF, at_depth, depth_params, with_fits
from speed_measure import (
    Sample,
    attention_base,
    cpu_peak_in_this_process,
    cpu_peaks,
    linear_cost_per_row,
    memvr_reads,
    plausible_set_size,
    run_engine,
    run_sequential,
)
from speed_models import PRESETS, build, resolve_device
from speed_peers import MITIGV_PEERS, MITIGV_PROBES, mitigv_peer, run_mitigv

from causalmm import CausalMMConfig
from causalmm.config import ConfigError

# names other scripts and the tests import from here
__all__ = ["PRESETS", "attention_base", "build", "main", "resolve_device"]


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
    n_layers = cm.adapter.n_language_layers
    configs = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only.split(","))]
    if args.group:
        configs = [c for c in configs if c[0] in GROUPS[args.group]]
    if not configs:
        names = ", ".join(name for name, _, _ in CONFIGS)
        print(f"--only {args.only!r} matches no configuration; the names are: {names}", file=sys.stderr)
        return 2
    # VISTA's, VAF's and MemVR's official layer settings are for a 32-layer LLM: scaled to this preset's depth
    configs = [(name, kind, with_fits(at_depth(cfg, n_layers), cm, image, prompt)) for name, kind, cfg in configs]
    # mitigv beside each of our rows it has a method for (kept out of --only runs that select neither)
    peers = {}
    for name, _, cfg in list(configs):
        if name in MITIGV_PEERS and (peer := mitigv_peer(cm, name)) is not None:
            peers[name] = peer
            configs.append((f"mitigv {name} (peer)", "mitigv", cfg))

    def run(kind: str, cfg: CausalMMConfig, n: int, name: str = "") -> Sample:
        if kind == "mitigv":
            return run_mitigv(peers[cfg.method], cm.model, image, prompt, n, device, MITIGV_PROBES.get(cfg.method, 0))
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
        for name, (peak, base) in cpu_peaks(__file__, args.preset, [c[0] for c in configs], args.new_tokens).items():
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
    scaled = {name: depth_params(cfg.method, n_layers) for name, kind, cfg in configs if kind == "engine"}
    scaled = {name: ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in scaled.items() if p}
    if scaled:
        settings = "; ".join(f"{name} {p}" for name, p in scaled.items())
        print(f"\nlayer settings, the official ones for 32 LLM layers scaled to this preset's {n_layers}: {settings}")
    memvr = next((cfg for _, kind, cfg in configs if kind == "engine" and cfg.method == "memvr"), None)
    if memvr is not None:
        start, end = memvr.param("start"), memvr.param("end")
        reads = memvr_reads(cm, memvr, image, prompt, args.new_tokens, device)
        line = f"memvr (threshold {memvr.param('threshold')}, start {start}, end {end}): "
        if reads is None:
            line += "whether its read triggered was not checked"
        else:
            line += f"the read triggered in {reads[0]} of {reads[1]} forwards"
        if end - start < 2:
            line += (f"; with {n_layers} LLM layers no layer lies strictly between start and end, so it cannot "
                     "trigger: the row times the method without its read")  # fmt: skip
        print(line)
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
