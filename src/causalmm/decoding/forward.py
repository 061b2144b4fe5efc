"""One batched forward of the LLM over every row of every prompt, each row with its own cache entries, and the
reference prefill (every row's whole prompt, left-padded) that the shared-prefix prefill is proven against."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from ..adapters import Adapter, UnsupportedModelError
from ..config import ConfigError
from ..sites import Draws, Intervention, SiteRule, intervene
from .cache import growing_cache
from .head import dense_logits, head_on_rows, plausible_logits
from .rows import Row, RowLayout
from .sharing import RowPlan, share_lower_layers

__all__ = ["TOKEN_KEYS", "Forward", "Prefill", "cache_kwargs", "extra_inputs", "window_message"]

#: the per-token inputs of a prompt (ids, mask and the token types some families take)
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
#: at most this many tokens of room reserved per cache layer at a time: a longer answer reallocates (one copy)
#: every so many tokens, and a row that stops early leaves at most this much unused
RESERVE_CHUNK = 64
#: What a prefill hands to the decode loop, rows in engine order: last-position logits ``(rows, vocab)``, the
#: cache, the attention mask ``(rows, length)`` and position ids (only the last column is read afterwards).
Prefill = tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]


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


def extra_inputs(batch: dict[str, torch.Tensor], lo: int = 0) -> dict[str, torch.Tensor]:
    """The per-token inputs besides the ids that a forward takes (token type ids), from column ``lo`` on."""
    return {k: v[:, lo:] for k, v in batch.items() if k in ("token_type_ids", "mm_token_type_ids")}


def window_message(method: str, adapter: Adapter, window: int, need: int) -> str:
    """Why a run that needs ``need`` cache columns cannot run ``method`` under a sliding ``window``, and the fix."""
    return (
        f"{method} finds the image keys by their place in the KV cache, and {type(adapter.model).__name__}'s "
        f"sliding-window layers keep only the last {window - 1} tokens, while this run needs {need} (the padded "
        "prompt, the answer tokens and any re-encoded ones); shorten the prompt or max_new_tokens, or use a model "
        "whose LLM attends to its whole context"
    )


class Forward:
    """The LLM forward the engine runs, with its switches resolved.

    ``share_low``: decoder layers ``0 .. share_low-1`` run once for rows that compute the same there (0: no
    sharing, ``causalmm.decoding.sharing``). ``head``: the LM head when decode steps compute counterfactual
    logits on the plausible tokens only (``causalmm.decoding.head``), else ``None``. ``preallocate``: decode on
    a cache that writes each step in place (``causalmm.decoding.cache``).
    """

    def __init__(
        self,
        adapter: Adapter,
        language_rule: SiteRule | None,
        *,
        share_low: int,
        head: torch.nn.Linear | None,
        epsilon: float,
        dense_head: torch.nn.Linear | None = None,
        preallocate: bool,
        pad_id: int,
        exits: tuple[int, ...] = (),
        exit_norm: bool = False,
        window: int | None = None,
        method: str = "",
    ) -> None:
        self.adapter, self.language_rule = adapter, language_rule
        #: a sliding window the cache must stay below (``method`` finds image keys by their column), else ``None``
        self.window, self.method = window, method
        self.share_low, self.head, self.epsilon = share_low, head, epsilon
        #: where the rule reads whole counterfactual distributions (M3ID's, PAI's log-softmax) or early exits:
        #: every row's logits (decode steps; with exits, every forward and every exit too) come from one
        #: :func:`dense_logits` product instead of the model's own head
        self.dense_head = dense_head
        self.preallocate, self.pad_id = preallocate, pad_id
        self.text_config = adapter.model.config.get_text_config()
        #: early-exit layers (``hidden_states`` indices) whose last-position logits each forward computes
        self.exits, self.exit_norm = exits, exit_norm
        #: those logits of the last forward, ``{index: (rows, vocab)}`` float32
        self.exit_logits: dict[int, torch.Tensor] = {}
        if exits and exit_norm and not isinstance(getattr(adapter.lm, "norm", None), torch.nn.Module):
            raise UnsupportedModelError(
                f"{type(adapter.model).__name__}: its LLM has no final norm (`norm`) for the early-exit logits"
            )

    def __call__(
        self,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        language_rows: dict[int, Draws],
        plan: RowPlan | None = None,
        edits: dict[str, Any] | None = None,
    ) -> Any:
        """One forward with the language intervention on ``language_rows`` (batch indices) and the baselines'
        ``edits`` (``scores``, ``prune``, ``watch``, ``mlp``, ``layers``: fields of
        :class:`~causalmm.sites.Intervention`); with a ``plan``, the layers below :attr:`share_low` run on
        ``plan.keep`` only (their cache holds those rows)."""
        if self.window is not None:
            need = cache.get_seq_length() + inputs["input_ids"].shape[1]
            if need > self.window - 1:  # OPERA's rollbacks re-encode answer tokens: checked here, as it happens
                raise ConfigError(window_message(self.method, self.adapter, self.window, need))
        if plan is not None and self.share_low and edits and edits.get("prune") is not None:
            # SID's choosing layer is among the shared ones: its rows read their factual rows' attention there
            edits = {**edits, "prune": dataclasses.replace(edits["prune"], source=plan.gather, hidden={})}
        state = Intervention(language=self.language_rule, language_rows=language_rows, **(edits or {}))
        shared = (
            share_lower_layers(self.adapter.lm_layers[: self.share_low], plan)
            if plan is not None and self.share_low
            else contextlib.nullcontext()
        )
        # early exits on a dense head: the final rows join the exits' product, the model's own head gets none
        merge = bool(self.exits) and self.dense_head is not None
        final = head_on_rows(self.dense_head, []) if merge else contextlib.nullcontext({})
        with intervene(state), shared, self._exit_states() as states, final as kept:
            out = self.adapter.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions,
                **cache_kwargs(self.adapter.model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        if self.exits:
            self.exit_logits = self._exit_heads(states, kept.get("hidden"))
            if merge:
                out.logits = self.exit_logits.pop("final")[:, None]
        if state.side is not None:  # ONLY: its second logits, read by the rule as an exit named "side"
            self.exit_logits = {"side": state.side.logits(inputs["input_ids"].shape[0])}
        return out

    @contextlib.contextmanager
    def _exit_states(self):
        """Inside, ``states[i]`` is the last position's hidden state ``hidden_states[i]`` (the input of decoder
        layer ``i``) of the forward run there, for each early-exit index."""
        states: dict[int, torch.Tensor] = {}
        handles = []
        for i in self.exits:

            def keep(module, args, kwargs, i=i):
                states[i] = (args or (kwargs["hidden_states"],))[0][:, -1]

            handles.append(self.adapter.lm_layers[i].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()

    def _exit_heads(
        self, states: dict[int, torch.Tensor], final: torch.Tensor | None = None
    ) -> dict[int | str, torch.Tensor]:
        """Next-token logits from each early layer's state: the LM head (after the final norm for DeCo), capped as
        the model caps its own logits; with ``final`` (the head's input, last position kept by the caller or
        not), the final logits too, under ``"final"``.

        Every layer's rows go through the head in one product, so its weight (often the largest matrix of the
        model) is read once per step rather than once per layer, laid out ``W @ h.T`` (what a CPU BLAS runs
        fastest for a few rows, ``speed/README.md``) where the head is a plain linear map."""
        layers: list[int | str] = list(states)
        hidden = torch.cat([states[i] for i in states])
        if self.exit_norm:
            hidden = self.adapter.lm.norm(hidden)
        if final is not None:
            layers.append("final")
            hidden = torch.cat([hidden, final[:, -1].to(hidden.dtype)])
        head = self.adapter.model.get_output_embeddings()
        logits = dense_logits(head, hidden) if type(head) is torch.nn.Linear else head(hidden)
        logits = logits.float()
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:  # (never with ``final``: a capped model's head is not plain, so there is no dense head)
            logits = torch.tanh(logits / cap) * cap
        return dict(zip(layers, logits.split(len(logits) // len(layers)), strict=True))

    def step(
        self,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        language_rows: dict[int, Draws],
        plan: RowPlan | None,
        rows: list[Row],
        full_head: bool = False,
        edits: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` of one decode step (float32). With :attr:`head`, the counterfactual
        rows' logits are exact on the plausible tokens only (the only ones the rule reads); ``full_head`` (branch
        logits asked for) computes them whole."""
        cf = [j for j, r in enumerate(rows) if r.branch is not None]
        if self.dense_head is not None and cf and not full_head and not self.exits:  # (exits: merged in the call)
            with head_on_rows(self.dense_head, []) as kept:  # the model's own head computes no row
                self(inputs, mask, positions, cache, language_rows, plan, edits)
            return dense_logits(self.dense_head, kept["hidden"][:, -1]).float()
        if self.head is None or full_head or not cf:
            return self(inputs, mask, positions, cache, language_rows, plan, edits).logits[:, -1].float()
        fact = [j for j, r in enumerate(rows) if r.branch is None]
        with head_on_rows(self.head, fact) as kept:
            out = self(inputs, mask, positions, cache, language_rows, plan, edits)
        at = {rows[j].prompt: k for k, j in enumerate(fact)}
        return plausible_logits(
            self.head, kept["hidden"][:, -1], out.logits[:, -1], [at[r.prompt] for r in rows], cf, self.epsilon
        )

    def plan(self, keys: list[Any]) -> RowPlan | None:
        """The sharing plan of a batch whose rows have lower-layer keys ``keys`` (rows with equal keys compute
        the same below :attr:`share_low`; ``None`` shares with no row), or ``None`` where no row shares."""
        if not self.share_low:
            return None
        first: dict[Any, int] = {}
        plan = RowPlan([j if k is None else first.setdefault(k, j) for j, k in enumerate(keys)])
        return plan if plan.shares else None

    def new_cache(self, reserve: int = 0, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        """A cache holding ``data`` (one ``(keys, values)`` per layer) if given: with :attr:`preallocate`, room for
        ``reserve`` more tokens per layer; a plain ``DynamicCache`` for ``reserve=0`` (prefill scratch)."""
        if self.preallocate and reserve:
            return growing_cache(self.text_config, min(reserve, RESERVE_CHUNK), data)
        return DynamicCache(data, config=self.text_config)

    def collate_tokens(self, encs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Prompts (one processor output per row), left-padded to the longest."""
        length = max(e["input_ids"].shape[1] for e in encs)
        out: dict[str, list[torch.Tensor]] = {}
        for enc in encs:
            n = enc["input_ids"].shape[1]
            for key in TOKEN_KEYS:
                if key in enc:
                    fill = self.pad_id if key == "input_ids" else 0
                    t = enc[key][0]
                    out.setdefault(key, []).append(torch.cat([t.new_full((length - n,), fill), t]))
        return {k: torch.stack(v).to(self.adapter.device) for k, v in out.items()}

    def image_meta(self, layout: RowLayout, which: list[int]) -> dict[str, Any]:
        """Non-pixel image inputs (grid sizes...) of rows ``which`` that read an image, as position helpers want
        them (a text-only row has none)."""
        items = [layout.image_inputs(layout.rows[i]) for i in which]
        items = [{k: v for k, v in it.items() if k != "pixel_values"} for it in items if it is not None]
        if not items:
            return {}
        return {k: v.to(self.adapter.device) for k, v in self.adapter.collate_images(items).items()}

    def features(self, rows: list[Row], row_feature) -> dict[str, Any]:
        """The forward's precomputed image features of ``rows`` (text-only rows have none)."""
        feats = [f for f in (row_feature(r) for r in rows) if f is not None]
        return self.adapter.features_input(feats) if feats else {}

    def prefill(self, layout: RowLayout, row_feature, lang_draws, plan, reserve: int, edits=None) -> Prefill:
        """The reference prefill: every row's whole prompt, left-padded, in one forward (the layers below
        :attr:`share_low` on the rows ``plan`` keeps only, whose cache keeps those rows); the cache has room for
        ``reserve`` more tokens. ``edits``: the baselines' edits (:meth:`__call__`)."""
        ad, rows = self.adapter, layout.rows
        batch = self.collate_tokens([layout.enc(r) for r in rows])
        positions = ad.prefill_positions(batch, self.image_meta(layout, list(range(len(rows)))))
        cache = self.new_cache(reserve)
        inputs = {"input_ids": batch["input_ids"], **extra_inputs(batch), **self.features(rows, row_feature)}
        out = self(inputs, batch["attention_mask"], positions, cache, dict(lang_draws), plan, edits)
        return out.logits[:, -1].float(), cache, batch["attention_mask"], positions
