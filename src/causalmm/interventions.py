"""Counterfactual attention maps: pure tensor functions, ``do(A = a~)``.

The definitions are in ``docs/method.md#5-counterfactual-attention-maps``.

Every function takes post-softmax attention ``probs`` of shape ``(batch, heads, queries, keys)`` and a
boolean ``key_mask`` (broadcastable to ``probs``; ``True`` = the query may attend to that key) and returns a
tensor of the same shape and dtype. With ``renormalize=True`` (the default) each row is a valid attention
distribution over its allowed keys: it sums to 1 there and is exactly 0 elsewhere. Rows with no allowed key
come back as all zeros, never NaN. The maths runs in float32 whatever the input dtype, so bf16/fp16 rows do
not lose their normalisation to rounding before the final cast.

Example:
    >>> import torch
    >>> p = torch.tensor([[[[0.7, 0.2, 0.1]]]])
    >>> counterfactual_attention(p, "reversed")
    tensor([[[[0.0000, 0.4545, 0.5455]]]])
    >>> counterfactual_attention(p, "uniform")
    tensor([[[[0.3333, 0.3333, 0.3333]]]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "COUNTERFACTUALS", "boost_scores", "counterfactual_attention", "diffusion_noise", "feature_gate", "least_attended",
    "memory_read", "only_heads", "scale_scores", "shift", "steer", "top_entropy",
]  # fmt: skip

#: The counterfactual attention maps ``a~``, in the order the paper lists them (decoding methods are
#: ``causalmm.methods``).
COUNTERFACTUALS: tuple[str, ...] = ("random", "uniform", "reversed", "reversed_raw", "shuffle")


def _normalize(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum over allowed keys; rows with zero mass stay zero (no NaN)."""
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _rand(p: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Uniform noise shaped like ``p``, drawn on the generator's device (model-parallel layers differ)."""
    device = gen.device if gen is not None else p.device
    return torch.rand(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.device)


def _uniform(allowed: torch.Tensor) -> torch.Tensor:
    a = allowed.float()
    return _normalize(a, allowed)


def _random(p: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, norm: bool) -> torch.Tensor:
    noise = torch.where(allowed, _rand(p, gen), 0.0)
    return _normalize(noise, allowed) if norm else noise


def _uniform_method(p: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, norm: bool):
    if norm:
        return _uniform(allowed)
    # Unnormalised variant of the original release: every allowed key gets the row's mean weight.
    n = allowed.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(allowed, p, 0.0).sum(-1, keepdim=True) / n
    return torch.where(allowed, mean.expand_as(p), 0.0)


def _reversed(p: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, norm: bool):
    neg = torch.finfo(torch.float32).min
    row_max = torch.where(allowed, p, neg).amax(dim=-1, keepdim=True)
    rev = torch.where(allowed, row_max - p, 0.0).clamp_min(0.0)
    if not norm:
        return rev
    # A constant row reverses to all zeros; its reverse is undefined, uniform is the limit.
    flat = rev.sum(-1, keepdim=True) <= 0
    return torch.where(flat, _uniform(allowed), _normalize(rev, allowed))


def _reversed_raw(p: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, norm: bool):
    return _reversed(p, allowed, gen, False)


def _shuffle(p: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, norm: bool):
    # Allowed positions in index order, and the same positions in a random order: sort keys that put
    # every disallowed key after every allowed one.
    k = p.shape[-1]
    idx = torch.arange(k, device=p.device, dtype=torch.float32).expand(p.shape)
    ordered = torch.where(allowed, idx, idx + k).argsort(dim=-1)
    noise = _rand(p, gen)
    shuffled = torch.where(allowed, noise, noise + 2.0).argsort(dim=-1)
    out = torch.zeros_like(p).scatter(-1, ordered, p.gather(-1, shuffled))
    out = torch.where(allowed, out, 0.0)
    return _normalize(out, allowed) if norm else out


_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "random": _random,
    "uniform": _uniform_method,
    "reversed": _reversed,
    "reversed_raw": _reversed_raw,
    "shuffle": _shuffle,
}


