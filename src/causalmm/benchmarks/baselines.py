"""What a comparison is judged against: the regular greedy and regular sampled baseline runs among those given
(read from their ``run.json``), and, for CHAIR, regular decoding's recall-CHAIR_i curve over caption lengths with
each method's place against it. :mod:`.compare` builds its tables and tests on these."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .compare_render import method_text

__all__ = [
    "BASELINE_TITLES", "SAMPLING_KEYS", "baseline_kind", "curve_verdict", "decoding_text", "find_baselines",
    "frontier", "generation_options", "search_options",
]  # fmt: skip

#: generation options that only choose how a token is drawn; a sampled baseline differs from a greedy one here
SAMPLING_KEYS = frozenset({"do_sample", "temperature", "top_p", "top_k"})

#: what each baseline is, in words (tables, headings)
BASELINE_TITLES = {
    "greedy": "regular greedy decoding",
    "sampled": "regular sampled decoding",
    "first": "the first run",
}


def generation_options(info: dict[str, Any]) -> dict[str, Any]:
    """``run.json``'s generation options with unset (``None``) values dropped and ``do_sample`` spelt out:
    absent, it is transformers' default, greedy, so a run made through the API and one made by the CLI (which
    writes ``do_sample: false``) read the same."""
    gen = {k: v for k, v in (info.get("generation") or {}).items() if v is not None}
    gen["do_sample"] = bool(gen.get("do_sample", False))
    return gen


def search_options(info: dict[str, Any]) -> dict[str, Any]:
    """The generation options other than sampling: what a baseline must share with a method (its length)."""
    return {k: v for k, v in generation_options(info).items() if k not in SAMPLING_KEYS}


def baseline_kind(info: dict[str, Any]) -> str | None:
    """``greedy`` or ``sampled`` for a regular run drawing one token at a time; ``None`` otherwise (another
    method, or beam search, which is neither baseline)."""
    if (info.get("config") or {}).get("method") != "regular":
        return None
    gen = generation_options(info)
    if gen.get("num_beams", 1) not in (1, None):
        return None
    return "sampled" if gen["do_sample"] else "greedy"


def find_baselines(infos: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The regular greedy and regular sampled runs among ``infos`` (``run.json`` contents, in the order given):
    ``{"greedy": {"index": i, "why": ...}, "sampled": {...}}``, a kind absent where no run is of it.

    A baseline must differ from the methods only in the method (and, for the sampled one, in sampling), or a
    difference in length passes for a difference in method: among several regular runs of a kind, the one
    with the ``max_new_tokens`` that most non-regular runs use wins, then the one whose other generation
    options (beams, penalties) match the most common among them, then the first given. Without non-regular
    runs, the first run's options are the target.
    """
    if not infos:
        return {}
    others = [info for info in infos if (info.get("config") or {}).get("method") != "regular"]
    methods = others or list(infos[:1])
    lengths = Counter(search_options(info).get("max_new_tokens") for info in methods)
    searches = Counter(json.dumps(search_options(info), sort_keys=True) for info in methods)
    # Counter.most_common keeps first-seen order among ties: the first given wins a tie
    target_len, n_len = lengths.most_common(1)[0]
    target_search = searches.most_common(1)[0][0]
    out: dict[str, dict[str, Any]] = {}
    for kind in ("greedy", "sampled"):
        found = [i for i, info in enumerate(infos) if baseline_kind(info) == kind]
        if not found:
            continue

        def rank(i: int) -> tuple[bool, bool, int]:
            search = search_options(infos[i])
            return (search.get("max_new_tokens") != target_len, json.dumps(search, sort_keys=True) != target_search, i)

        best = min(found, key=rank)
        length = search_options(infos[best]).get("max_new_tokens")
        why = f"regular decoding, {kind}, max_new_tokens {length}"
        if len(found) > 1:
            if length != target_len:
                why += f": the first of {len(found)} {kind} runs, none at max_new_tokens {target_len}"
            elif others:
                why += f", as {n_len} of the {len(others)} other methods' runs use; {len(found)} {kind} runs given"
            else:
                why += f", as the first run; {len(found)} {kind} runs given"
        out[kind] = {"index": best, "why": why}
    return out


