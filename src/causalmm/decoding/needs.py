"""What a decoding method asks of the engine beyond its branches' image features, resolved against one model:
the prompts its branches read (ICD's instruction, M3ID's and PAI's text-only prompt), the edits of the factual
rows' own forward (PAI's boost and VAF's scaling of their attention, MemVR's image-memory read), SID's pruning of
its branch's image keys, AvisC's blind tokens (read in a probe prefill), and the early-exit layers of DoLa and
DeCo. Each is checked when the engine is built, so a setting the model cannot take fails before any generation.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..adapters import Adapter
from ..config import CausalMMConfig, ConfigError
from ..errors import UnsupportedModelError
from ..fit.store import load_fitted
from ..methods.base import (  # the submodule: the methods package imports the rule from decoding
    Branch,
    Directions,
    FactualEdit,
    ImageMemory,
    Method,
    ScoreScale,
    SideLogits,
    Steering,
)
from ..settings import resolve_layers
from ..sites import Intervention
from ..sites.edits import Boost, Prune, Scale, SideOutput, Watch
from ..sites.mlp import LastStates, MemoryRead, Shift, Steer
from .forward import TOKEN_KEYS, Forward, extra_inputs, window_message
from .rows import Row, RowLayout

__all__ = ["MethodNeeds", "same_token_keys", "sliding_window", "vocab_size"]


def vocab_size(adapter: Adapter) -> int | None:
    """The number of tokens the LM head scores (``None`` where the model states none)."""
    head = adapter.model.get_output_embeddings()
    n = getattr(head, "out_features", None)  # a quantised head's weight is packed: its features are not its shape
    if n is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        n = head.weight.shape[0]
    if n is None:
        config = adapter.model.config
        n = getattr(getattr(config, "text_config", config), "vocab_size", None)
    return int(n) if n is not None else None


class MethodNeeds:
    """The needs of ``method`` under ``config`` on ``adapter``'s model, checked.

    Attributes:
        edit / edit_layers: the factual rows' edit (PAI's boost, VAF's scaling, MemVR's memory read) and the LLM
            layers it acts in (``None`` / empty: none).
        prune: SID's ``(layer that chooses, image keys kept)`` (``None``: no pruned branch).
        exits: the early-exit layers (``hidden_states`` indices) whose logits the rule reads.
    """

    def __init__(self, adapter: Adapter, config: CausalMMConfig, method: Method, branches: tuple[Branch, ...]):
        self.adapter, self.config, self.method, self.branches = adapter, config, method, branches
        n = adapter.n_language_layers
        self.edit = method.factual_edit(config)
        self.edit_layers = frozenset()
        if isinstance(self.edit, FactualEdit):
            if not 0 <= self.edit.start_layer < n:
                raise ConfigError(
                    f"{config.method}: start_layer={self.edit.start_layer} is out of range: the LLM has {n} layers "
                    f"(0..{n - 1})"
                )
            self.edit_layers = frozenset(range(self.edit.start_layer, n))
        elif isinstance(self.edit, ScoreScale):
            try:
                self.edit_layers = frozenset(resolve_layers(self.edit.layers, n, what=f"{config.method} layers"))
            except ConfigError as err:
                raise ConfigError(f"{err}; give --param layers=... within the LLM's {n} layers") from None
        elif isinstance(self.edit, SideLogits):
            if not 0 <= self.edit.layer < n:
                raise ConfigError(
                    f"{config.method}: layer={self.edit.layer} is out of range: the LLM has {n} layers (0..{n - 1})"
                )
            last, name = adapter.lm_layers[-1], type(adapter.model).__name__
            parts = ("input_layernorm", "post_attention_layernorm", "mlp")
            if not all(isinstance(getattr(last, p, None), torch.nn.Module) for p in parts) or hasattr(
                last, "pre_feedforward_layernorm"
            ):
                raise UnsupportedModelError(
                    f"{name}: ONLY's last-layer step needs a LLaMA-style decoder layer (input_layernorm, then "
                    "post_attention_layernorm before the MLP); its last layer is laid out otherwise"
                )
            if not isinstance(getattr(adapter.lm_attn[self.edit.layer], "o_proj", None), torch.nn.Module):
                raise UnsupportedModelError(f"{name}: its LLM attention has no o_proj for ONLY's side output")
            if not isinstance(getattr(adapter.lm, "norm", None), torch.nn.Module):
                raise UnsupportedModelError(f"{name}: its LLM has no final norm (`norm`) for ONLY's side logits")
        elif isinstance(self.edit, ImageMemory):
            start, end = self.edit.start, self.edit.end
            if not 0 <= start < end <= n - 1:
                raise ConfigError(
                    f"{config.method}: the window start={start}, end={end} does not fit the LLM's {n} layers: the "
                    f"layers strictly between them trigger a read in the next layer, so give 0 <= start < end <= "
                    f"{n - 1}"
                )
            if not isinstance(getattr(adapter.lm, "norm", None), torch.nn.Module):
                raise ConfigError(
                    f"{config.method}: {type(adapter.model).__name__}'s LLM has no final norm (`norm`) for the "
                    "early-exit entropy"
                )
        elif isinstance(self.edit, Directions):
            self.shift = self._directions(self.edit)
        method.prepare(config, adapter.device)
        self.prune = method.prune_at(config) if any(b.prune for b in branches) else None
        if self.prune is not None and not 0 <= self.prune[0] < n - 1:
            raise ConfigError(
                f"{config.method}: layer={self.prune[0] + 1} is out of range: the image keys are chosen in the layer "
                f"before it and hidden from it on, so 1..{n - 1} for an LLM of {n} layers"
            )
        #: the smallest sliding window of the LLM's cache where the method finds image keys by their column
        #: (``None``: no such method, or a cache of plain layers); the run must fit inside it (:meth:`check_room`)
        self.window: int | None = None
        if self.image_columns and not plain_cache(adapter):
            self.window = sliding_window(adapter)
            if self.window is None:
                raise ConfigError(
                    f"{config.method} finds the image keys by their place in the KV cache, and "
                    f"{type(adapter.model).__name__}'s cache has layers that are neither plain nor a sliding window; "
                    "use a model whose LLM attends to its whole context"
                )
        #: the number of tokens the model scores, which bounds the counts of tokens (OPERA's beams and candidates,
        #: DeCo's top_k)
        self.vocab = vocab_size(adapter)
        for p in method.own_params():
            value = config.param(p.field)
            if p.vocab_bound and self.vocab is not None and value > self.vocab:
                raise ConfigError(
                    f"{config.method}: {p.field}={value} is more than the model's vocabulary of {self.vocab} tokens; "
                    f"give {p.field} <= {self.vocab}"
                )
        tied = bool(getattr(adapter.model.config, "tie_word_embeddings", False))
        self.exits = tuple(method.exit_layers(config, n, tied))
        bad = [i for i in self.exits if not 0 <= i < n]
        if bad:
            raise ConfigError(
                f"{config.method}: early-exit layer {bad[0]} is out of range: the LLM has {n} layers, so "
                f"0 (the embeddings) .. {n - 1} (the output of layer {n - 2})"
            )

    def _directions(self, edit: Directions) -> Shift:
        """VTI's fitted directions, checked against this model: fitted on it, one per LLM layer of its width, and
        (where ``alpha_image`` shifts the tower) one per tower layer and token."""
        ad, name = self.adapter, self.config.method
        fit = load_fitted(edit.path)
        fit.check_model(ad.model, edit.path, name)
        text, vision = fit.tensors.get("text"), fit.tensors.get("vision")
        width = ad.model.config.get_text_config().hidden_size
        if text is None or tuple(text.shape) != (ad.n_language_layers, width):
            shape = None if text is None else tuple(text.shape)
            raise ConfigError(
                f"{name}: {edit.path} holds text directions of shape {shape}, and the LLM has {ad.n_language_layers} "
                f"layers of width {width}; refit with `causalmm fit {name}` on this model"
            )
        if edit.alpha_image > 0:
            if vision is None:
                raise ConfigError(
                    f"{name}: {edit.path} holds no vision directions (fitted with --no-vision): give "
                    "--param alpha_image=0, or refit with vision"
                )
            hooked = sum(m is not None for m in ad.sites.vision_mlps)
            if vision.dim() != 3 or vision.shape[0] > hooked:
                raise ConfigError(
                    f"{name}: {edit.path} holds vision directions of shape {tuple(vision.shape)}, and the tower has "
                    f"{hooked} layers with an MLP; refit with `causalmm fit {name}` on this model"
                )
        return Shift(
            text if edit.alpha_text > 0 else None, vision if edit.alpha_image > 0 else None,
            0.1 * edit.alpha_text, 0.1 * edit.alpha_image,
        )  # fmt: skip

    def tower_state(self) -> Intervention | None:
        """The state the factual image features are computed under: VTI's shift of the tower's MLPs (``None``: the
        tower's own run)."""
        if isinstance(self.edit, Directions) and self.shift.vision is not None:
            return Intervention(mlp=Shift(None, self.shift.vision, 0.0, self.shift.vision_strength))
        return None

    @property
    def image_columns(self) -> bool:
        """Whether forwards need each row's image keys in the cache's layout (PAI, VAF, SID, OPERA)."""
        scores = isinstance(self.edit, (FactualEdit, ScoreScale, SideLogits))
        return scores or self.prune is not None or self.method.search == "opera"

    @property
    def prompt_state(self) -> bool:
        """Whether forwards need a state per prompt, computed before its prefill (MemVR's image memory, VISTA's
        steering vectors)."""
        return isinstance(self.edit, (ImageMemory, Steering))

    @property
    def allow_prefix_reuse(self) -> bool:
        """Whether the shared-prefix prefill may run: the image columns and the early exits are read in the
        reference prefill's layout, MemVR's trigger in the forward's newest position, and VISTA and VTI shift the
        whole prefill."""
        return not self.image_columns and not self.exits and not self.prompt_state and not self.shifted

    @property
    def shifted(self) -> bool:
        """Whether every forward's MLP outputs are shifted (VTI)."""
        return isinstance(self.edit, Directions)

    def check_room(self, length: int, new_tokens: int) -> None:
        """Refuse, before any forward, a run that would outgrow the sliding window: ``length`` prompt columns (the
        batch's padded layout) and ``new_tokens`` answer tokens, plus OPERA's candidate block."""
        if self.window is None:
            return
        extra = self.config.param("candidates") if self.method.search == "opera" else 0
        need = length + new_tokens + extra
        if need > self.window - 1:
            raise ConfigError(window_message(self.config.method, self.adapter, self.window, need))

    # -- prompts ---------------------------------------------------------------------------------------------
    def prompt_kinds(self) -> tuple[str, ...]:
        """The prompt variants the branches (and VISTA's probe) read besides the sample's own (``text``: no image)."""
        kinds = {b.prompt for b in self.branches} | ({"text"} if isinstance(self.edit, Steering) else set())
        return tuple(sorted(kinds - {"factual"}))

    def encode_variants(
        self, images: list[Image.Image], prompts: list[str], seeds: list[int] | None = None
    ) -> dict[str, list[dict]]:
        """Each prompt as the rows of each variant kind read it (:attr:`~causalmm.methods.Branch.prompt`); a
        ``transform`` branch's variant is the prompt with the image the method makes from the sample's (with the
        sample's seed: ``seeds``, default the config's), and keeps that image's inputs."""
        seeds = [self.config.seed] * len(prompts) if seeds is None else seeds
        out: dict[str, list[dict]] = {}
        for kind in self.prompt_kinds():
            if kind == "text":
                out[kind] = [self.adapter.encode_text(p, im) for im, p in zip(images, prompts, strict=True)]
                continue
            branch = next(b for b in self.branches if b.prompt == kind)
            if branch.transform:
                made = [self.method.branch_image(branch, im, s, self.config, p, self.adapter)
                        for im, s, p in zip(images, seeds, prompts, strict=True)]
                out[kind] = [self.adapter.encode(im, p) for im, p in zip(made, prompts, strict=True)]
            else:
                texts = [self.method.branch_prompt(branch, p, self.config) for p in prompts]
                out[kind] = [self.adapter.encode(im, t, system=s) for im, (t, s) in zip(images, texts, strict=True)]
        return out

    # -- edits -----------------------------------------------------------------------------------------------
    def columns(self, fw: Forward, layout: RowLayout) -> torch.Tensor | None:
        """Each row's image keys ``(rows, length)`` in the reference prefill's layout, where an edit needs them."""
        if not self.image_columns:
            return None
        ids = fw.collate_tokens([layout.enc(r) for r in layout.rows])["input_ids"]
        return torch.isin(ids, self.adapter.image_token_ids.to(ids.device))

    def states(self, fw: Forward, layout: RowLayout, row_feature) -> dict[int, Any] | None:
        """Each prompt's state, before its prefill: MemVR's image memory ``(tokens, hidden)`` (the factual image
        features as the LLM receives them, every image of the prompt; the official code keeps the last image of its
        batch of one) with the prompt's token count (its real positions in the left-padded prefill); VISTA's
        steering vectors ``(layers, hidden)``. ``None`` for the other methods."""
        if isinstance(self.edit, Steering):
            return self.steering_vectors(fw, layout, row_feature)
        if not isinstance(self.edit, ImageMemory):
            return None
        out = {}
        for row in layout.rows:
            if row.branch is None and row.prompt not in out:
                feature = row_feature(row)
                if feature is None:
                    continue
                t = getattr(feature, "pooled", feature)
                out[row.prompt] = (t.reshape(-1, t.shape[-1]), layout.enc(row)["input_ids"].shape[-1])
        return out

    def steering_vectors(self, fw: Forward, layout: RowLayout, row_feature) -> dict[int, torch.Tensor]:
        """VISTA: one probe prefill, unsteered, of each prompt with its image and without it (the template's text
        alone, as ``model_loader.py``'s ``prepare_null_prompt``); each prompt's vectors are the last token's output of
        every LLM layer with the image minus without (``steering_vector.py``; the rank-1 PCA there, fitted on one
        sample, is this difference plus an arbitrary unit vector, which is left out)."""
        n = len(layout.imgs)
        rows = layout.rows[:n]  # the factual rows come first
        encs = [layout.enc(r) for r in rows] + [layout.encs["text"][p] for p in range(n)]
        batch = fw.collate_tokens(encs)
        positions = self.adapter.prefill_positions(batch, fw.image_meta(layout, list(range(n))))
        record = LastStates()
        inputs = {"input_ids": batch["input_ids"], **extra_inputs(batch), **fw.features(rows, row_feature)}
        fw(inputs, batch["attention_mask"], positions, fw.new_cache(), {}, None, {"layers": record})
        h = torch.stack([record.seen[i] for i in range(self.adapter.n_language_layers)], dim=1)  # (2n, L, D)
        return {p: h[p] - h[n + p] for p in range(n)}

    def edits(
        self, image_cols: torch.Tensor | None, rows: list[Row], prefill: bool, states: dict | None = None
    ) -> dict | None:
        """The edits of one forward over ``rows`` (the batch, in order; ``image_cols`` their image keys, ``states``
        each prompt's :meth:`states`): PAI's boost or VAF's scaling on the factual rows, MemVR's memory read or
        VISTA's steering on them, SID's pruning on its branch's rows; ``None`` where there are none."""
        out: dict = {}
        if isinstance(self.edit, Directions):
            factual = frozenset(j for j, r in enumerate(rows) if r.branch is None)
            out["mlp"] = Shift(self.shift.text, None, self.shift.text_strength, 0.0, rows=factual)
        if states is not None and isinstance(self.edit, Steering):
            vectors = {j: states[r.prompt] for j, r in enumerate(rows) if r.branch is None}
            out["mlp"] = Steer(self.edit.lam, vectors)
        if states is not None and isinstance(self.edit, ImageMemory):
            e = self.edit
            mine = [(j, states[r.prompt]) for j, r in enumerate(rows) if r.branch is None and r.prompt in states]
            read = {j: m for j, (m, _) in mine}
            real = {j: n for j, (_, n) in mine} if prefill else None  # decode: the one position is real
            cap = getattr(self.adapter.model.config.get_text_config(), "final_logit_softcapping", None)
            head = self.adapter.model.get_output_embeddings()
            mem = MemoryRead(e.ratio, e.threshold, e.start, e.end, read, self.adapter.lm.norm, head, cap, real)
            out.update(mlp=mem, layers=mem.layers)
        if image_cols is None:
            return out or None
        if isinstance(self.edit, SideLogits):
            ad = self.adapter
            keys = {j: image_cols[j] for j, r in enumerate(rows) if r.branch is None}
            cap = getattr(ad.model.config.get_text_config(), "final_logit_softcapping", None)
            side = SideOutput(
                self.edit.layer, keys, ad.lm_layers[-1], ad.lm.norm, ad.model.get_output_embeddings(), cap,
                ad.n_language_layers,
            )  # fmt: skip
            out.update(side=side, layers=side)
        if isinstance(self.edit, FactualEdit) and (self.edit.prefill or not prefill):
            keys = {j: image_cols[j] for j, r in enumerate(rows) if r.branch is None}
            out["scores"] = Boost(self.edit.alpha, self.edit_layers, keys)
        elif isinstance(self.edit, ScoreScale):
            keys = {j: image_cols[j] for j, r in enumerate(rows) if r.branch is None}
            out["scores"] = Scale(self.edit.enhance, self.edit.suppress, self.edit_layers, keys)
        if self.prune is not None:
            keys = {j: image_cols[j] for j, r in enumerate(rows) if r.branch is not None and r.branch.prune}
            out["prune"] = Prune(self.prune[0], self.prune[1], keys)
        return out or None

    def blind_tokens(self, fw: Forward, layout: RowLayout, row_feature) -> list[torch.Tensor]:
        """AvisC: one probe prefill of the factual rows, watching each layer's last-query attention on the image
        tokens; the method picks, per prompt, the image tokens its branch zeroes."""
        n = len(layout.imgs)
        rows = layout.rows[:n]  # the factual rows come first
        batch = fw.collate_tokens([layout.enc(r) for r in rows])
        positions = self.adapter.prefill_positions(batch, fw.image_meta(layout, list(range(n))))
        watch = Watch(list(range(n)))
        inputs = {"input_ids": batch["input_ids"], **extra_inputs(batch), **fw.features(rows, row_feature)}
        fw(inputs, batch["attention_mask"], positions, fw.new_cache(), {}, None, {"watch": watch})
        image = torch.isin(batch["input_ids"], self.adapter.image_token_ids.to(batch["input_ids"].device))
        return [
            self.method.blind_tokens({layer: seen[p][image[p]] for layer, seen in watch.seen.items()}, self.config)
            for p in range(n)
        ]


def sliding_window(adapter: Adapter) -> int | None:
    """The smallest window of the LLM cache's sliding-window layers, where every other layer is plain (else
    ``None``). While a run's context stays below it, a sliding layer keeps every key, in the plain layout."""
    text_cfg = adapter.model.config.get_text_config()
    layers = DynamicCache(config=text_cfg).layers
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None
    windows = [layer.sliding_window for layer in layers if type(layer) is DynamicSlidingWindowLayer]
    return min(windows) if windows else None


def plain_cache(adapter: Adapter) -> bool:
    """Whether the LLM's cache is plain growing layers (no sliding window): forking and left-padding it, and
    finding a key by its column, are sound only then."""
    text_cfg = adapter.model.config.get_text_config()
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=text_cfg).layers)


def same_token_keys(encs: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every prompt of every kind with the same token keys: a key some prompt lacks (a text-only prompt's token
    types) is zeros there, as the processor writes it for text."""
    keys = {k for es in encs.values() for e in es for k in e if k in TOKEN_KEYS}
    out = {}
    for kind, es in encs.items():
        out[kind] = [{**e, **{k: torch.zeros_like(e["input_ids"]) for k in keys - set(e)}} for e in es]
    return out