def counterfactual_attention(
    probs: torch.Tensor,
    method: str,
    *,
    key_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """Replace attention ``probs`` by a counterfactual map ``a~`` (``docs/method.md``, section 5).

    Args:
        probs: post-softmax attention, ``(batch, heads, queries, keys)``, any float dtype.
        method: ``random`` (i.i.d. uniform noise over allowed keys), ``uniform`` (equal weight),
            ``reversed`` (``max_row - A``, normalised), ``reversed_raw`` (the same, never normalised) or
            ``shuffle`` (a random permutation of each row's allowed keys).
        key_mask: bool, broadcastable to ``probs``; ``True`` where the query may attend. ``None``: all keys.
        generator: the source of randomness for ``random`` and ``shuffle``; seed it per sample so the
            same seed gives the same map whatever else is in the batch.
        renormalize: ``False`` keeps the raw map of the original release (un-normalised noise, the mean
            weight for ``uniform``, ``max - A`` for ``reversed``).

    Returns:
        A tensor with the shape and dtype of ``probs``.

    Raises:
        ValueError: for an unknown method or a tensor that is not 4-D.
    """
    if method not in _IMPLS:
        known = ", ".join(COUNTERFACTUALS)
        raise ValueError(f"unknown counterfactual attention method {method!r}; choose one of {known}")
    if probs.dim() != 4:
        raise ValueError(
            f"probs must be (batch, heads, queries, keys); got a {probs.dim()}-D tensor of shape {tuple(probs.shape)}"
        )
    if key_mask is None:
        allowed = torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    else:
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor (True = may attend); got dtype {key_mask.dtype}")
        try:
            allowed = key_mask.to(probs.device).expand(probs.shape)
        except RuntimeError as err:
            raise ValueError(
                f"key_mask of shape {tuple(key_mask.shape)} does not broadcast to probs {tuple(probs.shape)}"
            ) from err
    # `where`, not multiplication: a NaN from a fully masked softmax row must not leak through.
    p = torch.where(allowed, probs.float(), 0.0)
    out = _IMPLS[method](p, allowed, generator, renormalize)
    return out.to(probs.dtype)


def feature_gate(
    features: torch.Tensor,
    probs: torch.Tensor,
    method: str,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The original release's vision "feature gate" (``vision_style="gate"``), kept for parity studies.

    The original CausalMM code did not replace attention inside the vision encoder: it edited the attention
    map of the feature layer without renormalising it, resized it bilinearly to the patch grid, averaged
    over heads and multiplied the patch features by it. Only square grids are meaningful here.

    Args:
        features: patch features ``(batch, patches, dim)`` with ``patches`` a square number.
        probs: that layer's attention ``(batch, heads, tokens, tokens)``.
        method: as in :func:`counterfactual_attention`.
        generator: randomness for ``random``/``shuffle``.

    Returns:
        The gated features, same shape and dtype as ``features``.
    """
    n = features.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"the feature gate needs a square patch grid; got {n} patch features")
    edited = counterfactual_attention(probs, method, generator=generator, renormalize=False).float()
    gate = torch.nn.functional.interpolate(edited, size=(side, side), mode="bilinear", align_corners=False)
    gate = gate.mean(dim=1).reshape(features.shape[0], n, 1)
    return (features.float() * gate).to(features.dtype)


def diffusion_noise(
    x: torch.Tensor, step: int, *, generator: torch.Generator | None = None, schedule: str = "linear"
) -> torch.Tensor:
    """VCD's distorted image: the forward diffusion ``q(x_t | x_0)`` at ``step`` of 1000.

    ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) n`` with ``n ~ N(0, I)``. ``schedule="linear"`` is DDPM's beta
    schedule (1e-4 to 0.02); ``"sigmoid"`` is the one in VCD's released code. Applied to the
    processor's normalised pixel values, as VCD does.
    """
    if not 0 <= step < 1000:
        raise ValueError(f"noise step {step} must be in [0, 999]")
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose linear or sigmoid")
    abar = torch.cumprod(1 - betas, 0)[step]
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
    return (abar.sqrt().item() * x.float() + (1 - abar).sqrt().item() * noise).to(x.dtype)


def boost_scores(scores: torch.Tensor, image: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's edit of pre-softmax attention scores: ``x + alpha * |x|`` where ``image`` (broadcast against
    ``scores``) marks an image key, ``x`` elsewhere.

    >>> boost_scores(torch.tensor([-2.0, 1.0, 3.0]), torch.tensor([True, True, False]), 0.5)
    tensor([-1.0000,  1.5000,  3.0000])
    """
    return torch.where(image, scores + alpha * scores.abs(), scores)


def least_attended(attention: torch.Tensor, image: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` image keys with the least ``attention`` (SID's kept set), as a boolean mask like ``image``;
    ties go to the earlier key, and every image key is kept where there are no more than ``keep``.

    >>> least_attended(torch.tensor([0.1, 0.5, 0.2, 0.05, 0.15]), torch.tensor([False, True, True, True, False]), 2)
    tensor([False, False,  True,  True, False])
    """
    at = image.nonzero().squeeze(-1)
    out = torch.zeros_like(image)
    if at.numel() <= keep:
        out[at] = True
        return out
    order = torch.sort(attention[at].float(), stable=True).indices[:keep]
    out[at[order]] = True
    return out


def scale_scores(scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor, enhance: float, suppress: float):
    """VAF's edit of pre-softmax attention scores: ``x * enhance`` where ``up`` marks a key (the image's),
    ``x * suppress`` where ``down`` does (the system prompt's), ``x`` elsewhere (``up`` wins where both do). As in
    the official code, a negative score on an enhanced key becomes more negative.

    >>> scale_scores(torch.tensor([2.0, -1.0, 4.0, 1.0]), torch.tensor([True, True, False, False]),
    ...              torch.tensor([False, False, True, False]), 1.5, 0.5)
    tensor([ 3.0000, -1.5000,  2.0000,  1.0000])
    """
    factor = torch.where(up, enhance, torch.where(down, suppress, 1.0)).to(scores.dtype)
    return scores * factor


def top_entropy(logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """MemVR's uncertainty of each row of ``logits`` ``(rows, vocab)``: the entropy of the softmax of its ``k``
    largest logits, over ``log k`` (so in ``[0, 1]``; 1 = the ``k`` candidates equally likely).

    >>> top_entropy(torch.tensor([[0.0, 0.0, -50.0], [5.0, 5.0, 5.0]]), 2)
    tensor([1., 1.])
    """
    k = min(k, logits.shape[-1])
    p = torch.softmax(logits.float().topk(k, dim=-1).values, dim=-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1) / torch.log(torch.tensor(float(k)))


def memory_read(x: torch.Tensor, ffn: torch.Tensor, memory: torch.Tensor, ratio: float) -> torch.Tensor:
    """MemVR's FFN output with the image memory read in: ``(1 - ratio) * ffn + ratio * s * x M^T M``, ``x`` the
    FFN's input ``(..., hidden)``, ``M`` the memory ``(tokens, hidden)``, ``s = mean|ffn| / mean|x M^T M|`` (so the
    read has the FFN output's scale; 0 where the read is all zeros, where the official code divides by zero).
    Computed in float32, returned in ``ffn``'s dtype.

    >>> x = torch.tensor([[1.0, 0.0]]); m = torch.tensor([[2.0, 0.0]])
    >>> memory_read(x, torch.tensor([[0.0, 1.0]]), m, 0.5)  # x M^T M = [4, 0], s = 0.5 / 2: 0.5 [0, 1] + 0.5 [1, 0]
    tensor([[0.5000, 0.5000]])
    """
    m = memory.float()
    read = (x.float() @ m.T) @ m
    size = read.abs().mean()
    s = ffn.float().abs().mean() / size if size > 0 else torch.zeros((), device=read.device)
    return ((1.0 - ratio) * ffn.float() + ratio * s * read).to(ffn.dtype)


def steer(m: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """VISTA's norm-preserving, cosine-gated steering of MLP outputs ``m`` ``(..., hidden)`` by the vector ``v``
    ``(hidden,)`` or one per leading row (broadcast): ``normalize(normalize(m) + lam * s * normalize(v)) * |m|``
    with ``s = 1 + max(0, cos(m, -v))`` (outputs that point away from ``v`` are pulled harder). Computed in float32,
    returned in ``m``'s dtype; ``lam = 0`` returns ``m`` as it is.

    >>> steer(torch.tensor([[3.0, 0.0]]), torch.tensor([0.0, 2.0]), 1.0)  # cos = 0: s = 1; |m| kept
    tensor([[2.1213, 2.1213]])
    """
    if lam == 0:
        return m
    x = m.float()
    u = torch.nn.functional.normalize(v.float(), dim=-1)
    s = 1.0 + torch.nn.functional.cosine_similarity(x, -u.expand_as(x), dim=-1).clamp_min(0.0)[..., None]
    out = torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=-1) + lam * s * u, dim=-1)
    return (out * x.norm(dim=-1, keepdim=True)).to(m.dtype)


def shift(m: torch.Tensor, d: torch.Tensor, strength: float) -> torch.Tensor:
    """VTI's norm-preserving shift of MLP outputs ``m`` ``(..., hidden)`` along ``d`` (broadcast against ``m``: one
    vector per layer for the LLM, one per token for the tower): ``normalize(normalize(m) + strength * normalize(d))
    * |m|``, no gate. Computed in float32, returned in ``m``'s dtype; ``strength = 0`` returns ``m`` as it is.

    >>> shift(torch.tensor([[3.0, 0.0]]), torch.tensor([0.0, 5.0]), 1.0)  # halfway between the two; |m| kept
    tensor([[2.1213, 2.1213]])
    """
    if strength == 0:
        return m
    x = m.float()
    u = torch.nn.functional.normalize(d.float(), dim=-1)
    out = torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=-1) + strength * u, dim=-1)
    return (out * x.norm(dim=-1, keepdim=True)).to(m.dtype)


def _zero_outliers(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries of ``group`` above the group's mean plus its (unbiased) standard deviation set to 0;
    the statistics are over the group's columns, per leading index."""
    g = group.to(x.dtype)
    n = g.sum(-1, keepdim=True)
    mean = (x * g).sum(-1, keepdim=True) / n
    std = (((x - mean) ** 2 * g).sum(-1, keepdim=True) / (n - 1)).sqrt()
    return x.masked_fill(group & (x > mean + std), 0.0)


def _group_entropy(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The entropy (natural log, ``+1e-6`` inside it) of ``x`` renormalised over ``group``'s columns; NaN where the
    group holds no mass."""
    q = x * group.to(x.dtype)
    q = q / q.sum(-1, keepdim=True)
    return -(q * torch.log(q + 1e-6)).sum(-1)


def only_heads(probs: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """ONLY's side attention map of the last query: ``probs`` ``(rows, heads, keys)``, ``text`` and ``image``
    ``(rows, keys)`` its column groups. In each group the entries above its mean plus one standard deviation
    become 0 (no renormalisation); each head's text-to-visual entropy ratio (each group renormalised; a text group
    without mass counts 0, an image group without mass infinity) is compared with its row's mean over heads, and
    the heads below it are zeroed. In float32.

    >>> p = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.05, 0.45, 0.3, 0.2]]])  # 2 heads; text 0-1, image 2-3
    >>> only_heads(p, torch.tensor([[True, True, False, False]]), torch.tensor([[False, False, True, True]]))
    tensor([[[0.1000, 0.1000, 0.4000, 0.4000],
             [0.0000, 0.0000, 0.0000, 0.0000]]])
    """
    p = probs.float()
    text, image = text[:, None, :], image[:, None, :]
    p = _zero_outliers(_zero_outliers(p, text), image)
    ratio = _group_entropy(p, text).nan_to_num(nan=0.0) / _group_entropy(p, image).nan_to_num(nan=float("inf"))
    removed = ratio < ratio.mean(-1, keepdim=True)
    return p.masked_fill(removed[..., None], 0.0)
