"""The baselines' edits of the LLM's own attention, applied by the registered hook (:mod:`causalmm.attention`) to
the batch rows an :class:`~causalmm.attention.Intervention` names, after the stock computation of the call:

- :class:`Boost` (PAI): the newest query's pre-softmax scores on the image keys scaled up;
- :class:`Prune` (SID): from one layer on, the image keys other than the least-attended few are hidden, chosen
  per forward from the layer before;
- :class:`Watch` (AvisC, OPERA): the newest queries' attention, averaged or maximised over heads, recorded in the
  layers it names (no edit).

An edited row is recomputed as eager attention in float32 and spliced back; every other row keeps exactly what
the base implementation computed. SID's hidden keys are the exception: from its layer on they are masked in the
call's own attention mask (:func:`prune_mask`), so the base computes those rows once, with no recompute. Image
keys are given per row as a boolean mask over the cache's first columns (the prompt's layout); a column beyond it
(a generated token) is not an image key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import Site, _allowed, _repeat
from .interventions import boost_scores, least_attended

__all__ = ["Boost", "Prune", "Watch", "apply_edits", "image_columns", "prune_mask"]


@dataclass(frozen=True)
class Boost:
    """PAI: in ``layers``, the last query's score ``x`` of each row in ``keys`` on that row's image keys becomes
    ``x + alpha * |x|`` before the softmax (github.com/LALBJ/PAI, ``attention.py``)."""

    alpha: float
    layers: frozenset[int]
    keys: dict[int, torch.Tensor]


@dataclass
class Prune:
    """SID: at layer ``select``, each row in ``keys`` keeps its ``keep`` least-attended image keys (the last
    query's attention averaged over heads); from layer ``select + 1`` on, its other image keys are hidden from
    every query of the forward (github.com/huofushuo/SID, its ``modeling_llama.py``). ``hidden`` is filled in
    during the forward."""

    select: int
    keep: int
    keys: dict[int, torch.Tensor]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    #: with shared lower layers (``select`` among them: the branch row computes the same as its factual row up to
    #: there), each batch row's row in those layers' smaller batch (:attr:`RowPlan.gather`); ``None``: the same
    source: list[int] | None = None


@dataclass
class Watch:
    """``seen[layer][row]`` receives the attention over the keys of the last ``queries`` queries of each row in
    ``rows`` (``(keys,)`` for one query, else ``(queries, keys)``), reduced over heads by ``heads`` (``mean``:
    AvisC; ``max``: OPERA), in ``layers`` (``None``: every layer)."""

    rows: list[int]
    seen: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    layers: frozenset[int] | None = None
    heads: str = "mean"
    queries: int = 1


def image_columns(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A row's image-key mask over ``n`` key columns (columns past the mask are not image keys)."""
    out = torch.zeros(n, dtype=torch.bool, device=mask.device)
    m = mask[:n]
    out[: m.numel()] = m
    return out


def _scores(module, query, key, attention_mask, scaling, kwargs, rows: list[int], last: bool = False):
    """Pre-softmax float32 scores ``(n, heads, q, k)`` of ``rows`` (``last``: of the last query only) and their
    key mask."""
    idx = torch.tensor(rows, device=query.device)
    allowed = _allowed(module, attention_mask, query, key, kwargs.get("is_causal"))
    allowed = allowed.expand(query.shape[0], -1, -1, -1)[idx] if allowed.shape[0] > 1 else allowed
    if last:
        query, allowed = query[:, :, -1:], allowed[..., -1:, :]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query[idx].float(), _repeat(key[idx], query.shape[1]).float().transpose(-1, -2)) * scale
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    return scores, allowed.expand_as(scores)


def _splice(out, weights, value, query, rows, probs):
    idx = torch.tensor(rows, device=out.device)
    new = torch.matmul(probs.to(value.dtype), _repeat(value[idx], query.shape[1])).transpose(1, 2)
    out = out.clone()
    out[idx] = new.to(out.dtype)
    if weights is not None:
        weights = weights.clone()
        weights[idx] = probs.to(weights.dtype)
    return out, weights


def _softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def prune_mask(module, prune: Prune, site: Site, query, key, attention_mask, kwargs):
    """The call's attention mask with SID's hidden image keys masked for its rows, in the layers after the one
    that chose them (else the mask as given): the base attention then computes those rows itself. The mask keeps
    the base's format (boolean for sdpa, additive for eager); the other rows' entries are unchanged."""
    if site.layer <= prune.select or not prune.hidden:
        return attention_mask
    batch, nk = query.shape[0], key.shape[2]
    rows = [r for r in sorted(prune.hidden) if r < batch]
    if not rows:
        return attention_mask
    allowed = _allowed(module, attention_mask, query, key, kwargs.get("is_causal"))
    allowed = allowed.expand(batch, 1, query.shape[2], nk).clone()
    idx = torch.tensor(rows, device=allowed.device)
    hide = torch.stack([prune.hidden[r][:nk].to(allowed.device) for r in rows])[:, None, None, :]
    allowed[idx] = allowed[idx] & ~hide
    additive = attention_mask is not None and attention_mask.dtype != torch.bool
    if additive or (attention_mask is None and "sdpa" not in module.config._attn_implementation):  # eager's format
        dtype = attention_mask.dtype if additive else query.dtype
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def apply_edits(module, site: Site, state, query, key, value, attention_mask, scaling, kwargs, out, weights):
    """``(out, weights)`` of one LLM attention call with the active edits applied (see the module docstring)."""
    batch, nk = query.shape[0], key.shape[2]
    watch, prune, boost = state.watch, state.prune, state.boost
    if watch is not None and (watch.layers is None or site.layer in watch.layers):
        rows = [r for r in watch.rows if r < batch]
        if rows:
            one = watch.queries == 1
            scores, allowed = _scores(module, query, key, attention_mask, scaling, kwargs, rows, last=one)
            probs = _softmax(scores[:, :, -watch.queries :], allowed[:, :, -watch.queries :])
            probs = probs.mean(1) if watch.heads == "mean" else probs.amax(1)  # (rows, queries, keys)
            probs = probs[:, 0] if watch.queries == 1 else probs
            watch.seen.setdefault(site.layer, {}).update({r: probs[i] for i, r in enumerate(rows)})
    if prune is not None and site.layer == prune.select:
        # each pruned row chooses from its own attention there, or, where that layer is shared, its source row's
        at = {r: r if prune.source is None else prune.source[r] for r in sorted(prune.keys)}
        sources = sorted({a for a in at.values() if a < batch})
        if sources:
            scores, allowed = _scores(module, query, key, attention_mask, scaling, kwargs, sources, last=True)
            attn = _softmax(scores, allowed).mean(1)[:, 0]
            of = {a: i for i, a in enumerate(sources)}  # each source row's place in `attn`
            for r, a in at.items():
                if a in of:
                    image = image_columns(prune.keys[r].to(attn.device), nk)
                    prune.hidden[r] = image & ~least_attended(attn[of[a]], image, prune.keep)
        # (from the next layer on, the hidden keys are masked before the call: prune_mask)
    if boost is not None and site.layer in boost.layers and (rows := [r for r in sorted(boost.keys) if r < batch]):
        scores, allowed = _scores(module, query, key, attention_mask, scaling, kwargs, rows)
        image = torch.stack([image_columns(boost.keys[r].to(scores.device), nk) for r in rows])
        scores[:, :, -1, :] = boost_scores(scores[:, :, -1, :], image[:, None, :], boost.alpha)
        out, weights = _splice(out, weights, value, query, rows, _softmax(scores, allowed))
    return out, weights
