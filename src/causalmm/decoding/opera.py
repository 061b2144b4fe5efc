"""OPERA's search (:mod:`causalmm.methods.opera` says the rule and where it comes from), batched over prompts.

Per step, two forwards over every beam of every prompt, whatever the number of candidates:

1. **candidates** — the top ``candidates`` tokens of each beam, fed together as one block of queries at the next
   position, each seeing the cache and itself only (a 4-D mask), so the last layer's attention of every
   candidate comes from one forward; the LM head computes nothing, and the block leaves the cache afterwards;
2. **the chosen tokens** — the beams' next tokens, the ordinary decode step, whose last-layer attention row joins
   each beam's answer history.

The attention is computed only where the rule reads it: the last layer, the newest queries of these two forwards
(:class:`~causalmm.sites.edits.Watch`). A prompt that rolls back re-encodes its kept answer tokens in an extra forward,
on its cached prompt: its abandoned answer columns are masked out and the new ones appended, while the other rows
get masked padding there, so every prompt keeps its own position in the batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..methods.opera import opera_penalty, rollback_position
from ..sites.edits import Watch, image_columns
from .beams import BeamState, choose, reorder_cache_rows, search_results, searches, stop_rule
from .head import head_on_rows
from .rows import Row
from .rule import GenerationOptions, HistoryProcessors
from .sharing import select_cache_rows

__all__ = ["candidate_attention", "opera_decode"]

#: the score of a token OPERA does not consider (the official filler)
_OUT = -999.0


@dataclass
class _Track:
    """One prompt's record beside its beam search: its beams' attention over the answer, ``(beams, k, k)`` for k
    answer tokens (row i: token i's query on answer tokens 0..i, zeros after; never written in place, so a
    snapshot keeps the tensor), each beam slot's peak column per answer position, the cache columns of its answer
    tokens, the rollbacks tried per position, the continuations banned per position, and the snapshots to roll
    back to (the search, the attention and the continuations chosen, per answer length)."""

    attn: torch.Tensor
    peaks: list[list[int]]
    cols: list[int] = field(default_factory=list)
    used: dict[int, int] = field(default_factory=dict)
    bans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    snaps: dict[int, dict] = field(default_factory=dict)

    def snapshot(self, k: int, search: BeamState) -> None:
        """Keep the state before answer token ``k`` (the official code keeps the last 512)."""
        self.snaps[k] = {"state": copy.deepcopy(search), "attn": self.attn, "chosen": None}
        for old in [s for s in self.snaps if s < k - 512]:
            del self.snaps[old]

    def restore(self, pos: int) -> BeamState:
        """Back to the state before answer token ``pos``: the attention and peaks as they were there, the
        continuations chosen there banned, later bans and snapshots dropped; returns the search as it was."""
        snap = self.snaps[pos]
        self.attn = snap["attn"]
        self.bans.setdefault(pos, []).extend(snap["chosen"])
        for later in [q for q in self.bans if q > pos]:
            del self.bans[later]
        for q in [q for q in self.snaps if q > pos]:
            del self.snaps[q]
        self.peaks = [h[: pos + 1] for h in self.peaks]
        return copy.deepcopy(snap["state"])


def _watch(rows: int, layer: int, queries: int) -> Watch:
    return Watch(list(range(rows)), layers=frozenset({layer}), heads="max", queries=queries)


def _normalised(seen: dict[int, torch.Tensor], rows: int, queries: int) -> torch.Tensor:
    """The watched rows stacked ``(rows, queries, keys)``, each query's attention divided by its sum over every key
    (as the official code renormalises the head-maximum)."""
    a = torch.stack([seen[r] for r in range(rows)]).float().reshape(rows, queries, -1)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def _forward(fw, ids, mask, positions, cache, watch: Watch | None, head: bool = True):
    """One forward of ``ids`` ``(rows, q)``; the LM head skipped where ``head`` is false and it is a plain linear."""
    edits = {"watch": watch} if watch is not None else None
    lm_head = fw.adapter.model.get_output_embeddings()
    skip = not head and type(lm_head) is torch.nn.Linear
    if skip:
        with head_on_rows(lm_head, []):
            return fw({"input_ids": ids}, mask, positions, cache, {}, None, edits)
    return fw({"input_ids": ids}, mask, positions, cache, {}, None, edits)


def _candidate_mask(mask: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask ``(rows, 1, c, length + c)`` of a block of ``c`` candidates: each sees the row's
    unmasked keys and itself."""
    rows, length = mask.shape
    seen = torch.cat(
        [mask.bool()[:, None, None, :].expand(rows, 1, c, length),
         torch.eye(c, dtype=torch.bool, device=mask.device)[None, None].expand(rows, 1, c, c)],
        dim=-1,
    )  # fmt: skip
    return torch.zeros(seen.shape, dtype=dtype, device=mask.device).masked_fill(~seen, torch.finfo(dtype).min)


