"""The shared-prefix prefill: rows that compute the same image prefix (questions about one image, with the same
image features and the same language draws there) prefill it once and fork its KV cache.

Three forwards, then a merge:

1. **prefixes** — one row per prefix group over its image prefix, plus every row that shares nothing over its
   whole prompt, left-padded to :attr:`PrefixLayout.prefix_width`;
2. **suffixes** — every row of a group, on its group's cache (forked: a row gather of every layer), over its own
   suffix, left-padded to :attr:`PrefixLayout.suffix_width`. A reusing row is laid out as
   ``[padding, prefix, padding, suffix]``; its position ids come from that whole layout (the adapter's own
   numbering, M-RoPE included), so its real tokens get exactly the positions of the reference prefill, and the
   attention mask hides both paddings;
3. **fed rows** (with layer sharing only) — a language row in no group whose factual row reuses a prefix does
   not run the layers below the first intervened one at all: the first two forwards keep the states entering
   that layer, and this forward runs such rows over their factual row's layout from that layer on, fed those
   states (the random maps are drawn over real tokens only, so the middle padding changes nothing);
4. **merge** — caches, masks, positions and logits in the engine's row order, as the reference prefill
   (:meth:`Forward.prefill`) returns them. The rows of the first forward that share nothing get
   ``suffix_width`` masked cache slots on the left, so every row keeps only left padding before its own tokens.

Below the first intervened layer, rows with the same lower key and layout run once in the first two forwards
(a language row with its factual row); the merged cache keeps there the rows the sharing plan keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from .forward import TOKEN_KEYS, Forward, Prefill, extra_inputs
from .rows import Row, RowLayout
from .sharing import RowPlan, capture_input, feed_lower_layers, select_cache_rows

__all__ = ["PrefixLayout", "image_prefix", "prefill_shared"]


def image_prefix(enc: dict[str, torch.Tensor], image_tokens: torch.Tensor) -> int:
    """Length of a prompt's image prefix: its tokens up to and including the last image token (0: none)."""
    if not image_tokens.numel():
        return 0
    at = torch.isin(enc["input_ids"][0], image_tokens).nonzero()
    return int(at[-1]) + 1 if at.numel() else 0


def _common_prefix(encs: list[dict[str, torch.Tensor]], lengths: list[int]) -> int:
    """Length of the image prefix all ``encs`` share (every token key equal), or 0 where it cannot be reused: the
    prompts must have the same image prefix, and at least one token of each must follow it.

    The prefix ends at the last image token, not at the longest common prefix: that is where a language row's
    draws switch from its image's stream to its sample's (:class:`~causalmm.sites.Draws`), so every row of a
    group, language rows included, forks at the same point (a few common text tokens are left to the suffixes).
    """
    n = lengths[0]
    if n < 1 or any(m != n or int(e["input_ids"].shape[1]) <= n for e, m in zip(encs, lengths, strict=True)):
        return 0
    for key in (k for k in TOKEN_KEYS if k in encs[0]):
        first = encs[0][key][0, :n]
        if any(not torch.equal(e[key][0, :n], first) for e in encs[1:]):
            return 0
    return n


