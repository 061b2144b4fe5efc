"""The baselines' edits of the LLM's own attention, applied by the registered hook (:mod:`causalmm.attention`) to
the batch rows an :class:`~causalmm.attention.Intervention` names, after the stock computation of the call:

- :class:`Boost` (PAI): the newest query's pre-softmax scores on the image keys scaled up;
- :class:`Prune` (SID): from one layer on, the image keys other than the least-attended few are hidden, chosen
  per forward from the layer before;
- :class:`Watch` (AvisC, OPERA): the newest queries' attention, averaged or maximised over heads, recorded in the
  layers it names (no edit).

Each edited row is computed once. PAI's boosted rows are computed here, as eager attention in float32, and the
base implementation computes only the other rows (:func:`boosted_attention`); SID's hidden keys are masked in the
call's own attention mask from its layer on (:func:`prune_mask`), so the base computes those rows itself. A row no
edit names keeps exactly what the base computes for it. The watch reads the attention after the call and changes
nothing. Image keys are given per row as a boolean mask over the cache's first columns (the prompt's layout); a
column beyond it (a generated token) is not an image key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import Site, _allowed, _repeat
from .interventions import boost_scores, least_attended

__all__ = ["Boost", "Prune", "Watch", "apply_edits", "boosted_attention", "image_columns", "prune_mask"]


@dataclass(frozen=True)
class Boost:
    """PAI: in ``layers``, the last query's score ``x`` of each row in ``keys`` on that row's image keys becomes
    ``x + alpha * |x|`` before the softmax (github.com/LALBJ/PAI, ``attention.py``)."""

    alpha: float
    layers: frozenset[int]
    keys: dict[int, torch.Tensor]
    #: the stacked image-key masks of one forward, by (rows, key count, device): every layer of a forward asks for
    #: the same, so they are built once
    _columns: dict = field(default_factory=dict, compare=False, repr=False)

    def rows(self, layer: int, batch: int) -> list[int]:
        """The rows of a ``batch``-row call in ``layer`` that the boost edits (sorted; empty: none)."""
        return [r for r in sorted(self.keys) if r < batch] if layer in self.layers else []

    def columns(self, rows: list[int], n: int, device: torch.device) -> torch.Tensor:
        """``rows``' image-key masks over ``n`` key columns, ``(len(rows), 1, 1, n)``."""
        key = (tuple(rows), n, device)
        if key not in self._columns:
            masks = [image_columns(self.keys[r].to(device), n) for r in rows]
            self._columns[key] = torch.stack(masks)[:, None, None, :]
        return self._columns[key]


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


def _take(x: torch.Tensor | None, rows: list[int], batch: int) -> torch.Tensor | None:
    """``x``'s batch rows ``rows`` (a view where they are consecutive); a tensor broadcast over the batch (first
    dimension 1) or ``None`` as it is."""
    if x is None or x.shape[0] != batch:
        return x
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0] : rows[0] + len(rows)]
    return x[torch.tensor(rows, device=x.device)]


def _scores(module, query, key, attention_mask, scaling, kwargs, rows: list[int], last: bool = False):
    """Pre-softmax float32 scores ``(n, heads, q, k)`` of ``rows`` (``last``: of the last query only) and their
    key mask."""
    batch = query.shape[0]
    allowed = _take(_allowed(module, attention_mask, query, key, kwargs.get("is_causal")), rows, batch)
    query = _take(query, rows, batch)
    if last:
        query, allowed = query[:, :, -1:], allowed[..., -1:, :]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), _repeat(_take(key, rows, batch), query.shape[1]).float().transpose(-1, -2))
    scores = scores * scale
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    return scores, allowed.expand_as(scores)


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


def apply_edits(module, site: Site, state, query, key, attention_mask, scaling, kwargs, out, weights):
    """``(out, weights)`` of one LLM attention call after the base computed it: the watch records, SID's layer
    chooses its hidden keys (see the module docstring; the boost is :func:`boosted_attention`, in place of the base)."""
    batch, nk = query.shape[0], key.shape[2]
    watch, prune = state.watch, state.prune
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
    return out, weights


def _put(parts: list[tuple[list[int], torch.Tensor | None]], batch: int) -> torch.Tensor | None:
    """One tensor of ``batch`` rows from ``(rows, values)`` parts that cover the batch between them."""
    if any(v is None for _, v in parts):
        return None
    (first, a), (second, b) = parts
    if first == list(range(len(first))):  # the edited rows lead the batch: the usual layout
        return torch.cat([a, b.to(a.dtype)])
    out = a.new_empty((batch, *a.shape[1:]))
    out[torch.tensor(first, device=a.device)] = a
    out[torch.tensor(second, device=a.device)] = b.to(a.dtype)
    return out


def boosted_attention(module, boost: Boost, rows: list[int], base, query, key, value, attention_mask, scaling,
                      dropout, kwargs):  # fmt: skip
    """``(out, weights)`` of one LLM attention call in which ``rows`` carry PAI's boost: those rows computed here
    (eager, float32, the last query's image scores raised before the softmax), the other rows by ``base`` alone,
    so no row is computed twice and the others get exactly what ``base`` gives them."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__} uses attention sinks, which PAI's edit does not support")
    batch, nk = query.shape[0], key.shape[2]
    scores, allowed = _scores(module, query, key, attention_mask, scaling, kwargs, rows)
    last = scores[:, :, -1:, :]  # a view: the edit writes into ``scores``
    last.copy_(boost_scores(last, boost.columns(rows, nk, scores.device), boost.alpha))
    probs = _softmax(scores, allowed)
    v = _repeat(_take(value, rows, batch), query.shape[1])
    mine = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).to(query.dtype)
    boosted = set(rows)
    others = [r for r in range(batch) if r not in boosted]
    if not others:
        return mine.contiguous(), probs.to(query.dtype)
    theirs, weights = base(
        module, _take(query, others, batch), _take(key, others, batch), _take(value, others, batch),
        _take(attention_mask, others, batch), scaling=scaling, dropout=dropout, **kwargs,
    )  # fmt: skip
    out = _put([(rows, mine), (others, theirs)], batch)
    if weights is not None:
        weights = _put([(rows, probs.to(weights.dtype)), (others, weights)], batch)
    return out, weights
