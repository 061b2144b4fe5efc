"""The attention arithmetic the hooks share: the key mask of a call in any of the bases' formats, grouped-query
heads repeated, eager probabilities in float32, and the selection and reassembly of batch rows. Pure tensor
functions of one attention call's arguments."""

from __future__ import annotations

import torch

__all__ = ["allowed_keys", "eager_probs", "masked_softmax", "put_rows", "repeat_kv", "row_scores", "take_rows"]


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat key/value heads up to the query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def allowed_keys(module, attention_mask, query, key, is_causal) -> torch.Tensor:
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


def eager_probs(query, key, allowed, scaling, softcap=None) -> torch.Tensor:
    """Eager post-softmax attention in float32; fully masked rows are zeros."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), repeat_kv(key, query.shape[1]).float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def take_rows(x: torch.Tensor | None, rows: list[int], batch: int) -> torch.Tensor | None:
    """``x``'s batch rows ``rows`` (a view where they are consecutive); a tensor broadcast over the batch (first
    dimension 1) or ``None`` as it is."""
    if x is None or x.shape[0] != batch:
        return x
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0] : rows[0] + len(rows)]
    return x[torch.tensor(rows, device=x.device)]


def row_scores(module, query, key, attention_mask, scaling, kwargs, rows: list[int], last: bool = False):
    """Pre-softmax float32 scores ``(n, heads, q, k)`` of ``rows`` (``last``: of the last query only) and their
    key mask."""
    batch = query.shape[0]
    allowed = take_rows(allowed_keys(module, attention_mask, query, key, kwargs.get("is_causal")), rows, batch)
    query = take_rows(query, rows, batch)
    if last:
        query, allowed = query[:, :, -1:], allowed[..., -1:, :]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    keys = repeat_kv(take_rows(key, rows, batch), query.shape[1])
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2))
    scores = scores * scale
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    return scores, allowed.expand_as(scores)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def put_rows(parts: list[tuple[list[int], torch.Tensor | None]], batch: int) -> torch.Tensor | None:
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
