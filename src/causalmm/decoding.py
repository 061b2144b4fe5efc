"""The decoding engine: branches, per-branch KV caches, the contrast rule, sampling.

One generation call lays out, for every prompt, a factual row and one row per counterfactual branch and
draw (``num_cf_samples``). Image features are computed once per image and branch kind (factual,
vision-intervened draw k, noised draw k); then every step runs **one** batched forward over all rows of
all prompts, each row with its own cache entries, and combines each prompt's rows with :func:`contrast`.
The chosen token is appended to every row of that prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from .adapters import Adapter
from .attention import Intervention, SiteRule, intervene
from .config import CausalMMConfig, ConfigError, resolve_layers
from .interventions import diffusion_noise
from .methods import Branch, branches_for

__all__ = ["Engine", "GenerationOptions", "GenerationResult", "contrast", "derive_seed"]


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
    # p(i) < eps * max p  <=>  logit(i) < log(eps) + max logit  (softmax shares the normaliser)
    cutoff = factual.float().amax(-1, keepdim=True) + (np.log(epsilon) if epsilon > 0 else -np.inf)
    return z.masked_fill(factual.float() < cutoff, float("-inf"))


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


class Engine:
    """Runs a :class:`CausalMMConfig` on one model through its :class:`Adapter`."""

    def __init__(self, adapter: Adapter, config: CausalMMConfig) -> None:
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
            for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
                if key in enc:
                    fill = self.pad_id if key == "input_ids" else 0
                    t = enc[key][0]
                    out.setdefault(key, []).append(torch.cat([t.new_full((length - n,), fill), t]))
        return {k: torch.stack(v).to(self.adapter.device) for k, v in out.items()}

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        options: GenerationOptions | None = None,
        *,
        seeds: list[int] | None = None,
        return_branch_logits: bool = False,
    ) -> list[GenerationResult]:
        """Generate one answer per (image, prompt); see :class:`GenerationOptions`.

        ``seeds`` gives each sample its own seed (default: ``config.seed`` for all), so a sample's output does
        not depend on what else is in the batch.
        """
        opts = options or GenerationOptions()
        cfg, ad = self.config, self.adapter
        n = len(prompts)
        seeds = [cfg.seed] * n if seeds is None else [int(s) for s in seeds]
        if len(images) != n or len(seeds) != n:
            raise ValueError(
                f"got {len(images)} images, {n} prompts and {len(seeds)} seeds; give one of each per sample"
            )
        encs = [ad.encode(img, prompt) for img, prompt in zip(images, prompts, strict=True)]
        imgs = [ad.image_inputs(e) for e in encs]
        draws = cfg.num_cf_samples
        rows = [_Row(p, None) for p in range(n)]
        rows += [_Row(p, b, k) for p in range(n) for b in self.branches for k in range(draws)]
        feats = {"factual": self._features(imgs, "factual", seeds, draws)}
        if any(b.vision for b in self.branches):
            feats["vision"] = self._features(imgs, "vision", seeds, draws)
        if any(b.noise for b in self.branches):
            feats["noise"] = self._features(imgs, "noise", seeds, draws)

        def row_feature(r: _Row) -> torch.Tensor:
            if r.branch is None or not (r.branch.vision or r.branch.noise):
                return feats["factual"][(r.prompt, 0)]
            return feats["vision" if r.branch.vision else "noise"][(r.prompt, r.draw)]

        lang_gens = {
            i: torch.Generator(device=ad.device).manual_seed(
                derive_seed(seeds[r.prompt], "language", r.branch.name, r.draw)
            )
            for i, r in enumerate(rows)
            if r.branch is not None and r.branch.language
        }
        batch = self._collate_tokens(encs, rows)
        meta = ad.collate_images([{k: v for k, v in imgs[r.prompt].items() if k != "pixel_values"} for r in rows])
        positions = ad.prefill_positions(batch, {k: v.to(ad.device) for k, v in meta.items()})
        fwd_extra = {k: v for k, v in batch.items() if k in ("token_type_ids", "mm_token_type_ids")}
        mask = batch["attention_mask"]
        cache = DynamicCache(config=ad.model.config.get_text_config())
        sample_gens = [torch.Generator(device="cpu").manual_seed(derive_seed(s, "sample")) for s in seeds]

        active = list(range(len(rows)))  # rows still in the batch, in batch order
        out_ids: list[list[int]] = [[] for _ in range(n)]
        done: list[str | None] = [None] * n
        record: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(n)]
        texts = [""] * n

        inputs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            **fwd_extra,
            **ad.features_input([row_feature(r) for r in rows]),
        }
        for _ in range(opts.max_new_tokens):
            state = Intervention(
                language=self.language_rule,
                language_rows={j: lang_gens[i] for j, i in enumerate(active) if i in lang_gens},
            )
            with intervene(state):
                out = ad.model(
                    **inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits = out.logits[:, -1].float()
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
            if all(d is not None for d in done):
                break
            # Finished prompts leave the batch; in legacy mode the counterfactual rows leave after token 1.
            keep = [
                j
                for j, i in enumerate(active)
                if done[rows[i].prompt] is None and not (cfg.legacy and rows[i].branch is not None)
            ]
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(sel)
                mask, positions = mask[sel], positions[..., sel, :]
                active = [active[j] for j in keep]
            nxt = torch.tensor([[out_ids[rows[i].prompt][-1]] for i in active], device=mask.device)
            positions = ad.next_positions(positions)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            inputs = {"input_ids": nxt}
        results = []
        for p in range(n):
            text = texts[p] if done[p] == "stop" else self.tokenizer.decode(out_ids[p], skip_special_tokens=True)
            logs = {k: torch.stack(v) for k, v in record[p].items()} if return_branch_logits else None
            results.append(GenerationResult(text, out_ids[p], done[p] or "length", seeds[p], logs))
        return results
