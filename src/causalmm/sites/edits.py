"""The baselines' edits of the LLM's own attention, applied by the registered hook (:mod:`causalmm.sites.attention`) to
the batch rows an :class:`~causalmm.sites.state.Intervention` names, after the stock computation of the call:

- :class:`Boost` (PAI): the newest query's pre-softmax scores on the image keys scaled up;
- :class:`Scale` (VAF): the pre-softmax scores of the queries after the image multiplied, up on the image keys and
  down on the keys before the image, in the middle layers;
- :class:`Prune` (SID): from one layer on, the image keys other than the least-attended few are hidden, chosen
  per forward from the layer before;
- :class:`Watch` (AvisC, OPERA): the newest queries' attention, averaged or maximised over heads, recorded in the
  layers it names (no edit);
- :class:`SideOutput` (ONLY): one layer's attention recomputed on the side for the newest query, with outliers
  and low text-to-visual entropy-ratio heads zeroed, carried to the last layer's MLP for a second set of logits
  (no edit of the forward itself).

Each edited row is computed once. The rows whose scores PAI or VAF edit are computed here, as eager attention in
float32, and the base implementation computes only the other rows (:func:`edited_attention`); SID's hidden keys
are masked in the call's own attention mask from its layer on (:func:`prune_mask`), so the base computes those rows
itself. A row no edit names keeps exactly what the base computes for it. The watch reads the attention after the
call and changes nothing. Image keys are given per row as a boolean mask over the cache's first columns (the
prompt's layout); a column beyond it (a generated token) is not an image key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..interventions import boost_scores, least_attended, only_heads, scale_scores
from .scores import allowed_keys, masked_softmax, put_rows, repeat_kv, row_scores, take_rows
from .tags import Site

__all__ = [
    "Boost", "Prune", "Scale", "SideOutput", "Watch", "apply_edits", "edited_attention", "image_columns", "prune_mask",
]  # fmt: skip


@dataclass(frozen=True)
class Boost:
    """PAI: in ``layers``, the last query's score ``x`` of each row in ``keys`` on that row's image keys becomes
    ``x + alpha * |x|`` before the softmax (github.com/LALBJ/PAI, ``attention.py``)."""

    alpha: float
    layers: frozenset[int]
    keys: dict[int, torch.Tensor]
    name: str = "PAI's edit"
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

    def apply(self, scores: torch.Tensor, rows: list[int]) -> None:
        """Edit ``rows``' float32 scores ``(rows, heads, queries, keys)`` in place: the last query's only."""
        last = scores[:, :, -1:, :]  # a view: the edit writes into ``scores``
        last.copy_(boost_scores(last, self.columns(rows, scores.shape[-1], scores.device), self.alpha))


@dataclass(frozen=True)
class Scale:
    """VAF (ClearSight): in ``layers``, each row in ``keys`` has the pre-softmax scores of its queries after its image
    multiplied by ``enhance`` on its image keys and by ``suppress`` on the keys before its image (the system
    prompt; github.com/ustc-hyin/ClearSight, ``visaug/inference/AttnAdapter.py``). At a decode step the one query
    is after the image; at the prefill, the prompt's text after it. The official code takes LLaVA-1.5's fixed
    spans (35 system tokens, 576 image tokens); here each row's spans come from its own tokens."""

    enhance: float
    suppress: float
    layers: frozenset[int]
    keys: dict[int, torch.Tensor]
    name: str = "VAF's edit"

    def rows(self, layer: int, batch: int) -> list[int]:
        """The rows of a ``batch``-row call in ``layer`` that the scaling edits (sorted; empty: none)."""
        return [r for r in sorted(self.keys) if r < batch] if layer in self.layers else []

    def apply(self, scores: torch.Tensor, rows: list[int]) -> None:
        """Edit ``rows``' float32 scores ``(rows, heads, queries, keys)`` in place."""
        nq, nk = scores.shape[-2:]
        image = torch.stack([image_columns(self.keys[r].to(scores.device), nk) for r in rows])  # (rows, keys)
        col = torch.arange(nk, device=scores.device)
        has = image.any(-1)
        first = torch.where(has, image.float().argmax(-1), nk)  # a row without image keys: nothing scaled
        last = torch.where(has, nk - 1 - image.flip(-1).float().argmax(-1), nk)
        before = col[None, :] < first[:, None]
        after = (col[nk - nq :][None, :] > last[:, None])[:, None, :, None]  # (rows, 1, queries, 1)
        scaled = scale_scores(scores, image[:, None, None, :], before[:, None, None, :], self.enhance, self.suppress)
        scores.copy_(torch.where(after, scaled, scores))


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


