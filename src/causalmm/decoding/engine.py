"""The engine loop: lay out the rows, compute image features, prefill, then one batched forward per step and
each prompt's next token from its method's rule (``docs/method.md``).

One generation call lays out, for every prompt, a factual row and one row per counterfactual branch and draw
(:mod:`.rows`). Image features are computed once per image and kind (:mod:`.features`); every step runs **one**
forward over all rows of all prompts, each row with its own cache entries (:mod:`.forward`), and combines each
prompt's rows with its method's rule (:mod:`causalmm.methods`). The chosen token is appended to every row of
that prompt. Questions about one image prefill their image prefix once (:mod:`.prefill`); a language row runs
the LLM layers below the first intervened one through its factual row (:mod:`.sharing`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from .. import methods  # the module, not its names: methods import the rule from this package
from .. import seeds as streams
from ..adapters import Adapter
from ..config import CausalMMConfig, ConfigError, resolve_layers
from ..sites import SiteRule
from .beams import beam_decode, check_beam_options
from .features import ImageFeatures, first_equal, image_digest, inputs_digest, zero_image_tokens
from .forward import Forward
from .needs import MethodNeeds, plain_cache, same_token_keys
from .opera import opera_decode
from .prefill import image_prefix, prefill_shared
from .rows import Row, RowLayout
from .rule import BEAM_ONLY, GenerationOptions, GenerationResult, TokenSelector
from .sharing import select_cache_rows

__all__ = ["Engine", "Switches"]


@dataclass(frozen=True)
class Switches:
    """The engine's optimisations, each proven token-identical to its reference path (``False``) by the parity
    tests, each in effect only where the model allows it.

    Attributes:
        reuse_prefix: prefill a prompt prefix shared by several rows once and fork its KV cache, and compute the
            features of an image repeated in the batch once (where the adapter declares
            ``supports_prefix_reuse`` and the cache is plain full-attention layers).
        share_layers: a language row and its factual row run the LLM layers below the first intervened one once,
            and so do SID's pruned row and its factual row up to SID's choosing layer (where the adapter declares
            ``supports_layer_sharing``).
        plausible_head: in decode steps the LM head runs on the factual rows only, and counterfactual logits are
            computed on the tokens the plausibility cut keeps, the only ones the rule reads (where the adapter
            declares ``plain_lm_head``, the method reads plausible tokens only, ``epsilon > 0`` and no branch
            logits are requested); where the method reads whole distributions or early exits, every row's logits
            (and every exit's) are one product laid out for a few rows (``decoding.head.dense_logits``) instead.
        preallocate_cache: the decoding KV cache reserves room for the answer and each step writes its token in
            place, where ``DynamicCache`` copies every row's whole cache at every step (plain caches only).
    """

    reuse_prefix: bool = True
    share_layers: bool = True
    plausible_head: bool = True
    preallocate_cache: bool = True

    def replace(self, **changes: bool | None) -> Switches:
        """A copy with the given switches changed (``None`` keeps a switch as it is)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown engine switch(es) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{k: bool(v) for k, v in changes.items() if v is not None})


