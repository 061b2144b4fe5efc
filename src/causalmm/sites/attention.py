"""The registered attention function: stock attention, ``do(A = a~)`` on the rows the active intervention selects,
and the baselines' edits (:mod:`causalmm.sites.edits`).

``transformers`` dispatches every attention call through ``AttentionInterface`` by the name in
``config._attn_implementation``. We register two names, ``causalmm_sdpa`` and ``causalmm_eager``, each with
the mask function of its base (``AttentionMaskInterface``: without one the LLM would silently run without a
causal mask). Outside an :func:`~causalmm.sites.state.intervene` block, or for any call the active
:class:`~causalmm.sites.state.Intervention` does not select, the call goes to the base implementation untouched,
so the numbers are the stock ones. Selected calls compute eager attention for the counterfactual batch rows only,
replace the post-softmax map of the selected heads by :func:`causalmm.interventions.counterfactual_attention`, and
splice those rows back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..interventions import counterfactual_attention
from .edits import apply_edits, edited_attention, prune_mask
from .scores import allowed_keys, eager_probs, repeat_kv
from .state import Draws, active
from .tags import SITE_ATTR, attention_name

__all__ = ["causalmm_attention", "register"]


def _eager_for(module: torch.nn.Module) -> Callable:
    """The model file's own eager function, so non-intervened calls are bit-identical to stock eager."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _plain_eager


def _plain_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    allowed = allowed_keys(module, attention_mask, query, key, kwargs.get("is_causal"))
    probs = eager_probs(query, key, allowed, scaling, kwargs.get("softcap"))
    out = torch.matmul(probs.to(value.dtype), repeat_kv(value, query.shape[1]))
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


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
    allowed = allowed_keys(module, attention_mask, query, key, kwargs.get("is_causal"))
    allowed = allowed.expand(query.shape[0], -1, -1, -1)[idx] if allowed.shape[0] > 1 else allowed
    allowed = allowed.expand(len(rows), q.shape[1], -1, -1)
    probs = eager_probs(q, k, allowed, scaling, kwargs.get("softcap"))
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
    out = torch.matmul(cf.to(value.dtype), repeat_kv(value[idx], query.shape[1]))
    return out.transpose(1, 2), cf


def causalmm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: stock attention, plus ``do(A = a~)`` or a baseline's edit
    (:mod:`causalmm.sites.edits`) where the context asks."""
    state = active()
    site = getattr(module, SITE_ATTR, None)
    language = state is not None and site is not None and site.kind == "language"
    if language and state.prune is not None:
        attention_mask = prune_mask(module, state.prune, site, query, key, attention_mask, kwargs)
    edited = state.scores.rows(site.layer, query.shape[0]) if language and state.scores is not None else []
    if edited:
        if state.language is not None and state.language_rows:
            raise ValueError(f"{state.scores.name} and a counterfactual LLM branch cannot share a forward")
        out = edited_attention(
            module, state.scores, edited, _base(module), query, key, value, attention_mask, scaling, dropout, kwargs
        )
    else:
        out = _attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if language and (state.prune or state.watch or state.side):
        return apply_edits(module, site, state, query, key, value, attention_mask, scaling, kwargs, *out)
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
        allowed = allowed_keys(module, attention_mask, query, key, kwargs.get("is_causal"))
        allowed = allowed[idx] if allowed.shape[0] > 1 else allowed
        probs = eager_probs(query[idx], key[idx], allowed, scaling, kwargs.get("softcap"))
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
