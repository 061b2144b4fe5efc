"""The decoding engine: branches, per-branch KV caches, the contrast rule, sampling.

One generation call lays out, for every prompt, a factual row and one row per counterfactual branch and
draw (``num_cf_samples``). Image features are computed once per image and branch kind (factual,
vision-intervened draw k, noised draw k); then every step runs **one** batched forward over all rows of
all prompts, each row with its own cache entries, and combines each prompt's rows with :func:`contrast`.
The chosen token is appended to every row of that prompt.

With ``reuse_prefix`` (the default where the adapter supports it), rows that compute the same thing over a
shared prompt prefix (questions about one image, with the same image features) prefill that prefix once and
fork its KV cache; see :meth:`Engine._prefill_shared`. With ``share_layers`` (the default where the adapter
supports it), a language-branch row runs the LLM layers below the first intervened one only through its
factual row, whose output and KV cache there it reuses (``causalmm.sharing``), in prefill and decode alike.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .adapters import Adapter
from .attention import Draws, Intervention, SiteRule, intervene
from .cache import growing_cache
from .config import CausalMMConfig, ConfigError, resolve_layers
from .head import head_on_rows, plausible, plausible_logits
from .interventions import diffusion_noise
from .methods import Branch, branches_for
from .sharing import RowPlan, capture_input, feed_lower_layers, select_cache_rows, share_lower_layers

__all__ = ["Engine", "GenerationOptions", "GenerationResult", "cache_kwargs", "contrast", "derive_seed"]


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword argument ``model``'s forward takes its KV cache by.

    ``transformers`` 5.24 renamed ``past_key_values`` to ``cache``: the old name still works there but warns on
    every forward (a FutureWarning; it goes in 5.40), and older 5.x versions know only ``past_key_values``.
    """
    return {_cache_kwarg(type(model)): cache}


@functools.cache
def _cache_kwarg(model_cls: type) -> str:
    """The forward's name for the cache, read once per model class from its signature (decorators keep it)."""
    params = inspect.signature(model_cls.forward).parameters
    if "cache" in params or "past_key_values" in params:
        return "cache" if "cache" in params else "past_key_values"
    # a forward taking everything by **kwargs passes them on to a stock model: the installed version decides
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def contrast(
    factual: torch.Tensor,
    counterfactuals: list[torch.Tensor],
    *,
    gamma: float,
    epsilon: float,
    space: str = "logits",
) -> torch.Tensor:
    """The CausalMM rule (SPEC 1.3) for next-token scores ``(..., vocab)``.

    ``z = l + gamma * sum_b (l - l_b)``, then ``z = -inf`` wherever the factual probability is below
    ``epsilon`` times the factual maximum. ``space="logprobs"`` takes the contrast on log-probabilities.

    >>> l = torch.tensor([2.0, 1.0, -3.0]); lb = torch.tensor([1.0, 1.5, -3.0])
    >>> contrast(l, [lb], gamma=1.0, epsilon=0.1)
    tensor([3.0000, 0.5000,   -inf])
    """
    fl = factual.float()
    cfs = [c.float() for c in counterfactuals]
    if space == "logprobs":
        fl = torch.log_softmax(fl, -1)
        cfs = [torch.log_softmax(c, -1) for c in cfs]
    z = fl + gamma * sum((fl - c for c in cfs), torch.zeros_like(fl))
    return z.masked_fill(~plausible(factual, epsilon), float("-inf"))


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints/strings (independent streams per sample, branch, draw)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") % (2**32) for p in parts]
    return int(np.random.SeedSequence([w % (2**63) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class GenerationOptions:
    """Token-selection options shared by every method (validated)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1 (or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class GenerationResult:
    """One prompt's output. ``branch_logits`` (opt-in) maps branch name -> ``(steps, vocab)`` float32 scores:
    ``factual``, each counterfactual branch (mean over draws) and ``combined`` (the rule's output)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int
    branch_logits: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class _Row:
    prompt: int
    branch: Branch | None  # None = factual
    draw: int = 0


def _select(logits: torch.Tensor, opts: GenerationOptions, history: list[int], gen: torch.Generator) -> int:
    """Pick the next token from combined scores ``(vocab,)``: repetition penalty, then greedy or sampling."""
    z = logits.clone()
    if opts.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)), device=z.device)
        vals = z[idx]
        z[idx] = torch.where(vals < 0, vals * opts.repetition_penalty, vals / opts.repetition_penalty)
    if not opts.do_sample:
        return int(z.argmax())
    z = z / opts.temperature
    if opts.top_k is not None and opts.top_k < z.numel():
        kth = torch.topk(z, opts.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False)
        cum = sorted_z.softmax(-1).cumsum(-1)
        drop = cum <= 1 - opts.top_p
        drop[-1] = False  # always keep the most likely token
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = z.softmax(-1)
    return int(torch.multinomial(probs.to(gen.device), 1, generator=gen))


#: at most this many tokens of room reserved per cache layer at a time: a longer answer reallocates (one copy)
#: every so many tokens, and a row that stops early leaves at most this much unused
_RESERVE_CHUNK = 64
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
#: What a prefill hands to the decode loop, rows in engine order: last-position logits ``(rows, vocab)``, the
#: cache, the attention mask ``(rows, length)`` and position ids (only the last column is read afterwards).
_Prefill = tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]