def candidate_attention(
    fw, cand: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache
) -> torch.Tensor:
    """The last LLM layer's attention of each row's candidate tokens ``cand`` ``(rows, c)`` as the next token:
    ``(rows, c, length + c)`` over the cached keys and the candidates' own (each candidate sees only itself among
    them), the maximum over heads renormalised over the keys, as if each had been fed alone. One forward for all
    candidates; the cache is as before afterwards. ``positions``: each row's last position ``(..., rows, 1)``."""
    ad, c = fw.adapter, cand.shape[1]
    layer = ad.n_language_layers - 1
    watch = _watch(cand.shape[0], layer, c)
    block = ad.next_positions(positions).expand(*positions.shape[:-1], c)
    _forward(fw, cand, _candidate_mask(mask, c, ad.model.dtype), block, cache, watch, head=False)
    for cache_layer in cache.layers:
        cache_layer.crop(-c)
    return _normalised(watch.seen[layer], cand.shape[0], c)


def opera_decode(engine, layout, prefill, image_cols, opts: GenerationOptions, seeds, prompt_ids):
    """OPERA from a prefill of one factual row per prompt; one result per prompt."""
    fw, cfg, ad = engine.forward, engine.config, engine.adapter
    nb = opts.num_beams if opts.num_beams > 1 else cfg.param("beams")
    n_cand, scale = cfg.param("candidates"), cfg.param("scale")
    threshold, weight = cfg.param("threshold"), cfg.param("penalty")
    n = len(layout.imgs)
    logits, cache, mask, positions = prefill
    last_layer = ad.n_language_layers - 1
    # every prompt's row becomes nb beams, beam b of prompt p at p * nb + b
    select_cache_rows(cache, 0, [p for p in range(n) for _ in range(nb)], None)
    logits = logits.repeat_interleave(nb, 0)
    mask, positions = mask.repeat_interleave(nb, 0), positions.repeat_interleave(nb, -2)[..., -1:]
    start = ad.next_positions(positions)  # each row's first answer position
    image = image_cols.repeat_interleave(nb, 0)
    rows = [Row(p * nb + b) for p in range(n) for b in range(nb)]
    beams = searches(engine, opts, n, nb)
    history, stops = HistoryProcessors(opts), stop_rule(engine, opts)

    tracks = [_Track(logits.new_zeros(nb, 0, 0, dtype=torch.float32), [[] for _ in range(nb)]) for _ in range(n)]
    active = list(range(len(rows)))  # rows in the batch, in batch order
    vocab = logits.shape[-1]
    #: what the search did (diagnostics, tests): each rollback's prompt, step, position, kept tokens and logits
    engine.search_stats = {"steps": 0, "rollbacks": []}

    while True:
        engine.search_stats["steps"] += 1
        where = {i: j for j, i in enumerate(active)}
        live = [p for p in range(n) if not beams[p].done]
        # 1. the candidates' attention: one block of n_cand queries per row, each seeing the cache and itself
        cand_scores, cand = logits.topk(n_cand, dim=-1)
        length = mask.shape[1]
        seen = candidate_attention(fw, cand, mask, positions, cache)  # (rows, n_cand, length + n_cand)
        rollback: dict[int, int] = {}
        parents_of: dict[int, list[int]] = {}
        for p in live:
            st, k, tr = beams[p], len(beams[p].running[0]), tracks[p]
            idx = [where[p * nb + b] for b in range(nb)]
            answer = torch.tensor(tr.cols, dtype=torch.long, device=seen.device)
            own = length + torch.arange(n_cand, device=seen.device)
            # each beam's window: its answer rows, then each candidate's row (on the answer and on itself)
            window = seen.new_zeros(nb, n_cand, k + 1, k + 1)
            window[:, :, :k, :k] = tr.attn[:, None]
            cand_rows = seen[idx][:, :, answer] if k else seen.new_zeros(nb, n_cand, 0)
            window[:, :, k, :k] = cand_rows
            window[:, :, k, k] = seen[idx][:, torch.arange(n_cand), own]
            img = torch.stack([image_columns(image[p * nb + b].to(seen.device), length) for b in range(nb)])
            on_image = (seen[idx][:, :, :length] * img[:, None, :]).sum(-1)
            penalty, peak = opera_penalty(window, on_image, scale)
            beam_peak = peak.mode(-1).values  # (nb,): each beam's mode over its candidates
            loc = int(beam_peak.mode().values)
            for b in range(nb):
                tr.peaks[b].append(int(beam_peak[b]))
            tr.snapshot(k, st)
            pos = rollback_position(tr.peaks, loc, threshold, tr.used, n_cand, k + 1)
            if pos is not None and pos in tr.snaps and pos < k:
                rollback[p] = pos
                continue
            z = torch.full((nb, vocab), _OUT, device=logits.device)
            # penalty 0 is no penalty, also where a saturated over-trust is inf (0 * inf would make the scores nan)
            cut = weight * penalty.to(cand_scores.device) if weight else 0.0
            z.scatter_(-1, cand[idx], cand_scores[idx] - cut)
            parents_of[p] = choose(st, z, history, prompt_ids[p], stops)
            tr.snaps[k]["chosen"] = [(parents_of[p][b], st.running[b][-1]) for b in range(nb)]

        if rollback:
            mask, positions, rb_logits = _roll_back(fw, cache, rollback, beams, tracks, nb, where, mask, positions,
                                                    start)  # fmt: skip
            for p, pos in rollback.items():
                idx = [where[p * nb + b] for b in range(nb)]
                engine.search_stats["rollbacks"].append(
                    {"prompt": p, "pos": pos, "tokens": [list(t) for t in beams[p].running],
                     "logits": rb_logits[idx].cpu(), "banned": list(tracks[p].bans[pos])}
                )  # fmt: skip
                z = rb_logits[idx].clone()
                z -= 999.0 + z.min(-1, keepdim=True).values
                for parent, token in tracks[p].bans[pos]:
                    z[parent, token] = _OUT
                st = beams[p]
                parents_of[p] = choose(st, z, history, prompt_ids[p], stops)
                tracks[p].snaps[pos]["chosen"] = [(parents_of[p][b], st.running[b][-1]) for b in range(nb)]

        if all(st.done for st in beams):
            break
        # the beams' rows take their parents' caches and attention rows, then finished prompts leave
        source = {i: i for i in active}
        for p, parents in parents_of.items():
            tracks[p].attn = tracks[p].attn[parents]
            for b in range(nb):
                source[p * nb + b] = p * nb + parents[b]
        if any(source[i] != i for i in active):
            reorder_cache_rows(cache, 0, torch.tensor([where[source[i]] for i in active]), None)
        keep = [j for j, i in enumerate(active) if not beams[rows[i].prompt // nb].done]
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=mask.device)
            active = [active[j] for j in keep]
            select_cache_rows(cache, 0, keep, None)
            mask, positions, start = mask[sel], positions[..., sel, :], start[..., sel, :]
        # 2. the chosen tokens, and their last-layer attention on the answer
        nxt = torch.tensor([[beams[i // nb].running[i % nb][-1]] for i in active], device=mask.device)
        positions = ad.next_positions(positions)
        column = mask.shape[1]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        watch = _watch(len(active), last_layer, 1)
        out = _forward(fw, nxt, mask, positions, cache, watch)
        logits = out.logits[:, -1].float()
        seen = _normalised(watch.seen[last_layer], len(active), 1)[:, 0]
        for p in {i // nb for i in active}:
            tr = tracks[p]
            tr.cols.append(column)
            answer = torch.tensor(tr.cols, device=seen.device)
            k = tr.attn.shape[1]
            grown = seen.new_zeros(nb, k + 1, k + 1)
            grown[:, :k, :k] = tr.attn
            grown[:, k] = seen[[active.index(p * nb + b) for b in range(nb)]][:, answer]
            tr.attn = grown

    return search_results(engine, beams, opts, seeds)


def _roll_back(fw, cache, rollback: dict[int, int], beams: list[BeamState], tracks: list[_Track], nb: int,
               where: dict[int, int], mask: torch.Tensor, positions: torch.Tensor, start: torch.Tensor):  # fmt: skip
    """Each prompt of ``rollback`` back to the state before its answer token ``pos`` (:meth:`_Track.restore`); its
    kept answer tokens are re-encoded on the cached prompt (one forward for the batch). Returns the mask, the
    positions and the logits of that forward's last position (read for the rolled-back rows)."""
    width = max(rollback.values())
    ids = torch.full((mask.shape[0], width), fw.pad_id, dtype=torch.long, device=mask.device)
    new = torch.zeros(mask.shape[0], width, dtype=mask.dtype, device=mask.device)
    pos_ids = positions.expand(*positions.shape[:-1], width).clone()
    mask = mask.clone()
    length = mask.shape[1]
    for p, pos in rollback.items():
        tr = tracks[p]
        beams[p] = tr.restore(pos)
        for b in range(nb):
            j = where[p * nb + b]
            tokens = beams[p].running[b]
            mask[j, tr.cols] = 0
            lo = width - len(tokens)  # left-pad a shorter re-encoding
            ids[j, lo:] = torch.tensor(tokens, device=ids.device)
            new[j, lo:] = 1
            pos_ids[..., j, lo:] = start[..., j, :] + torch.arange(len(tokens), device=pos_ids.device)
        tr.cols = list(range(length + width - pos, length + width))
    mask = torch.cat([mask, new], dim=1)
    out = _forward(fw, ids, mask, pos_ids, cache, None)
    return mask, pos_ids[..., -1:], out.logits[:, -1].float()