@dataclass
class SideOutput:
    """ONLY (github.com/zifuwan/ONLY, its ``transformers/.../modeling_llama.py``), one forward's state.

    In LLM layer ``layer``, for each row in ``keys`` (its image-key mask), the newest query's attention map is
    recomputed from the layer's own scores, its text and image columns' outliers and its low text-to-visual
    entropy-ratio heads zeroed (:func:`~causalmm.interventions.only_heads`; the text columns are the row's real
    non-image keys but its first, as the official ``[1:35]`` leaves BOS out), and ``o_proj`` of that map times the
    values is kept (:attr:`carried`, no residual). After the forward, :meth:`logits` takes it through the last
    layer's MLP: ``x = input_norm(A) + 0.2 h_in``, ``x + mlp(post_attention_norm(x))``, then
    ``head(norm(.) + 0.5 norm(h_out))``, with ``h_in``/``h_out`` the last layer's input and output at the newest
    position (read by :meth:`__call__` as the forward's layer reader). With ``layer`` the last one, the official code
    skips the MLP step: ``head(norm(A) + 0.5 norm(h_out))``.
    """

    layer: int
    keys: dict[int, torch.Tensor]
    #: the LLM's last decoder layer, final norm and head, and the model's final-logit soft cap
    last: torch.nn.Module
    norm: torch.nn.Module
    head: torch.nn.Module
    cap: float | None = None
    n_layers: int = 0
    name: str = "ONLY's side output"
    carried: dict[int, torch.Tensor] = field(default_factory=dict)
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    def read(self, module, query, key, value, attention_mask, scaling, kwargs) -> None:
        """In :attr:`layer`: the rows' side output at the newest query."""
        batch, nk = query.shape[0], key.shape[2]
        rows = [r for r in sorted(self.keys) if r < batch]
        if not rows:
            return
        scores, allowed = row_scores(module, query, key, attention_mask, scaling, kwargs, rows, last=True)
        probs = masked_softmax(scores, allowed)[:, :, 0]  # (rows, heads, keys)
        real = allowed[:, 0, 0]  # (rows, keys): the keys the newest query may see
        image = torch.stack([image_columns(self.keys[r].to(real.device), nk) for r in rows]) & real
        first = real.float().argmax(-1)  # each row's first real key (BOS in LLaVA's prompt)
        text = real & ~image
        text[torch.arange(len(rows), device=text.device), first] = False
        kept = only_heads(probs, text, image)
        v = repeat_kv(take_rows(value, rows, batch), query.shape[1]).float()  # (rows, heads, keys, dim)
        out = torch.einsum("rhk,rhkd->rhd", kept, v).reshape(len(rows), -1)
        proj = module.o_proj
        side = proj(out.to(proj.weight.dtype))
        self.carried.update({r: side[i] for i, r in enumerate(rows)})

    def __call__(self, site: Site, hidden: torch.Tensor) -> None:
        """The layer reader: the last layer's input (the output of the one before) and output, newest position."""
        if site.kind == "language" and site.layer >= self.n_layers - 2:
            self.states[site.layer] = hidden[:, -1]

    def logits(self, batch: int) -> torch.Tensor:
        """The side logits ``(batch, vocab)`` in float32 (rows without a side output: NaN)."""
        rows = sorted(r for r in self.carried if r < batch)
        idx = torch.tensor(rows, device=self.states[self.n_layers - 1].device)
        a = torch.stack([self.carried[r] for r in rows])
        final = self.norm(self.states[self.n_layers - 1][idx])
        if self.layer == self.n_layers - 1:
            x = self.norm(a)
        else:
            resid = self.states[self.n_layers - 2][idx] if self.n_layers > 1 else a
            x = self.last.input_layernorm(a) + 0.2 * resid
            x = x + self.last.mlp(self.last.post_attention_layernorm(x))
            x = self.norm(x)
        z = self.head((x + 0.5 * final).to(final.dtype)).float()
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        out = torch.full((batch, z.shape[-1]), float("nan"), device=z.device)
        out[idx] = z
        return out