def curve_verdict(curve: Sequence[tuple[float, float]], chair_i: float, recall: float) -> dict[str, Any]:
    """Where the point (``chair_i``, ``recall``) lies against the trivial curve ``curve`` ((CHAIR_i, recall)
    of regular decoding at several lengths).

    The curve's recall at ``chair_i`` is the linear interpolation between the two curve points nearest in
    CHAIR_i on either side (the best recall where several points share a CHAIR_i: a trivial baseline reaches
    it). Returns ``recall_at`` (that recall), ``margin`` (``recall - recall_at``), ``between`` (indices of the
    one or two curve points used) and ``verdict``: ``above``, ``below``, ``on`` (within 1e-9), or ``outside``
    where ``chair_i`` is beyond the curve's CHAIR_i range, where no reading would be honest: extrapolating a
    curve of lengths says nothing about captions no length gives.
    """
    inside = [x for x, _ in curve]
    if not curve or not min(inside) <= chair_i <= max(inside):
        return {"recall_at": None, "margin": None, "between": [], "verdict": "outside"}
    lo = max(x for x in inside if x <= chair_i)
    hi = min(x for x in inside if x >= chair_i)

    def best(x: float) -> int:
        return max((i for i, (cx, _) in enumerate(curve) if cx == x), key=lambda i: curve[i][1])

    a, b = best(lo), best(hi)
    ya, yb = curve[a][1], curve[b][1]
    at = ya if a == b else ya + (yb - ya) * (chair_i - lo) / (hi - lo)
    margin = recall - at
    verdict = "on" if abs(margin) <= 1e-9 else "above" if margin > 0 else "below"
    return {"recall_at": at, "margin": margin, "between": sorted({a, b}), "verdict": verdict}


def frontier(rows: list[dict[str, Any]], infos: list[dict[str, Any]], curve_of: int | None) -> dict[str, Any]:
    """CHAIR's recall against CHAIR_i: every run's point (its metrics, as the table shows them), the curve of
    regular runs decoding as the run ``curve_of`` does at every length given, and each other run's verdict."""
    points = []
    for row, info in zip(rows, infos, strict=True):
        gen = generation_options(info)
        points.append(
            {
                "label": row["run"],
                "method": method_text(row),
                "max_new_tokens": gen.get("max_new_tokens"),
                "do_sample": gen["do_sample"],
                "chair_i": row["metrics"]["CHAIR_i"],
                "recall": row["metrics"]["recall"],
            }
        )
    notes: list[str] = []
    on_curve: list[int] = []
    if curve_of is None:
        notes.append("no regular greedy or sampled run: no trivial curve to judge the methods against")
    else:
        decoding = {k: v for k, v in generation_options(infos[curve_of]).items() if k != "max_new_tokens"}
        lengths: dict[Any, int] = {}
        for i, info in enumerate(infos):
            same = {k: v for k, v in generation_options(info).items() if k != "max_new_tokens"} == decoding
            if baseline_kind(info) is not None and same:
                length = points[i]["max_new_tokens"]
                if length in lengths:
                    notes.append(
                        f"{points[i]['label']} repeats max_new_tokens {length} of {points[lengths[length]]['label']}"
                        " on the regular curve: only the first is on it"
                    )
                    continue
                lengths[length] = i
        on_curve = [lengths[k] for k in sorted(lengths, key=lambda v: (v is None, v or 0))]
    curve = [{k: points[i][k] for k in ("label", "max_new_tokens", "chair_i", "recall")} for i in on_curve]
    xs = [c["chair_i"] for c in curve]
    monotone = all(a <= b for a, b in zip(xs, xs[1:], strict=False))
    if not monotone:
        notes.append(
            "CHAIR_i of the regular curve does not rise with max_new_tokens: the verdicts interpolate between "
            "the regular points nearest in CHAIR_i, which the drawn line (in max_new_tokens order) may not join"
        )
    if len(curve) == 1:
        notes.append("one regular length only: the curve is a point; give regular runs at other --max-new-tokens")
    pairs = [(c["chair_i"], c["recall"]) for c in curve]
    verdicts = []
    for i, point in enumerate(points):
        if i in on_curve:
            continue
        v = curve_verdict(pairs, point["chair_i"], point["recall"])
        dominated = [
            c["label"]
            for c in curve
            if c["chair_i"] <= point["chair_i"]
            and c["recall"] >= point["recall"]
            and (c["chair_i"], c["recall"]) != (point["chair_i"], point["recall"])
        ]
        verdicts.append(
            {
                "label": point["label"],
                "chair_i": point["chair_i"],
                "recall": point["recall"],
                "recall_at": v["recall_at"],
                "margin": v["margin"],
                "between": [curve[k]["label"] for k in v["between"]],
                "verdict": v["verdict"],
                "dominated_by": dominated,
            }
        )
    curve_decoding = None if curve_of is None else decoding_text(generation_options(infos[curve_of]), length=False)
    return {
        "x": "CHAIR_i",
        "y": "recall",
        "points": points,
        "curve": curve,
        "curve_decoding": curve_decoding,
        "monotone": monotone,
        "verdicts": verdicts,
        "notes": notes,
    }


def decoding_text(gen: dict[str, Any], *, length: bool = True) -> str:
    """Generation options in words: ``greedy, 64 tokens``, ``sampled (temperature 1.0), 64 tokens``."""
    beams = gen.get("num_beams", 1)
    if gen.get("do_sample"):
        opts = [f"{k} {gen[k]}" for k in ("temperature", "top_p", "top_k") if k in gen]
        words = "sampled" + (f" ({', '.join(opts)})" if opts else "")
    else:
        words = "greedy" if beams in (1, None) else f"beam search ({beams})"
    if beams not in (1, None) and gen.get("do_sample"):
        words += f", {beams} beams"
    if length:
        words += f", {gen.get('max_new_tokens', '?')} tokens"
    return words