def _image_digest(image: Image.Image, memo: dict[int, str]) -> str:
    """A digest of an image's pixels: equal pixels (or the same object) mean equal image features."""
    if id(image) not in memo:
        h = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
        h.update(image.tobytes())
        memo[id(image)] = h.hexdigest()
    return memo[id(image)]


def _first_of(keys: list[Any]) -> list[int]:
    """For each item, the index of the first item equal to it."""
    first: dict[Any, int] = {}
    return [first.setdefault(k, i) for i, k in enumerate(keys)]


def _lpad(t: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """A 1-D tensor left-padded with ``fill`` to ``length``."""
    return torch.cat([t.new_full((length - t.numel(),), fill), t])


def _extra(batch: dict[str, torch.Tensor], lo: int = 0) -> dict[str, torch.Tensor]:
    """The per-token inputs besides the ids that a forward takes (token type ids), from column ``lo`` on."""
    return {k: v[:, lo:] for k, v in batch.items() if k in ("token_type_ids", "mm_token_type_ids")}


@dataclass
class _Split:
    """The layout of a shared prefill (:meth:`Engine._prefill_shared`), rows as engine row indices."""

    groups: list[tuple[list[int], int]]  # (member rows, image-prefix length) of each prefix group
    source: list[int]  # each row's source in the layers below `share_low` (itself where nothing is shared)
    fed: list[int]  # rows forward C runs: no group of their own, their source reuses a prefix
    alone: list[int]  # rows that share nothing: forward A runs their whole prompt
    la: int  # forward A's length (prefixes and alone rows, left-padded)
    ls: int  # forward B's length (suffixes, left-padded)
    a_batch: dict[str, torch.Tensor]  # forward A's tokens: one row per group, then the alone rows
    s_batch: dict[str, torch.Tensor]  # the reusing rows' whole layout `[padding, prefix, padding, suffix]`
    a_pos: torch.Tensor  # forward A's position ids
    s_pos: torch.Tensor  # the reusing rows' position ids over their whole layout

    @property
    def g(self) -> int:
        return len(self.groups)

    @cached_property
    def reusing(self) -> list[int]:
        return sorted(i for members, _ in self.groups for i in members)

    @cached_property
    def group_of(self) -> dict[int, int]:
        return {i: k for k, (members, _) in enumerate(self.groups) for i in members}

    @cached_property
    def fed_sources(self) -> torch.Tensor:
        """Each fed row's source, as an index into :attr:`reusing` (forward B's rows)."""
        at = {i: j for j, i in enumerate(self.reusing)}
        return torch.tensor([at[self.source[i]] for i in self.fed], dtype=torch.long, device=self.s_pos.device)


class Engine:
    """Runs a :class:`CausalMMConfig` on one model through its :class:`Adapter`.

    ``reuse_prefix``: prefill a prompt prefix shared by several rows once and fork its KV cache (and compute
    the features of an image repeated in the batch once). It is used only where the adapter declares
    :attr:`Adapter.supports_prefix_reuse` and the cache is plain full-attention layers; ``False`` keeps the
    reference path (every row prefilled in full), which the parity tests compare against.

    ``share_layers``: rows that compute the same thing below the first intervened LLM layer (a language-branch
    row and its prompt's factual row) run those layers once; used where the adapter declares
    :attr:`Adapter.supports_layer_sharing`. ``False`` runs every row through every layer.

    ``plausible_head``: in decode steps the LM head runs on the factual rows only, and the counterfactual rows'
    logits are computed on the tokens the plausibility cut keeps, the only ones the rule reads
    (``causalmm.head``); used where the adapter declares :attr:`Adapter.plain_lm_head`, with raw-logit contrast,
    ``epsilon > 0`` and no branch logits requested. ``False`` runs the head on every row.

    ``preallocate_cache``: the decoding KV cache reserves room for the answer at prefill and each step writes
    its token in place (``causalmm.cache``), where ``DynamicCache`` copies the whole cache of every row at every
    step; used where the cache is plain full-attention layers. ``False`` keeps ``DynamicCache``.
    """

    def __init__(
        self,
        adapter: Adapter,
        config: CausalMMConfig,
        *,
        reuse_prefix: bool = True,
        share_layers: bool = True,
        plausible_head: bool = True,
        preallocate_cache: bool = True,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.branches = branches_for(config)
        self.vision_rule = self.language_rule = None
        if any(b.vision for b in self.branches):
            if config.vision_style == "gate" and not adapter.supports_gate:
                raise ConfigError(
                    "vision_style='gate' needs a CLIP-style tower with a square patch grid (LLaVA family); "
                    f"{type(adapter.model).__name__} has none: use vision_style='attention'"
                )
            try:
                layers = (
                    adapter.default_vision_layers()
                    if config.vision_layers is None
                    else resolve_layers(config.vision_layers, adapter.n_vision_layers, what="vision layer")
                )
            except ConfigError as err:
                raise ConfigError(
                    f"{err}; only the vision layers up to the one that feeds the LLM count "
                    f"(the tower has {len(adapter.vision_attn)})"
                ) from None
            self.vision_rule = SiteRule(config.vision_cf, frozenset(layers), config.vision_heads, config.renormalize)
            self._check_heads(config.vision_heads, adapter.vision_attn[0], "vision")
        if any(b.language for b in self.branches):
            spec = "middle" if config.language_layers is None else config.language_layers
            layers = resolve_layers(spec, adapter.n_language_layers, what="language layer")
            self.language_rule = SiteRule(
                config.language_cf, frozenset(layers), config.language_heads, config.renormalize
            )
            self._check_heads(config.language_heads, adapter.lm_attn[0], "language")
        gc = adapter.model.generation_config
        eos = gc.eos_token_id if gc is not None else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        tok = getattr(adapter.processor, "tokenizer", adapter.processor)
        if tok.eos_token_id is not None and not eos:
            eos = [tok.eos_token_id]
        self.eos = set(eos)
        self.tokenizer = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        self.pad_id = int(pad)
        text_cfg = adapter.model.config.get_text_config()
        self._text_config = text_cfg
        # In effect only where requested and supported. Forking and left-padding a cache is only sound for
        # plain growing layers (no sliding window).
        plain_cache = all(type(layer) is DynamicLayer for layer in DynamicCache(config=text_cfg).layers)
        self.prefix_reuse = bool(reuse_prefix and adapter.supports_prefix_reuse and plain_cache)
        self.preallocate = bool(preallocate_cache and plain_cache)
        #: decoder layers ``0 .. share_low-1`` run once for rows that compute the same there (0: no sharing)
        self.share_low = 0
        if share_layers and adapter.supports_layer_sharing and plain_cache and self.language_rule is not None:
            self.share_low = min(self.language_rule.layers)
        head = adapter.model.get_output_embeddings()
        #: the LM head when decode steps compute counterfactual logits on the plausible tokens only, else None
        self.head = (
            head
            if plausible_head
            and adapter.plain_lm_head
            and type(head) is torch.nn.Linear  # not a quantised subclass, whose weight cannot be sliced
            and self.branches
            and config.contrast == "logits"
            and config.epsilon > 0
            else None
        )
        mcfg = adapter.model.config
        #: the ids that mark image positions in a prompt
        self._image_tokens = torch.tensor(
            sorted(
                {
                    v
                    for a in ("image_token_id", "image_token_index", "video_token_id")
                    if isinstance(v := getattr(mcfg, a, None), int)
                }
            ),
            dtype=torch.long,
        )

    @staticmethod
    def _check_heads(heads: tuple[int, ...] | None, module: torch.nn.Module, where: str) -> None:
        n = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
        if heads is not None and n is not None and max(heads) >= n:
            raise ConfigError(f"{where} head index {max(heads)} is out of range: the model has {n} heads (0..{n - 1})")

    # -- inputs ------------------------------------------------------------------------------------
    def _features(self, imgs: list[dict[str, torch.Tensor]], kind: str, seeds: list[int], draws: int):
        """Image features for every (prompt, draw): factual, vision-intervened or noised."""
        ad, cfg = self.adapter, self.config
        if kind == "factual":
            return {(p, 0): f for p, f in enumerate(ad.image_features(ad.collate_images(imgs)))}
        keys = [(p, k) for p in range(len(imgs)) for k in range(draws)]
        if kind == "noise":
            noised = []
            for p, k in keys:
                gen = torch.Generator(device=ad.device).manual_seed(derive_seed(seeds[p], "noise", k))
                item = dict(imgs[p])
                item["pixel_values"] = diffusion_noise(
                    item["pixel_values"].to(ad.device), cfg.noise_step, generator=gen, schedule=cfg.noise_schedule
                )
                noised.append(item)
            return dict(zip(keys, ad.image_features(ad.collate_images(noised)), strict=True))
        batch = ad.collate_images([imgs[p] for p, _ in keys])
        targets, off = [], 0
        for (p, k), units in zip(keys, ad.vision_units(batch), strict=True):
            gen = torch.Generator(device=ad.device).manual_seed(derive_seed(seeds[p], "vision", k))
            targets.append((off, off + units, gen))
            off += units
        if cfg.vision_style == "gate":
            return dict(zip(keys, ad.gated_image_features(batch, self.vision_rule, targets), strict=True))
        state = Intervention(vision=self.vision_rule, vision_targets=targets)
        return dict(zip(keys, ad.image_features(batch, state), strict=True))

    def _collate_tokens(self, encs: list[dict[str, torch.Tensor]], rows: list[_Row]) -> dict[str, torch.Tensor]:
        length = max(e["input_ids"].shape[1] for e in encs)
        out: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            enc = encs[row.prompt]
            n = enc["input_ids"].shape[1]
            for key in _TOKEN_KEYS:
                if key in enc:
                    fill = self.pad_id if key == "input_ids" else 0
                    t = enc[key][0]
                    out.setdefault(key, []).append(torch.cat([t.new_full((length - n,), fill), t]))
        return {k: torch.stack(v).to(self.adapter.device) for k, v in out.items()}

    def _shared_features(
        self, imgs: list[dict[str, torch.Tensor]], kind: str, seeds: list[int], draws: int, rep: list[int]
    ) -> dict[tuple[int, int], Any]:
        """:meth:`_features` run only for the representative prompts ``rep`` and handed to every prompt."""
        uniq = sorted(set(rep))
        at = {q: j for j, q in enumerate(uniq)}
        sub = self._features([imgs[q] for q in uniq], kind, [seeds[q] for q in uniq], draws)
        ks = [0] if kind == "factual" else range(draws)
        return {(p, k): sub[(at[rep[p]], k)] for p in range(len(imgs)) for k in ks}

    def _meta(self, imgs: list[dict[str, torch.Tensor]], rows: list[_Row], which: list[int]) -> dict[str, Any]:
        """Non-pixel image inputs (grid sizes...) of rows ``which``, as position helpers want them."""
        items = [{k: v for k, v in imgs[rows[i].prompt].items() if k != "pixel_values"} for i in which]
        return {k: v.to(self.adapter.device) for k, v in self.adapter.collate_images(items).items()}

    def _forward(
        self,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        language_rows: dict[int, Draws],
        plan: RowPlan | None = None,
    ) -> Any:
        """One forward of the LLM with the language intervention on ``language_rows`` (batch indices); with a
        ``plan``, the layers below :attr:`share_low` run on ``plan.keep`` only (their cache holds those rows)."""
        state = Intervention(language=self.language_rule, language_rows=language_rows)
        shared = (
            share_lower_layers(self.adapter.lm_layers[: self.share_low], plan)
            if plan is not None and self.share_low
            else contextlib.nullcontext()
        )
        with intervene(state), shared:
            return self.adapter.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions,
                **cache_kwargs(self.adapter.model, cache),
                use_cache=True,
                logits_to_keep=1,
            )

    def _step(
        self,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        language_rows: dict[int, Draws],
        plan: RowPlan | None,
        rows: list[_Row],
        full_head: bool = False,
    ) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` of one decode step (float32). With :attr:`head`, the counterfactual
        rows' logits are exact on the plausible tokens only (the only ones the rule reads); ``full_head`` (branch
        logits asked for) computes them whole."""
        cf = [j for j, r in enumerate(rows) if r.branch is not None]
        if self.head is None or full_head or not cf:
            return self._forward(inputs, mask, positions, cache, language_rows, plan).logits[:, -1].float()
        fact = [j for j, r in enumerate(rows) if r.branch is None]
        with head_on_rows(self.head, fact) as kept:
            out = self._forward(inputs, mask, positions, cache, language_rows, plan)
        at = {rows[j].prompt: k for k, j in enumerate(fact)}
        return plausible_logits(
            self.head, kept["hidden"][:, -1], out.logits[:, -1], [at[r.prompt] for r in rows], cf, self.config.epsilon
        )

    def _plan(self, keys: list[Any]) -> RowPlan | None:
        """The sharing plan of a batch whose rows have lower-layer keys ``keys`` (rows with equal keys compute
        the same below :attr:`share_low`; ``None`` shares with no row), or ``None`` where no row shares."""
        if not self.share_low:
            return None
        first: dict[Any, int] = {}
        plan = RowPlan([j if k is None else first.setdefault(k, j) for j, k in enumerate(keys)])
        return plan if plan.shares else None

    def _cache(self, reserve: int, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        """The cache decoding runs on, holding ``data`` (one ``(keys, values)`` per layer) if given: with
        :attr:`preallocate`, room for ``reserve`` more tokens per layer (``causalmm.cache``)."""
        if self.preallocate:
            return growing_cache(self._text_config, min(reserve, _RESERVE_CHUNK), data)
        return DynamicCache(data, config=self._text_config)

    def _prefill_full(self, encs, imgs, rows, row_feature, lang_gens, plan, reserve) -> _Prefill:
        """The reference prefill: every row's whole prompt, left-padded, in one forward (the layers below
        :attr:`share_low` on the rows ``plan`` keeps only, whose cache keeps those rows); the cache has room for
        ``reserve`` more tokens."""
        ad = self.adapter
        batch = self._collate_tokens(encs, rows)
        positions = ad.prefill_positions(batch, self._meta(imgs, rows, list(range(len(rows)))))
        cache = self._cache(reserve)
        inputs = {
            "input_ids": batch["input_ids"],
            **_extra(batch),
            **ad.features_input([row_feature(r) for r in rows]),
        }
        out = self._forward(inputs, batch["attention_mask"], positions, cache, dict(lang_gens), plan)
        return out.logits[:, -1].float(), cache, batch["attention_mask"], positions

    def _image_prefix(self, enc: dict[str, torch.Tensor]) -> int:
        """Length of a prompt's image prefix: its tokens up to and including the last image token (0: none)."""
        if not self._image_tokens.numel():
            return 0
        at = torch.isin(enc["input_ids"][0], self._image_tokens).nonzero()
        return int(at[-1]) + 1 if at.numel() else 0

    def _shared_prefix(self, encs: list[dict[str, torch.Tensor]]) -> int:
        """Length of the image prefix all ``encs`` share (every token key equal), or 0 where it cannot be reused:
        the prompts must have the same image prefix, and at least one token of each must follow it.

        The prefix ends at the last image token, not at the longest common prefix: that is where a language row's
        draws switch from its image's stream to its sample's (:class:`~causalmm.attention.Draws`), so every row
        of a group, language rows included, forks at the same point (a few common text tokens are left to the
        suffixes)."""
        n = self._image_prefix(encs[0])
        if n < 1 or any(self._image_prefix(e) != n or int(e["input_ids"].shape[1]) <= n for e in encs):
            return 0
        for key in (k for k in _TOKEN_KEYS if k in encs[0]):
            first = encs[0][key][0, :n]
            if any(not torch.equal(e[key][0, :n], first) for e in encs[1:]):
                return 0
        return n

    def _prefill_shared(
        self, encs, imgs, rows, row_feature, share_key, lang_gens, lower_key, plan, reserve
    ) -> _Prefill | None:
        """Prefill with shared prefixes; ``None`` where no two rows share one (then use :meth:`_prefill_full`).

        Rows with the same :func:`share_key` (same features, and the same language draws over the image prefix,
        or none) and the same image prefix (:meth:`_shared_prefix`) form a group. Forward A runs one row per
        group over its prefix, plus the rows that share nothing over their whole prompt, all left-padded to
        ``la``. The group caches are forked to their rows (a row gather of every layer's keys/values) and
        forward B runs each row's own suffix, left-padded to ``ls`` (a language row's suffix queries draw from
        its own sample's stream). A reusing row is laid out as ``[padding, prefix, padding, suffix]``; its
        position ids come from that whole layout (the adapter's own numbering, M-RoPE included), so its real
        tokens get exactly the positions of the reference path, and the attention mask hides both paddings. The
        rows of forward A that share nothing get ``ls`` masked cache slots on the left, so every row keeps only
        left padding before its own tokens (the language intervention draws its random maps over a row's real
        keys). The merged cache, mask and last positions are in ``rows`` order, as :meth:`_prefill_full`
        returns them.

        Shared lower layers: in forwards A and B, rows with the same ``lower_key`` and layout run the layers
        below :attr:`share_low` once (a language row with its factual row). A language row in no group whose
        factual row reuses a prefix (its image seed is the only one of its kind) does not run those layers at
        all: forwards A and B keep the hidden states entering layer ``share_low``, and forward C runs such rows
        over their factual row's layout ``[padding, prefix, padding, suffix]`` from that layer on, fed the
        factual row's states (the random maps are drawn over the real tokens only, so the middle padding changes
        nothing). The merged cache keeps, below :attr:`share_low`, the rows ``plan`` (built from ``lower_key``)
        keeps: each row's mask and positions follow its own layout, and a language row's source has the same
        real tokens at the same positions. The merged cache has room for ``reserve`` more tokens.
        """
        sp = self._split(encs, imgs, rows, share_key, plan)
        if sp is None:
            return None
        out_a, cache_a, h_a = self._forward_a(sp, rows, row_feature, lang_gens, lower_key)
        out_b, cache_b, h_b = self._forward_b(sp, rows, lang_gens, lower_key, cache_a)
        out_c, cache_c = self._forward_c(sp, rows, row_feature, lang_gens, h_a, h_b) if sp.fed else (None, None)
        self.prefill_stats = {
            "groups": sp.g,
            "prefix_tokens": sum(p for _, p in sp.groups),
            "shared_rows": len(sp.reusing),
            "fed_rows": len(sp.fed),
        }
        return self._merge(sp, plan, (out_a, out_b, out_c), (cache_a, cache_b, cache_c), reserve)

    def _split(self, encs, imgs, rows, share_key, plan) -> _Split | None:
        """The layout of a shared prefill (:meth:`_prefill_shared`): its groups, the rows of forwards A, B and C,
        their left-padded token batches and position ids; ``None`` where no two rows share a prefix."""
        ad = self.adapter
        keys = [k for k in _TOKEN_KEYS if k in encs[0]]
        by_key: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            by_key.setdefault(share_key(r), []).append(i)
        groups: list[tuple[list[int], int]] = []
        for members in by_key.values():
            if len(members) > 1 and (plen := self._shared_prefix([encs[rows[i].prompt] for i in members])):
                groups.append((members, plen))
        if not groups:
            return None
        plen_of = {i: plen for members, plen in groups for i in members}
        source = list(range(len(rows))) if plan is None else plan.sources
        # forward C: rows that share no prefix themselves but whose lower layers are a reusing row's
        fed = [i for i in range(len(rows)) if i not in plen_of and source[i] != i and source[i] in plen_of]
        alone = [i for i in range(len(rows)) if i not in plen_of and i not in fed]
        reusing = sorted(plen_of)

        def tok(i: int, key: str) -> torch.Tensor:
            return encs[rows[i].prompt][key][0]

        def fill(key: str) -> int:
            return self.pad_id if key == "input_ids" else 0

        la = max([plen for _, plen in groups] + [tok(i, "input_ids").numel() for i in alone])
        ls = max(tok(i, "input_ids").numel() - plen_of[i] for i in reusing)
        a_parts = [(members[0], plen) for members, plen in groups] + [(i, None) for i in alone]
        a_batch = {
            key: torch.stack([_lpad(tok(i, key)[:plen], la, fill(key)) for i, plen in a_parts]).to(ad.device)
            for key in keys
        }
        s_batch = {
            key: torch.stack(
                [
                    torch.cat(
                        [
                            _lpad(tok(i, key)[: plen_of[i]], la, fill(key)),
                            _lpad(tok(i, key)[plen_of[i] :], ls, fill(key)),
                        ]
                    )
                    for i in reusing
                ]
            ).to(ad.device)
            for key in keys
        }
        s_pos = ad.prefill_positions(s_batch, self._meta(imgs, rows, reusing))
        a_pos = [s_pos[..., [reusing.index(members[0]) for members, _ in groups], :la]]
        if alone:
            f_batch = {key: v[len(groups) :] for key, v in a_batch.items()}
            a_pos.append(ad.prefill_positions(f_batch, self._meta(imgs, rows, alone)))
        return _Split(groups, source, fed, alone, la, ls, a_batch, s_batch, torch.cat(a_pos, dim=-2), s_pos)

    def _entering(self, sp: _Split) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """The states entering layer :attr:`share_low` in a forward, which only forward C needs."""
        return capture_input(self.adapter.lm_layers[self.share_low]) if sp.fed else contextlib.nullcontext([])

    def _forward_a(self, sp: _Split, rows, row_feature, lang_gens, lower_key):
        """Forward A: each group's first row over its prefix, each row sharing nothing over its whole prompt.
        Returns the output, the cache (every row of forward A in every layer) and the states entering
        :attr:`share_low` (if forward C needs them)."""
        g = sp.g
        a_rows = [members[0] for members, _ in sp.groups] + sp.alone
        feats = [row_feature(rows[i]) for i in a_rows]
        inputs = {"input_ids": sp.a_batch["input_ids"], **_extra(sp.a_batch), **self.adapter.features_input(feats)}
        lang = {j: lang_gens[i] for j, i in enumerate(a_rows) if i in lang_gens}
        # a group's first row runs the prefix only, an alone row its whole prompt: equal keys need one layout
        plan = self._plan([(j < g, lower_key(rows[i])) for j, i in enumerate(a_rows)])
        cache = DynamicCache(config=self._text_config)
        with self._entering(sp) as hidden:
            out = self._forward(inputs, sp.a_batch["attention_mask"], sp.a_pos, cache, lang, plan)
        if plan is not None:  # every row of forward A back in the lower layers, for the merge
            select_cache_rows(cache, self.share_low, None, plan.gather)
        return out, cache, hidden

    def _forward_b(self, sp: _Split, rows, lang_gens, lower_key, cache_a: DynamicCache):
        """Forward B: every reusing row's suffix on its group's cache from forward A, forked (below
        :attr:`share_low`, on the sharing plan's rows). Returns as :meth:`_forward_a` does, rows in
        ``sp.reusing`` order."""
        low = self.share_low
        plan = self._plan([lower_key(rows[i]) for i in sp.reusing])
        fork = torch.tensor([sp.group_of[i] for i in sp.reusing], device=self.adapter.device)
        fork_low = fork if plan is None else fork[plan.keep]
        cache = DynamicCache(
            [
                (lay.keys[f], lay.values[f])
                for n_layer, lay in enumerate(cache_a.layers)
                for f in (fork_low if n_layer < low else fork,)
            ],
            config=self._text_config,
        )
        la = sp.la
        inputs = {"input_ids": sp.s_batch["input_ids"][:, la:], **_extra(sp.s_batch, la)}
        lang = {j: lang_gens[i] for j, i in enumerate(sp.reusing) if i in lang_gens}
        with self._entering(sp) as hidden:
            out = self._forward(inputs, sp.s_batch["attention_mask"], sp.s_pos[..., la:], cache, lang, plan)
        if plan is not None:  # every reusing row back in the lower layers, for the merge
            select_cache_rows(cache, low, None, plan.gather)
        return out, cache, hidden

    def _forward_c(self, sp: _Split, rows, row_feature, lang_gens, h_a, h_b):
        """Forward C: the fed rows from layer :attr:`share_low` on, over their source's layout, fed the source's
        states from forwards A and B. Returns the output and the cache (layers from :attr:`share_low` on)."""
        src = sp.fed_sources
        hidden = torch.cat([h_a[0][[sp.group_of[sp.source[i]] for i in sp.fed]], h_b[0][src]], dim=1)
        cache = DynamicCache(config=self._text_config)
        inputs = {
            "input_ids": sp.s_batch["input_ids"][src],
            **{k: v[src] for k, v in _extra(sp.s_batch).items()},
            **self.adapter.features_input([row_feature(rows[i]) for i in sp.fed]),
        }
        lang = {j: lang_gens[i] for j, i in enumerate(sp.fed) if i in lang_gens}
        with feed_lower_layers(self.adapter.lm_layers[: self.share_low], hidden):
            out = self._forward(inputs, sp.s_batch["attention_mask"][src], sp.s_pos[..., src, :], cache, lang)
        return out, cache

    def _merge(self, sp: _Split, plan: RowPlan | None, outs: tuple, caches: tuple, reserve: int) -> _Prefill:
        """Forwards A, B and C merged in ``rows`` order: layers from :attr:`share_low` on hold every row
        (reusing, fed, alone), the layers below the rows of the sharing plan (no fed row is among them)."""
        (out_a, out_b, out_c), (cache_a, cache_b, cache_c) = outs, caches
        dev, g, low, n = self.adapter.device, sp.g, self.share_low, len(sp.source)
        upper, lower = sp.reusing + sp.fed + sp.alone, sp.reusing + sp.alone
        up_idx = torch.tensor([upper.index(i) for i in range(n)], device=dev)
        low_idx = torch.tensor([lower.index(i) for i in (plan.keep if plan is not None else range(n))], device=dev)
        pad = torch.nn.functional.pad
        merged = []
        for n_layer, (lb, lay) in enumerate(zip(cache_b.layers, cache_a.layers, strict=True)):
            kv = []
            for attr in ("keys", "values"):
                parts = [getattr(lb, attr)]
                if sp.fed and n_layer >= low:
                    parts.append(getattr(cache_c.layers[n_layer], attr))
                parts.append(pad(getattr(lay, attr)[g:], (0, 0, sp.ls, 0)))
                kv.append(torch.cat(parts)[up_idx if n_layer >= low else low_idx])
            merged.append(tuple(kv))
        cache = self._cache(reserve, merged)
        src = sp.fed_sources
        s_mask, s_pos, a_pos = sp.s_batch["attention_mask"], sp.s_pos, sp.a_pos
        mask = torch.cat([s_mask, s_mask[src], pad(sp.a_batch["attention_mask"][g:], (sp.ls, 0))])[up_idx]
        positions = torch.cat([s_pos[..., -1:], s_pos[..., src, -1:], a_pos[..., g:, -1:]], dim=-2)[..., up_idx, :]
        fed_logits = [out_c.logits[:, -1]] if sp.fed else []
        logits = torch.cat([out_b.logits[:, -1], *fed_logits, out_a.logits[g:, -1]]).float()[up_idx]
        return logits, cache, mask, positions

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        options: GenerationOptions | None = None,
        *,
        seeds: list[int] | None = None,
        image_seeds: list[int] | None = None,
        return_branch_logits: bool = False,
    ) -> list[GenerationResult]:
        """Generate one answer per (image, prompt); see :class:`GenerationOptions`.

        ``seeds`` gives each sample its own seed (default: ``config.seed`` for all), so a sample's output does
        not depend on what else is in the batch. ``image_seeds`` (default: ``seeds``) seeds a sample's
        image-side draws on their own: the vision branch's counterfactual attention, VCD's noise, and the
        language branch's maps over the image prefix (the prompt up to its last image token). Give the questions
        about one image one image seed, and their counterfactual image features are computed once and their
        image prefix is prefilled once for every branch (``causalmm eval`` does, per image and run seed).
        """
        opts = options or GenerationOptions()
        cfg, ad = self.config, self.adapter
        n = len(prompts)
        seeds = [cfg.seed] * n if seeds is None else [int(s) for s in seeds]
        image_seeds = seeds if image_seeds is None else [int(s) for s in image_seeds]
        if len(images) != n or len(seeds) != n or len(image_seeds) != n:
            raise ValueError(
                f"got {len(images)} images, {n} prompts, {len(seeds)} seeds and {len(image_seeds)} image seeds; "
                "give one of each per sample"
            )
        encs = [ad.encode(img, prompt) for img, prompt in zip(images, prompts, strict=True)]
        imgs = [ad.image_inputs(e) for e in encs]
        draws = cfg.num_cf_samples
        rows = [_Row(p, None) for p in range(n)]
        rows += [_Row(p, b, k) for p in range(n) for b in self.branches for k in range(draws)]
        # Representative prompt of each prompt's features: itself, or (reuse) the first prompt with the same
        # image (factual) / the same image and image seed (vision and noise draws).
        frep = vrep = list(range(n))
        if self.prefix_reuse:
            memo: dict[int, str] = {}
            digests = [_image_digest(im, memo) for im in images]
            frep = _first_of(digests)
            vrep = _first_of(list(zip(digests, image_seeds, strict=True)))
        feats = {"factual": self._shared_features(imgs, "factual", image_seeds, draws, frep)}
        if any(b.vision for b in self.branches):
            feats["vision"] = self._shared_features(imgs, "vision", image_seeds, draws, vrep)
        if any(b.noise for b in self.branches):
            feats["noise"] = self._shared_features(imgs, "noise", image_seeds, draws, vrep)

        def row_feature(r: _Row) -> torch.Tensor:
            if r.branch is None or not (r.branch.vision or r.branch.noise):
                return feats["factual"][(r.prompt, 0)]
            return feats["vision" if r.branch.vision else "noise"][(r.prompt, r.draw)]

        def share_key(r: _Row) -> tuple:
            """Rows with equal keys compute the same image prefix: same features, and the same language draws
            there (same branch, draw and image seed) or none."""
            if r.branch is None or not (r.branch.vision or r.branch.noise):
                key: tuple = ("factual", frep[r.prompt], 0)
            else:
                key = ("vision" if r.branch.vision else "noise", vrep[r.prompt], r.draw)
            if r.branch is not None and r.branch.language:
                key += ("language", r.branch.name, r.draw, image_seeds[r.prompt])
            return key

        def lower_key(r: _Row) -> tuple:
            """Rows with equal keys compute the same below the first intervened LLM layer."""
            if r.branch is None or not (r.branch.vision or r.branch.noise):
                return (r.prompt, "factual", 0)
            return (r.prompt, "vision" if r.branch.vision else "noise", r.draw)

        image_prefix = [self._image_prefix(e) for e in encs]

        def draws(r: _Row) -> Draws:
            """A language row's draws: over its image prefix per image seed (so the questions on one image can
            share that prefix), after it per sample."""
            gen = torch.Generator(device=ad.device)
            prefix_gen = torch.Generator(device=ad.device)
            name = r.branch.name
            return Draws(
                gen.manual_seed(derive_seed(seeds[r.prompt], "language", name, r.draw)),
                prefix_gen.manual_seed(derive_seed(image_seeds[r.prompt], "language prefix", name, r.draw)),
                image_prefix[r.prompt],
            )

        lang_gens = {i: draws(r) for i, r in enumerate(rows) if r.branch is not None and r.branch.language}
        plan = self._plan([lower_key(r) for r in rows])  # which rows share the layers below `share_low`
        prefill = None
        #: what the last call's prefill shared (diagnostics): prefix groups, their tokens, rows that reused one
        self.prefill_stats = {"groups": 0, "prefix_tokens": 0, "shared_rows": 0}
        if self.prefix_reuse:
            prefill = self._prefill_shared(
                encs, imgs, rows, row_feature, share_key, lang_gens, lower_key, plan, opts.max_new_tokens
            )
        if prefill is None:
            prefill = self._prefill_full(encs, imgs, rows, row_feature, lang_gens, plan, opts.max_new_tokens)
        logits, cache, mask, positions = prefill
        sample_gens = [torch.Generator(device="cpu").manual_seed(derive_seed(s, "sample")) for s in seeds]

        active = list(range(len(rows)))  # rows still in the batch, in batch order
        low_rows = active if plan is None else plan.keep  # rows in the cache's shared lower layers
        out_ids: list[list[int]] = [[] for _ in range(n)]
        done: list[str | None] = [None] * n
        record: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(n)]
        texts = [""] * n

        for step in range(opts.max_new_tokens):
            where = {i: j for j, i in enumerate(active)}
            for p in range(n):
                if done[p] is not None:
                    continue
                fl = logits[where[p]]
                cf_logits = {}
                for b in self.branches:
                    idx = [where[i] for i, r in enumerate(rows) if r.prompt == p and r.branch is b and i in where]
                    # Legacy: the counterfactual rows shared the factual cache after the first token.
                    cf_logits[b.name] = logits[idx].mean(0) if idx else fl
                z = (
                    fl
                    if not self.branches
                    else contrast(
                        fl, list(cf_logits.values()), gamma=cfg.gamma, epsilon=cfg.epsilon, space=cfg.contrast
                    )
                )
                tok = _select(z, opts, out_ids[p], sample_gens[p])
                out_ids[p].append(tok)
                if return_branch_logits:
                    for name, t in (("factual", fl), *cf_logits.items(), ("combined", z)):
                        record[p].setdefault(name, []).append(t.cpu())
                if tok in self.eos:
                    done[p] = "eos"
                elif opts.stop_strings:
                    text = self.tokenizer.decode(out_ids[p], skip_special_tokens=True)
                    hit = [text.find(s) for s in opts.stop_strings if s in text]
                    if hit:
                        done[p], texts[p] = "stop", text[: min(hit)]
            if all(d is not None for d in done) or step == opts.max_new_tokens - 1:
                break
            # Finished prompts leave the batch; in legacy mode the counterfactual rows leave after token 1.
            keep = [
                j
                for j, i in enumerate(active)
                if done[rows[i].prompt] is None and not (cfg.legacy and rows[i].branch is not None)
            ]
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=mask.device)
                active = [active[j] for j in keep]
                plan = self._plan([lower_key(rows[i]) for i in active])
                kept_low = active if plan is None else [active[j] for j in plan.keep]
                at = {i: j for j, i in enumerate(low_rows)}
                # a row leaves with its prompt (or, in legacy mode, with the other counterfactual rows), so the
                # rows left in the lower layers are the sources of the rows left
                select_cache_rows(cache, self.share_low, keep, [at[i] for i in kept_low])
                low_rows = kept_low
                mask, positions = mask[sel], positions[..., sel, :]
            nxt = torch.tensor([[out_ids[rows[i].prompt][-1]] for i in active], device=mask.device)
            positions = ad.next_positions(positions)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            lang = {j: lang_gens[i] for j, i in enumerate(active) if i in lang_gens}
            logits = self._step(
                {"input_ids": nxt}, mask, positions, cache, lang, plan, [rows[i] for i in active],
                full_head=return_branch_logits,
            )  # fmt: skip
        results = []
        for p in range(n):
            text = texts[p] if done[p] == "stop" else self.tokenizer.decode(out_ids[p], skip_special_tokens=True)
            logs = {k: torch.stack(v) for k, v in record[p].items()} if return_branch_logits else None
            results.append(GenerationResult(text, out_ids[p], done[p] or "length", seeds[p], logs))
        return results
