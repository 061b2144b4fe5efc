"""The registered attention function and the intervention context it reads.

``transformers`` dispatches every attention call through ``AttentionInterface`` by the name in
``config._attn_implementation``. We register two names, ``causalmm_sdpa`` and ``causalmm_eager``, each with
the mask function of its base (``AttentionMaskInterface``: without one the LLM would silently run without a
causal mask). Outside an :func:`intervene` block, or for any call the active :class:`Intervention` does not
select, the call goes to the base implementation untouched, so the numbers are the stock ones. Selected calls
compute eager attention for the counterfactual batch rows only, replace the post-softmax map of the selected
heads by :func:`causalmm.interventions.counterfactual_attention`, and splice those rows back.

Which modules are "sites" is decided by the model adapter, which tags each attention module with a
:class:`Site` (vision modules have no ``layer_idx`` of their own).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .interventions import counterfactual_attention

__all__ = ["BASES", "Draws", "Intervention", "Site", "SiteRule", "attention_name", "intervene", "SITE_ATTR"]

#: Attribute an adapter sets on each attention module it wants reachable.
SITE_ATTR = "_causalmm_site"
#: Base implementations the hook can delegate to.
BASES = ("sdpa", "eager")


@dataclass(frozen=True)
class Site:
    """Where an attention module sits: ``kind`` is ``"vision"`` or ``"language"``.

    ``packed`` marks vision towers that run all images as one packed sequence split into chunks
    (Qwen2-VL): their calls are addressed by token offset instead of batch row.
    """

    kind: str
    layer: int
    packed: bool = False


@dataclass(frozen=True)
class SiteRule:
    """What to do at one kind of site: the method, which layers and which heads (``None`` = all)."""

    method: str
    layers: frozenset[int]
    heads: tuple[int, ...] | None = None
    renormalize: bool = True
    #: ``False``: only report the factual maps of the selected rows to ``on_probs`` (the feature gate).
    edit: bool = True


@dataclass(frozen=True)
class Draws:
    """The randomness of one LLM row, split at its image prefix.

    The maps of queries among the row's first ``prefix`` real tokens (the prompt up to its last image token) are
    drawn from ``prefix_gen``, those of every later query from ``gen``. Seed ``prefix_gen`` per image and ``gen``
    per sample, and the questions on one image draw the same maps over their common image prefix, so that prefix
    can be prefilled once for all of them; each later query still draws from its own sample's stream. Both
    streams are consumed in call order, so the maps do not depend on how the prompt is split across forwards.
    """

    gen: torch.Generator | None
    prefix_gen: torch.Generator | None = None
    prefix: int = 0


@dataclass
class Intervention:
    """The state one forward pass reads: which rows are counterfactual, and with which randomness.

    ``vision_targets`` maps ranges of vision *units* (rows of the vision tower's batch, or tokens of a packed
    tower) to the generator that draws that image's counterfactual maps; ``language_rows`` maps LLM batch
    rows to theirs (a generator, or :class:`Draws` to split a row's draws at its image prefix). Generators are
    consumed in call order, which is the same whatever else is in the batch.
    ``on_probs`` (optional) receives ``(site, rows, factual, counterfactual)`` for analysis.
    """

    vision: SiteRule | None = None
    language: SiteRule | None = None
    vision_targets: list[tuple[int, int, torch.Generator | None]] = field(default_factory=list)
    language_rows: dict[int, torch.Generator | Draws | None] = field(default_factory=dict)
    on_probs: Callable[..., None] | None = None
    #: the baselines' edits of the LLM's attention on rows no counterfactual rule touches (``causalmm.edits``):
    #: PAI's boost, SID's key pruning, AvisC's watch of the attention on the image
    boost: Any = None
    prune: Any = None
    watch: Any = None
    # Per-module offsets of the packed/batched vision calls seen in the current tower forward.
    _offsets: dict[int, int] = field(default_factory=dict)

    def reset_vision_offsets(self) -> None:
        self._offsets.clear()

    def _vision_rows(self, module: torch.nn.Module, site: Site, batch: int, q: int):
        """The (row, generator) pairs of this vision call that are counterfactual."""
        start = self._offsets.get(id(module), 0)
        size = q if site.packed else batch
        self._offsets[id(module)] = start + size
        rows = []
        for lo, hi, gen in self.vision_targets:
            if site.packed:
                if lo <= start < hi:
                    rows.append((0, gen))
            else:
                rows.extend((r - start, gen) for r in range(max(lo, start), min(hi, start + size)))
        return rows

    def rows_for(self, module: torch.nn.Module, batch: int, q: int):
        site: Site | None = getattr(module, SITE_ATTR, None)
        if site is None:
            return None, []
        rule = self.vision if site.kind == "vision" else self.language
        if site.kind == "vision":
            rows = self._vision_rows(module, site, batch, q)  # advance offsets even if the layer is skipped
        else:
            rows = sorted(self.language_rows.items())
        if rule is None or site.layer not in rule.layers:
            return None, []
        return rule, rows


_ACTIVE: contextvars.ContextVar[Intervention | None] = contextvars.ContextVar("causalmm_intervention", default=None)


@contextlib.contextmanager
def intervene(state: Intervention) -> Iterator[Intervention]:
    """Activate ``state`` for the forward passes run inside the block."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active() -> Intervention | None:
    """The intervention in force, if any."""
    return _ACTIVE.get()


def attention_name(base: str) -> str:
    """The ``attn_implementation`` name that routes through the hook with ``base`` underneath."""
    if base not in BASES:
        raise ValueError(f"unknown base attention {base!r}; choose one of {', '.join(BASES)}")
    return f"causalmm_{base}"


def _eager_for(module: torch.nn.Module) -> Callable:
    """The model file's own eager function, so non-intervened calls are bit-identical to stock eager."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _plain_eager


def _plain_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    allowed = _allowed(module, attention_mask, query, key, kwargs.get("is_causal"))
    probs = _probs(query, key, allowed, scaling, kwargs.get("softcap"))
    out = torch.matmul(probs.to(value.dtype), _repeat(value, query.shape[1]))
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat key/value heads up to the query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _allowed(module, attention_mask, query, key, is_causal) -> torch.Tensor:
    """The boolean key mask ``(b|1, 1, q, k)`` of a call, from whichever mask format the base uses."""
    q, k = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if causal and q > 1:
            i = torch.arange(q, device=query.device)[:, None] + (k - q)
            return (torch.arange(k, device=query.device)[None, :] <= i)[None, None]
        return torch.ones(1, 1, q, k, dtype=torch.bool, device=query.device)
    mask = attention_mask[..., :k]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _probs(query, key, allowed, scaling, softcap=None) -> torch.Tensor:
    """Eager post-softmax attention in float32; fully masked rows are zeros."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), _repeat(key, query.shape[1]).float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _blocks(allowed: torch.Tensor, real: torch.Tensor, qr: torch.Tensor, gen: torch.Generator | Draws | None):
    """``(queries, keys, generator)`` blocks one row's counterfactual maps are drawn in.

    ``allowed`` is the row's key mask ``(heads, queries, keys)``, ``real`` its real key positions, ``qr`` the
    indices of its real queries (the last positions). With :class:`Draws`, the queries within the image prefix
    draw over the prefix's keys from ``prefix_gen``, which gives the same block whether the prefix is prefilled
    alone or with the rest of the prompt, and the later queries draw over every real key from ``gen``. A prefix
    query that may see a key past the prefix (bidirectional image attention) makes the split unsound, so then the
    whole row draws from ``gen``.
    """
    if not isinstance(gen, Draws):
        return [(qr, real, gen)]
    first = real.numel() - qr.numel()  # the rank of the first query among the row's real tokens
    split = min(max(gen.prefix - first, 0), qr.numel())
    if split == 0:
        return [(qr, real, gen.gen)]
    beyond = real[gen.prefix :]
    if beyond.numel() and bool(allowed[:, qr[:split]][..., beyond].any()):
        return [(qr, real, gen.gen)]
    blocks = [(qr[:split], real[: gen.prefix], gen.prefix_gen)]
    if split < qr.numel():
        blocks.append((qr[split:], real, gen.gen))
    return blocks


def _counterfactual_rows(module, query, key, value, attention_mask, scaling, kwargs, rule, rows):
    """Attention output ``(n, q, heads, d)`` of the counterfactual rows, with ``a~`` in the selected heads."""
    idx = torch.tensor([r for r, _ in rows], device=query.device)
    q, k = query[idx], key[idx]
    allowed = _allowed(module, attention_mask, query, key, kwargs.get("is_causal"))
    allowed = allowed.expand(query.shape[0], -1, -1, -1)[idx] if allowed.shape[0] > 1 else allowed
    allowed = allowed.expand(len(rows), q.shape[1], -1, -1)
    probs = _probs(q, k, allowed, scaling, kwargs.get("softcap"))
    nq, nk = probs.shape[2], probs.shape[3]
    heads = torch.tensor(rule.heads if rule.heads is not None else range(probs.shape[1]), device=probs.device)
    cf = probs.clone()
    for i, (_, gen) in enumerate(rows):
        # Compact to the row's real tokens (the keys its last query may see: padding, left or in the middle of
        # a forked layout, is left out) so the random draws have the same shape, hence the same values,
        # whatever the batch composition and cache layout.
        last = allowed[i, 0, -1]
        real = last.nonzero().squeeze(-1) if bool(last.any()) else torch.arange(nk, device=last.device)
        qr = real[real >= nk - nq] - (nk - nq)  # the queries are the last nq positions
        padding = torch.ones(nk, dtype=torch.bool, device=cf.device)
        padding[real] = False
        cf[i, heads] = cf[i, heads].masked_fill(padding, 0.0)  # no weight on padding keys
        for qb, kb, g in _blocks(allowed[i], real, qr, gen):
            h, q, k = heads[:, None, None], qb[None, :, None], kb[None, None, :]
            new = counterfactual_attention(
                probs[i, h, q, k][None],
                rule.method,
                key_mask=allowed[i, h, q, k][None],
                generator=g,
                renormalize=rule.renormalize,
            )
            cf[i, h, q, k] = new[0].to(cf.dtype)
    state = active()
    if state is not None and state.on_probs is not None:
        state.on_probs(getattr(module, SITE_ATTR), [r for r, _ in rows], probs, cf)
    out = torch.matmul(cf.to(value.dtype), _repeat(value[idx], query.shape[1]))
    return out.transpose(1, 2), cf


def causalmm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: stock attention, plus ``do(A = a~)`` or a baseline's edit
    (:mod:`causalmm.edits`) where the context asks."""
    state = active()
    site = getattr(module, SITE_ATTR, None)
    language = state is not None and site is not None and site.kind == "language"
    if language and state.prune is not None:
        from .edits import prune_mask  # imports this module's helpers

        attention_mask = prune_mask(module, state.prune, site, query, key, attention_mask, kwargs)
    boosted = state.boost.rows(site.layer, query.shape[0]) if language and state.boost is not None else []
    if boosted:
        from .edits import boosted_attention  # imports this module's helpers

        if state.language is not None and state.language_rows:
            raise ValueError("PAI's boost and a counterfactual LLM branch cannot share a forward")
        out = boosted_attention(
            module, state.boost, boosted, _base(module), query, key, value, attention_mask, scaling, dropout, kwargs
        )
    else:
        out = _attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if language and (state.prune or state.watch):
        from .edits import apply_edits  # imports this module's helpers

        return apply_edits(module, site, state, query, key, attention_mask, scaling, kwargs, *out)
    return out


def _base(module) -> Callable:
    """The base implementation the module's attention goes to (sdpa, or the model file's own eager)."""
    base_name = module.config._attn_implementation.removeprefix("causalmm_")
    return sdpa_attention_forward if base_name == "sdpa" else _eager_for(module)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Stock attention, with ``do(A = a~)`` on the rows the active intervention selects."""
    base = _base(module)
    state = active()
    rule, rows = (None, []) if state is None else state.rows_for(module, query.shape[0], query.shape[2])
    rows = [(r, g) for r, g in rows if 0 <= r < query.shape[0]]
    if rule is None or not rows:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} uses attention sinks, which counterfactual attention does not support yet"
        )
    if not rule.edit:
        idx = torch.tensor([r for r, _ in rows], device=query.device)
        allowed = _allowed(module, attention_mask, query, key, kwargs.get("is_causal"))
        allowed = allowed[idx] if allowed.shape[0] > 1 else allowed
        probs = _probs(query[idx], key[idx], allowed, scaling, kwargs.get("softcap"))
        if state.on_probs is not None:
            state.on_probs(getattr(module, SITE_ATTR), [r for r, _ in rows], probs, probs)
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cf_out, cf_probs = _counterfactual_rows(module, query, key, value, attention_mask, scaling, kwargs, rule, rows)
    # The base runs on the whole batch so the factual rows see exactly the computation they would see
    # without any intervention (bit-identical); the counterfactual rows are then overwritten.
    out, weights = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = out.clone()
    idx = torch.tensor([r for r, _ in rows], device=out.device)
    out[idx] = cf_out.to(out.dtype)
    if weights is not None:
        weights = weights.clone()
        weights[idx] = cf_probs.to(weights.dtype)
    return out, weights


def register() -> None:
    """Register the hook under both base names (idempotent)."""
    for base, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(attention_name(base), causalmm_attention)
        AttentionMaskInterface.register(attention_name(base), mask_fn)


register()