def _lpad(t: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """A 1-D tensor left-padded with ``fill`` to ``length``."""
    return torch.cat([t.new_full((length - t.numel(),), fill), t])


@dataclass
class PrefixLayout:
    """Who runs where in a shared prefill; rows are engine row indices."""

    groups: list[tuple[list[int], int]]  # (member rows, image-prefix length) of each prefix group
    lower_source: list[int]  # each row's source in the layers below `share_low` (itself where nothing is shared)
    fed: list[int]  # rows the fed forward runs: no group of their own, their source reuses a prefix
    whole: list[int]  # rows that share nothing: the prefix forward runs their whole prompt
    prefix_width: int  # the prefix forward's length (prefixes and whole rows, left-padded)
    suffix_width: int  # the suffix forward's length (suffixes, left-padded)
    prefix_tokens: dict[str, torch.Tensor]  # the prefix forward's tokens: one row per group, then the whole rows
    reuse_tokens: dict[str, torch.Tensor]  # the reusing rows' whole layout `[padding, prefix, padding, suffix]`
    prefix_positions: torch.Tensor  # the prefix forward's position ids
    reuse_positions: torch.Tensor  # the reusing rows' position ids over their whole layout

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @cached_property
    def reusing(self) -> list[int]:
        return sorted(i for members, _ in self.groups for i in members)

    @cached_property
    def group_of(self) -> dict[int, int]:
        return {i: k for k, (members, _) in enumerate(self.groups) for i in members}

    @cached_property
    def fed_sources(self) -> torch.Tensor:
        """Each fed row's source, as an index into :attr:`reusing` (the suffix forward's rows)."""
        at = {i: j for j, i in enumerate(self.reusing)}
        return torch.tensor([at[self.lower_source[i]] for i in self.fed], dtype=torch.long,
                            device=self.reuse_positions.device)  # fmt: skip


def _layout(fw: Forward, layout: RowLayout, plan: RowPlan | None) -> PrefixLayout | None:
    """Groups, the rows of each forward, their left-padded tokens and positions; ``None`` where no two rows
    share a prefix."""
    ad, rows = fw.adapter, layout.rows
    keys = [k for k in TOKEN_KEYS if k in layout.enc(rows[0])]
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        by_key.setdefault(layout.prefix_key(r), []).append(i)
    groups: list[tuple[list[int], int]] = []
    for members in by_key.values():
        if len(members) > 1:
            plen = _common_prefix([layout.enc(rows[i]) for i in members], [layout.prefix_len(rows[i]) for i in members])
            if plen:
                groups.append((members, plen))
    if not groups:
        return None
    plen_of = {i: plen for members, plen in groups for i in members}
    source = list(range(len(rows))) if plan is None else plan.sources
    fed = [i for i in range(len(rows)) if i not in plen_of and source[i] != i and source[i] in plen_of]
    whole = [i for i in range(len(rows)) if i not in plen_of and i not in fed]
    reusing = sorted(plen_of)

    def tok(i: int, key: str) -> torch.Tensor:
        return layout.enc(rows[i])[key][0]

    def fill(key: str) -> int:
        return fw.pad_id if key == "input_ids" else 0

    la = max([plen for _, plen in groups] + [tok(i, "input_ids").numel() for i in whole])
    ls = max(tok(i, "input_ids").numel() - plen_of[i] for i in reusing)
    parts = [(members[0], plen) for members, plen in groups] + [(i, None) for i in whole]
    prefix_tokens = {
        key: torch.stack([_lpad(tok(i, key)[:plen], la, fill(key)) for i, plen in parts]).to(ad.device)
        for key in keys
    }
    reuse_tokens = {
        key: torch.stack(
            [
                torch.cat(
                    [_lpad(tok(i, key)[: plen_of[i]], la, fill(key)), _lpad(tok(i, key)[plen_of[i] :], ls, fill(key))]
                )
                for i in reusing
            ]
        ).to(ad.device)
        for key in keys
    }
    reuse_positions = ad.prefill_positions(reuse_tokens, fw.image_meta(layout, reusing))
    prefix_positions = [reuse_positions[..., [reusing.index(members[0]) for members, _ in groups], :la]]
    if whole:
        whole_tokens = {key: v[len(groups) :] for key, v in prefix_tokens.items()}
        prefix_positions.append(ad.prefill_positions(whole_tokens, fw.image_meta(layout, whole)))
    return PrefixLayout(
        groups, source, fed, whole, la, ls, prefix_tokens, reuse_tokens, torch.cat(prefix_positions, dim=-2),
        reuse_positions,
    )  # fmt: skip


def _entering(fw: Forward, pl: PrefixLayout):
    """The states entering layer ``share_low`` in a forward, which only the fed forward needs."""
    import contextlib

    return capture_input(fw.adapter.lm_layers[fw.share_low]) if pl.fed else contextlib.nullcontext([])


def _run_prefixes(fw: Forward, pl: PrefixLayout, layout: RowLayout, row_feature, lang_draws):
    """Each group's first row over its prefix, each whole row over its prompt. Returns the output, the cache
    (every row of this forward in every layer) and the states entering ``share_low`` (if the fed forward needs
    them)."""
    rows, g = layout.rows, pl.n_groups
    run = [members[0] for members, _ in pl.groups] + pl.whole
    inputs = {
        "input_ids": pl.prefix_tokens["input_ids"],
        **extra_inputs(pl.prefix_tokens),
        **fw.features([rows[i] for i in run], row_feature),
    }
    lang = {j: lang_draws[i] for j, i in enumerate(run) if i in lang_draws}
    # a group's first row runs the prefix only, a whole row its whole prompt: equal keys need one layout
    plan = fw.plan([(j < g, layout.lower_key(rows[i])) for j, i in enumerate(run)])
    cache = fw.new_cache()
    with _entering(fw, pl) as hidden:
        out = fw(inputs, pl.prefix_tokens["attention_mask"], pl.prefix_positions, cache, lang, plan)
    if plan is not None:  # every row of this forward back in the lower layers, for the merge
        select_cache_rows(cache, fw.share_low, None, plan.gather)
    return out, cache, hidden


def _run_suffixes(fw: Forward, pl: PrefixLayout, layout: RowLayout, lang_draws, prefix_cache: DynamicCache):
    """Every reusing row's suffix on its group's cache, forked (below ``share_low``, on the sharing plan's rows).
    Returns as :func:`_run_prefixes` does, rows in ``pl.reusing`` order."""
    low, rows = fw.share_low, layout.rows
    plan = fw.plan([layout.lower_key(rows[i]) for i in pl.reusing])
    fork = torch.tensor([pl.group_of[i] for i in pl.reusing], device=fw.adapter.device)
    fork_low = fork if plan is None else fork[plan.keep]
    cache = fw.new_cache(
        data=[
            (lay.keys[f], lay.values[f])
            for n_layer, lay in enumerate(prefix_cache.layers)
            for f in (fork_low if n_layer < low else fork,)
        ]
    )
    la = pl.prefix_width
    inputs = {"input_ids": pl.reuse_tokens["input_ids"][:, la:], **extra_inputs(pl.reuse_tokens, la)}
    lang = {j: lang_draws[i] for j, i in enumerate(pl.reusing) if i in lang_draws}
    mask, positions = pl.reuse_tokens["attention_mask"], pl.reuse_positions[..., la:]
    with _entering(fw, pl) as hidden:
        out = fw(inputs, mask, positions, cache, lang, plan)
    if plan is not None:  # every reusing row back in the lower layers, for the merge
        select_cache_rows(cache, low, None, plan.gather)
    return out, cache, hidden


def _run_fed(fw: Forward, pl: PrefixLayout, layout: RowLayout, row_feature, lang_draws, h_prefix, h_suffix):
    """The fed rows from layer ``share_low`` on, over their source's layout, fed the source's states. Returns the
    output and the cache (layers from ``share_low`` on)."""
    src = pl.fed_sources
    hidden = torch.cat([h_prefix[0][[pl.group_of[pl.lower_source[i]] for i in pl.fed]], h_suffix[0][src]], dim=1)
    cache = fw.new_cache()
    inputs = {
        "input_ids": pl.reuse_tokens["input_ids"][src],
        **{k: v[src] for k, v in extra_inputs(pl.reuse_tokens).items()},
        **fw.features([layout.rows[i] for i in pl.fed], row_feature),
    }
    lang = {j: lang_draws[i] for j, i in enumerate(pl.fed) if i in lang_draws}
    mask, positions = pl.reuse_tokens["attention_mask"][src], pl.reuse_positions[..., src, :]
    with feed_lower_layers(fw.adapter.lm_layers[: fw.share_low], hidden):
        out = fw(inputs, mask, positions, cache, lang)
    return out, cache


def _merge(fw: Forward, pl: PrefixLayout, plan: RowPlan | None, outs: tuple, caches: tuple, reserve: int) -> Prefill:
    """The three forwards merged in row order: layers from ``share_low`` on hold every row (reusing, fed, whole),
    the layers below the rows of the sharing plan (no fed row is among them)."""
    (out_p, out_s, out_f), (cache_p, cache_s, cache_f) = outs, caches
    dev, g, low, n = fw.adapter.device, pl.n_groups, fw.share_low, len(pl.lower_source)
    upper, lower = pl.reusing + pl.fed + pl.whole, pl.reusing + pl.whole
    up_idx = torch.tensor([upper.index(i) for i in range(n)], device=dev)
    low_idx = torch.tensor([lower.index(i) for i in (plan.keep if plan is not None else range(n))], device=dev)
    pad, ls = torch.nn.functional.pad, pl.suffix_width
    merged = []
    for n_layer, (lay_s, lay_p) in enumerate(zip(cache_s.layers, cache_p.layers, strict=True)):
        kv = []
        for attr in ("keys", "values"):
            parts = [getattr(lay_s, attr)]
            if pl.fed and n_layer >= low:
                parts.append(getattr(cache_f.layers[n_layer], attr))
            parts.append(pad(getattr(lay_p, attr)[g:], (0, 0, ls, 0)))
            kv.append(torch.cat(parts)[up_idx if n_layer >= low else low_idx])
        merged.append(tuple(kv))
    cache = fw.new_cache(reserve, merged)
    src = pl.fed_sources
    r_mask, r_pos, p_pos = pl.reuse_tokens["attention_mask"], pl.reuse_positions, pl.prefix_positions
    mask = torch.cat([r_mask, r_mask[src], pad(pl.prefix_tokens["attention_mask"][g:], (ls, 0))])[up_idx]
    positions = torch.cat([r_pos[..., -1:], r_pos[..., src, -1:], p_pos[..., g:, -1:]], dim=-2)[..., up_idx, :]
    fed_logits = [out_f.logits[:, -1]] if pl.fed else []
    logits = torch.cat([out_s.logits[:, -1], *fed_logits, out_p.logits[g:, -1]]).float()[up_idx]
    return logits, cache, mask, positions


def prefill_shared(
    fw: Forward,
    layout: RowLayout,
    row_feature: Callable[[Row], Any],
    lang_draws: dict[int, Any],
    plan: RowPlan | None,
    reserve: int,
) -> tuple[Prefill, dict[str, int]] | None:
    """Prefill with shared prefixes (the module docstring); ``None`` where no two rows share one (then use
    :meth:`Forward.prefill`). Also returns what was shared (groups, prefix tokens, rows), for diagnostics."""
    pl = _layout(fw, layout, plan)
    if pl is None:
        return None
    out_p, cache_p, h_p = _run_prefixes(fw, pl, layout, row_feature, lang_draws)
    out_s, cache_s, h_s = _run_suffixes(fw, pl, layout, lang_draws, cache_p)
    out_f, cache_f = _run_fed(fw, pl, layout, row_feature, lang_draws, h_p, h_s) if pl.fed else (None, None)
    stats = {
        "groups": pl.n_groups,
        "prefix_tokens": sum(p for _, p in pl.groups),
        "shared_rows": len(pl.reusing),
        "fed_rows": len(pl.fed),
    }
    return _merge(fw, pl, plan, (out_p, out_s, out_f), (cache_p, cache_s, cache_f), reserve), stats