class Engine:
    """Runs a :class:`CausalMMConfig` on one model through its :class:`Adapter`, with :class:`Switches`."""

    def __init__(self, adapter: Adapter, config: CausalMMConfig, switches: Switches | None = None) -> None:
        switches = switches or Switches()
        self.adapter, self.config, self.switches = adapter, config, switches
        self.method = methods.get_method(config.method)
        self.branches = self.method.branches(config)
        self.vision_rule = self._vision_rule() if any(b.vision for b in self.branches) else None
        language_rule = self._language_rule() if any(b.language for b in self.branches) else None
        gc = adapter.model.generation_config
        eos = gc.eos_token_id if gc is not None else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # No processor (causalmm.hf.generate, which gets token ids): ids from the generation config, no text.
        tok = getattr(adapter.processor, "tokenizer", adapter.processor)
        if tok is not None and tok.eos_token_id is not None and not eos:
            eos = [tok.eos_token_id]
        self.eos, self.tokenizer = set(eos), tok
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else None
        pad = pad if pad is not None else (eos[0] if eos else 0)
        # Forking and left-padding a cache is only sound for plain growing layers (no sliding window).
        plain = plain_cache(adapter)
        self.needs = MethodNeeds(adapter, config, self.method, self.branches)
        self.prefix_reuse = bool(
            switches.reuse_prefix and adapter.supports_prefix_reuse and plain and self.needs.allow_prefix_reuse
        )
        # the first LLM layer where a branch row computes otherwise than its factual row: the language branch's
        # first intervened layer, or the layer after SID's choosing one (below it the pruned row is the factual)
        if language_rule is not None:
            share_from = min(language_rule.layers)
        else:
            share_from = self.needs.prune[0] + 1 if self.needs.prune is not None else 0
        share = switches.share_layers and adapter.supports_layer_sharing and plain and share_from > 0
        head = adapter.model.get_output_embeddings()
        plain_head = (
            switches.plausible_head
            and adapter.plain_lm_head
            and type(head) is torch.nn.Linear  # not a quantised subclass, whose weight cannot be sliced
        )
        head_ok = plain_head and bool(self.branches) and self.method.plausible_only and config.epsilon > 0
        # rules that read whole distributions, and early exits: several rows' logits in one product
        dense = plain_head and not head_ok and bool(self.branches or self.needs.exits)
        self.forward = Forward(
            adapter,
            language_rule,
            share_low=share_from if share else 0,
            head=head if head_ok else None,
            epsilon=config.epsilon,
            dense_head=head if dense else None,
            preallocate=bool(switches.preallocate_cache and plain),
            pad_id=int(pad),
            exits=self.needs.exits,
            exit_norm=self.method.exit_norm,
            window=self.needs.window,
            method=config.method,
        )
        #: the ids that mark image positions in a prompt
        self.image_tokens = adapter.image_token_ids
        #: what the last call's prefill shared (diagnostics): prefix groups, their tokens, rows that reused one
        self.prefill_stats: dict[str, int] = {}

    # engine facts the tests and benchmarks read
    @property
    def head(self) -> torch.nn.Linear | None:
        return self.forward.head

    @property
    def share_low(self) -> int:
        return self.forward.share_low

    @property
    def preallocate(self) -> bool:
        return self.forward.preallocate

    @property
    def language_rule(self) -> SiteRule | None:
        return self.forward.language_rule

    def _vision_rule(self) -> SiteRule:
        ad, cfg = self.adapter, self.config
        if cfg.vision_style == "gate" and not ad.supports_gate:
            raise ConfigError(
                "vision_style='gate' needs a CLIP-style tower with a square patch grid (LLaVA family); "
                f"{type(ad.model).__name__} has none: use vision_style='attention'"
            )
        try:
            layers = (
                ad.default_vision_layers()
                if cfg.vision_layers is None
                else resolve_layers(cfg.vision_layers, ad.n_vision_layers, what="vision layer")
            )
        except ConfigError as err:
            raise ConfigError(
                f"{err}; only the vision layers up to the one that feeds the LLM count "
                f"(the tower has {len(ad.vision_attn)})"
            ) from None
        self._check_heads(cfg.vision_heads, ad.vision_attn[0], "vision")
        return SiteRule(cfg.vision_cf, frozenset(layers), cfg.vision_heads, cfg.renormalize)

    def _language_rule(self) -> SiteRule:
        ad, cfg = self.adapter, self.config
        spec = "middle" if cfg.language_layers is None else cfg.language_layers
        layers = resolve_layers(spec, ad.n_language_layers, what="language layer")
        self._check_heads(cfg.language_heads, ad.lm_attn[0], "language")
        return SiteRule(cfg.language_cf, frozenset(layers), cfg.language_heads, cfg.renormalize)

    def check_options(self, opts: GenerationOptions) -> None:
        """Refuse, before any work, generation options this model or method cannot take or would ignore: more beams
        or a larger top-k than the vocabulary has tokens, a beam-search option without a beam search, OPERA's
        beams given twice with two values."""
        if opts.num_beams == 1 and self.method.search is None:
            given = [name for name, unset in BEAM_ONLY.items() if getattr(opts, name) != unset]
            if given:
                raise ConfigError(
                    f"{given[0]}={getattr(opts, given[0])!r} acts on beam search only, and num_beams is 1: give "
                    f"num_beams > 1 to search, or leave {given[0]} unset"
                )
        vocab = self.needs.vocab
        for name in ("num_beams", "top_k"):
            value = getattr(opts, name)
            if vocab is not None and value is not None and value > vocab:
                raise ConfigError(
                    f"{name}={value} is more than the model's vocabulary of {vocab} tokens; give {name} <= {vocab}"
                )
        if self.method.search == "opera" and opts.num_beams > 1:
            beams = self.config.param("beams")
            default = next(p.default for p in self.method.params if p.field == "beams")
            if beams not in (default, opts.num_beams):
                raise ConfigError(
                    f"num_beams={opts.num_beams} and OPERA's beams={beams} disagree: give one of them (num_beams > 1 "
                    "takes the place of beams)"
                )

    @staticmethod
    def _check_heads(heads: tuple[int, ...] | None, module: torch.nn.Module, where: str) -> None:
        n = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
        if heads is not None and n is not None and max(heads) >= n:
            raise ConfigError(f"{where} head index {max(heads)} is out of range: the model has {n} heads (0..{n - 1})")

    def _layout(self, image_keys, encs, imgs, seeds, image_seeds):
        """The rows, and a function giving each row's image features (computed once per image and kind).

        ``encs[kind][p]``: prompt ``p`` as rows of prompt kind ``kind`` read it. ``image_keys``: one per prompt,
        equal for equal images (their features are computed once)."""
        n, draws = len(imgs), self.config.num_cf_samples
        # the first prompt with the same image (factual) / the same image and image seed (vision, noise draws)
        same = {kind: list(range(n)) for kind in ("factual", "vision", "noise", "blind", "transform")}
        if self.prefix_reuse:
            digests = list(image_keys)
            same["factual"] = first_equal(digests)
            same["vision"] = same["noise"] = first_equal(list(zip(digests, image_seeds, strict=True)))
        prefixes = {kind: [image_prefix(e, self.image_tokens) for e in es] for kind, es in encs.items()}
        # a transform branch's rows read their variant's own image (RITUAL): its inputs came with that encoding
        made = {b.prompt: [self.adapter.image_inputs(e) for e in encs[b.prompt]] for b in self.branches if b.transform}
        layout = RowLayout(n, self.branches, draws, seeds, image_seeds, same, prefixes, encs, imgs, made)
        kinds = ({"factual"} | {b.image for b in self.branches}) - {"none", "blind", "transform"}
        features = ImageFeatures(self.adapter, self.config, self.vision_rule, self.needs.tower_state())
        feats = {kind: features(imgs, kind, image_seeds, draws, same[kind]) for kind in sorted(kinds)}
        for variant in made.values():  # (one transform branch per method: its features are the "transform" kind)
            feats["transform"] = features(variant, "factual", image_seeds, draws, same["transform"])

        def row_feature(r: Row):
            kind, prompt, draw = layout.feature_key(r)
            return None if kind == "none" else feats[kind][(prompt, draw)]

        if any(b.blind for b in self.branches):
            zero = self.needs.blind_tokens(self.forward, layout, row_feature)
            feats["blind"] = {
                (p, k): zero_image_tokens(feats["factual"][(p, 0)], zero[p], type(self.adapter.model).__name__)
                for p in range(n)
                for k in range(draws)
            }
        return layout, row_feature

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
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; give one image per prompt")
        self.check_options(options or GenerationOptions())  # before the processor's work too
        encs = [self.adapter.encode(img, prompt) for img, prompt in zip(images, prompts, strict=True)]
        memo: dict[int, str] = {}
        keys = [image_digest(im, memo) for im in images] if self.prefix_reuse else None
        return self.generate_encoded(
            encs, options, image_keys=keys, seeds=seeds, image_seeds=image_seeds,
            return_branch_logits=return_branch_logits,
            variants=self.needs.encode_variants(images, prompts, seeds),
        )  # fmt: skip

    @torch.no_grad()
    def generate_encoded(
        self,
        encs: list[dict[str, torch.Tensor]],
        options: GenerationOptions | None = None,
        *,
        image_keys: list[str] | None = None,
        seeds: list[int] | None = None,
        image_seeds: list[int] | None = None,
        return_branch_logits: bool = False,
        variants: dict[str, list[dict[str, torch.Tensor]]] | None = None,
    ) -> list[GenerationResult]:
        """:meth:`generate` on prompts already through the processor: ``encs`` holds, per prompt, what
        :meth:`Adapter.encode` gives (token inputs with batch dimension 1, and that prompt's image inputs).
        ``variants[kind]``: the same for each prompt variant a branch reads (:meth:`MethodNeeds.prompt_kinds`).

        For callers that receive token ids rather than text (``causalmm.hf.generate``). ``image_keys``: one per
        prompt, equal for equal images, so their features are computed once (default: a digest of the image
        inputs). Without a tokenizer (an engine built without a processor) results carry token ids and no text.
        """
        opts = options or GenerationOptions()
        self.check_options(opts)
        cfg, ad, fw = self.config, self.adapter, self.forward
        n = len(encs)
        seeds = [cfg.seed] * n if seeds is None else [int(s) for s in seeds]
        image_seeds = seeds if image_seeds is None else [int(s) for s in image_seeds]
        if len(seeds) != n or len(image_seeds) != n:
            raise ValueError(
                f"got {n} prompts, {len(seeds)} seeds and {len(image_seeds)} image seeds; give one of each per sample"
            )
        if opts.stop_strings and self.tokenizer is None:
            raise ConfigError("stop strings need the tokenizer: build the engine with the model's processor")
        if opts.num_beams > 1 or self.method.search is not None:
            check_beam_options(opts, cfg.legacy, return_branch_logits, self.method.search)
        imgs = [ad.image_inputs(e) for e in encs]
        variants = dict(variants or {})
        missing = [k for k in self.needs.prompt_kinds() if k not in variants]
        if missing:
            raise ConfigError(
                f"method {cfg.method!r} runs branches on other prompts ({', '.join(missing)}) that it writes from the "
                "prompt text: give the text (CausalMM.generate), not token ids alone"
            )
        all_encs = same_token_keys({"factual": encs, **variants})
        if image_keys is None:
            image_keys = [inputs_digest(i) for i in imgs] if self.prefix_reuse else [str(p) for p in range(n)]
        layout, row_feature = self._layout(image_keys, all_encs, imgs, seeds, image_seeds)
        rows = layout.rows
        lang_draws = layout.language_draws(ad.device)
        plan = fw.plan([layout.lower_key(r) for r in rows])  # which rows share the layers below `share_low`
        shared = None
        self.prefill_stats = {"groups": 0, "prefix_tokens": 0, "shared_rows": 0}
        if self.prefix_reuse:
            shared = prefill_shared(fw, layout, row_feature, lang_draws, plan, opts.max_new_tokens)
        image_cols = self.needs.columns(fw, layout)  # PAI, VAF, SID, OPERA: each row's image keys
        states = self.needs.states(fw, layout, row_feature)  # MemVR's image memory, VISTA's vectors
        if image_cols is not None:
            self.needs.check_room(image_cols.shape[1], opts.max_new_tokens)
        if shared is None:
            edits = self.needs.edits(image_cols, rows, prefill=True, states=states)
            prefill = fw.prefill(layout, row_feature, lang_draws, plan, opts.max_new_tokens, edits)
        else:
            prefill, self.prefill_stats = shared
        # the n-gram ban reads the prompt too (as transformers counts it)
        prompt_ids = [e["input_ids"][0].tolist() if opts.no_repeat_ngram_size else [] for e in encs]
        if self.method.search == "opera":
            return opera_decode(self, layout, prefill, image_cols, opts, seeds, prompt_ids)
        if opts.num_beams > 1:
            return beam_decode(self, layout, prefill, plan, lang_draws, image_cols, opts, seeds, prompt_ids, states)
        logits, cache, mask, positions = prefill
        select = TokenSelector(opts)
        sample_gens = [streams.generator("cpu", s, streams.SAMPLING) for s in seeds]

        active = list(range(len(rows)))  # rows still in the batch, in batch order
        low_rows = active if plan is None else plan.keep  # rows in the cache's shared lower layers
        # each prompt's rows of each branch (indices into `rows`), found once rather than at every step
        rows_of: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(rows):
            if r.branch is not None:
                rows_of.setdefault((r.prompt, r.branch.name), []).append(i)
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
                    idx = [where[i] for i in rows_of.get((p, b.name), ()) if i in where]
                    # Legacy: the counterfactual rows shared the factual cache after the first token.
                    cf_logits[b.name] = logits[idx].mean(0) if idx else fl
                if fw.exit_logits:
                    exits = {i: t[where[p]] for i, t in fw.exit_logits.items()}
                    z = self.method.combine(fl, cf_logits, cfg, step, exits=exits)
                else:
                    z = self.method.combine(fl, cf_logits, cfg, step) if self.branches else fl
                tok = select(z, out_ids[p], sample_gens[p], prompt_ids[p])
                out_ids[p].append(tok)
                if return_branch_logits:
                    kept = exits if fw.exit_logits else {}
                    early = [(f"exit{i}" if isinstance(i, int) else i, t) for i, t in kept.items()]
                    for name, t in (("factual", fl), *cf_logits.items(), *early, ("combined", z)):
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
                plan = fw.plan([layout.lower_key(rows[i]) for i in active])
                kept_low = active if plan is None else [active[j] for j in plan.keep]
                at = {i: j for j, i in enumerate(low_rows)}
                # a row leaves with its prompt (or, in legacy mode, with the other counterfactual rows), so the
                # rows left in the lower layers are the sources of the rows left
                select_cache_rows(cache, fw.share_low, keep, [at[i] for i in kept_low])
                low_rows = kept_low
                mask, positions = mask[sel], positions[..., sel, :]
            nxt = torch.tensor([[out_ids[rows[i].prompt][-1]] for i in active], device=mask.device)
            positions = ad.next_positions(positions)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            lang = {j: lang_draws[i] for j, i in enumerate(active) if i in lang_draws}
            cols = None if image_cols is None else image_cols[active]
            edits = self.needs.edits(cols, [rows[i] for i in active], prefill=False, states=states)
            logits = fw.step(
                {"input_ids": nxt}, mask, positions, cache, lang, plan, [rows[i] for i in active],
                full_head=return_branch_logits, edits=edits,
            )  # fmt: skip
        results = []
        for p in range(n):
            if done[p] == "stop":
                text = texts[p]
            else:
                text = self.tokenizer.decode(out_ids[p], skip_special_tokens=True) if self.tokenizer is not None else ""
            logs = {k: torch.stack(v) for k, v in record[p].items()} if return_branch_logits else None
            results.append(GenerationResult(text, out_ids[p], done[p] or "length", seeds[p], logs))
        return results