def image_columns(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A row's image-key mask over ``n`` key columns (columns past the mask are not image keys)."""
    out = torch.zeros(n, dtype=torch.bool, device=mask.device)
    m = mask[:n]
    out[: m.numel()] = m
    return out


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
    allowed = allowed_keys(module, attention_mask, query, key, kwargs.get("is_causal"))
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
    """``(out, weights)`` of one LLM attention call after the base computed it: the watch records, ONLY's layer
    reads its side output, SID's layer
    chooses its hidden keys (see the module docstring; the score edits are :func:`edited_attention`, in place of
    the base)."""
    batch, nk = query.shape[0], key.shape[2]
    watch, prune = state.watch, state.prune
    if state.side is not None and site.layer == state.side.layer:
        state.side.read(module, query, key, value, attention_mask, scaling, kwargs)
    if watch is not None and (watch.layers is None or site.layer in watch.layers):
        rows = [r for r in watch.rows if r < batch]
        if rows:
            one = watch.queries == 1
            scores, allowed = row_scores(module, query, key, attention_mask, scaling, kwargs, rows, last=one)
            probs = masked_softmax(scores[:, :, -watch.queries :], allowed[:, :, -watch.queries :])
            probs = probs.mean(1) if watch.heads == "mean" else probs.amax(1)  # (rows, queries, keys)
            probs = probs[:, 0] if watch.queries == 1 else probs
            watch.seen.setdefault(site.layer, {}).update({r: probs[i] for i, r in enumerate(rows)})
    if prune is not None and site.layer == prune.select:
        # each pruned row chooses from its own attention there, or, where that layer is shared, its source row's
        at = {r: r if prune.source is None else prune.source[r] for r in sorted(prune.keys)}
        sources = sorted({a for a in at.values() if a < batch})
        if sources:
            scores, allowed = row_scores(module, query, key, attention_mask, scaling, kwargs, sources, last=True)
            attn = masked_softmax(scores, allowed).mean(1)[:, 0]
            of = {a: i for i, a in enumerate(sources)}  # each source row's place in `attn`
            for r, a in at.items():
                if a in of:
                    image = image_columns(prune.keys[r].to(attn.device), nk)
                    prune.hidden[r] = image & ~least_attended(attn[of[a]], image, prune.keep)
        # (from the next layer on, the hidden keys are masked before the call: prune_mask)
    return out, weights


def edited_attention(module, edit, rows: list[int], base, query, key, value, attention_mask, scaling, dropout,
                     kwargs):  # fmt: skip
    """``(out, weights)`` of one LLM attention call in which ``rows`` carry an edit of their pre-softmax scores
    (:class:`Boost`, :class:`Scale`): those rows computed here (eager, float32, ``edit.apply`` on their scores before
    the softmax), the other rows by ``base`` alone, so no row is computed twice and the others get exactly what
    ``base`` gives them."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__} uses attention sinks, which {edit.name} does not support")
    batch = query.shape[0]
    scores, allowed = row_scores(module, query, key, attention_mask, scaling, kwargs, rows)
    edit.apply(scores, rows)
    probs = masked_softmax(scores, allowed)
    v = repeat_kv(take_rows(value, rows, batch), query.shape[1])
    mine = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).to(query.dtype)
    edited = set(rows)
    others = [r for r in range(batch) if r not in edited]
    if not others:
        return mine.contiguous(), probs.to(query.dtype)
    theirs, weights = base(
        module, take_rows(query, others, batch), take_rows(key, others, batch), take_rows(value, others, batch),
        take_rows(attention_mask, others, batch), scaling=scaling, dropout=dropout, **kwargs,
    )  # fmt: skip
    out = put_rows([(rows, mine), (others, theirs)], batch)
    if weights is not None:
        weights = put_rows([(rows, probs.to(weights.dtype)), (others, weights)], batch)
    return out, weights
