"""Beam search over every method: each beam of a prompt carries that prompt's rows (factual and every branch's),
and reordering the beams reorders every row's cache with them.

The rule a beam scores its continuations by is its method's: the log-softmax of the combined scores
(:meth:`~causalmm.methods.Method.combine` of the beam's factual and counterfactual rows), then the history
processors (:class:`~causalmm.decoding.rule.HistoryProcessors`), plus the beam's running score. The search is
``transformers``' own (``GenerationMixin._beam_search``, 5.x): the top ``max(2, 1 + #eos) * num_beams``
continuations of all beams, the best ``num_beams`` that do not stop as the next beams, finished hypotheses
ranked by ``score / length ** length_penalty`` among the top ``num_beams``, and its early-stopping heuristic
(``early_stopping`` ``True``, ``False`` or ``"never"``). With gamma 0 (or method ``regular``) it gives
``model.generate(num_beams=...)`` token for token (the parity tests). Each prompt beams on its own and leaves
the batch when its search is over.

Rows: every row of the prefill becomes ``num_beams`` rows (beam ``b`` of row ``i`` at ``i * num_beams + b``),
all equal until the first choice. A beam's rows are addressed as a prompt of their own (``prompt * num_beams +
beam``), so the forward's per-prompt machinery (the plausible head, the edits) reads each beam apart. The random
draws of a language row are cloned for every beam: all beams of a row draw the same maps at every step, so a
reorder never has to move a generator. The shared prefix is prefilled once before the rows fork, and layer
sharing keeps working (a beam's rows share its factual row's lower layers, reordered with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..sites import Draws
from .cache import GrowingLayer
from .rows import Row
from .rule import GenerationOptions, GenerationResult, HistoryProcessors
from .sharing import select_cache_rows

__all__ = ["BeamState", "beam_decode", "choose", "reorder_cache_rows", "searches", "stop_rule", "search_results"]

#: the score ``transformers`` gives what may not be chosen (a beam that stopped, an empty finished slot)
_BLOCKED = -1.0e9


@dataclass
class BeamState:
    """One prompt's beam search, as ``transformers`` runs it for one batch item.

    ``running`` holds each live beam's tokens, ``scores`` their summed log-probabilities; ``finished`` the best
    ``num_beams`` finished hypotheses so far (tokens, ``score / length ** length_penalty``, whether it is one).
    """

    num_beams: int
    n_eos: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    max_new_tokens: int = 64
    running: list[list[int]] = field(default_factory=list)
    scores: torch.Tensor = field(default=None)  # type: ignore[assignment]
    finished: list[list[int]] = field(default_factory=list)
    finished_scores: torch.Tensor = field(default=None)  # type: ignore[assignment]
    is_finished: torch.Tensor = field(default=None)  # type: ignore[assignment]
    finished_how: list[str] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        b = self.num_beams
        self.running = [[] for _ in range(b)]
        self.scores = torch.full((b,), _BLOCKED)
        self.scores[0] = 0.0  # only the first beam's continuations count at the first step (all beams are equal)
        self.finished = [[] for _ in range(b)]
        self.finished_scores = torch.full((b,), _BLOCKED)
        self.is_finished = torch.zeros(b, dtype=torch.bool)
        self.finished_how = ["length"] * b

    @property
    def keep(self) -> int:
        """Continuations kept per step: enough that ``num_beams`` of them go on even if the best all stop."""
        return max(2, 1 + self.n_eos) * self.num_beams

    def step(self, log_probs: torch.Tensor, stops: Callable[[list[int], int], str | None]) -> torch.Tensor:
        """Advance by one token from the beams' processed log-probabilities ``(num_beams, vocab)``.

        ``stops(tokens, token)`` says why a continuation ends (``"eos"``, ``"stop"``) or ``None``. Returns, for each
        new beam, the index of the beam it continues (its cache's source); :attr:`running` then ends with each
        new beam's token, and :attr:`done` says whether the search is over."""
        b, vocab = log_probs.shape
        t = len(self.running[0])  # tokens generated before this one
        acc = (log_probs.float() + self.scores[:, None].to(log_probs.device)).reshape(-1).cpu()
        top_scores, top_index = torch.topk(acc, k=self.keep)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        seqs = [self.running[p] + [tok] for p, tok in zip(parents, tokens, strict=True)]
        why = [stops(s, s[-1]) or ("length" if t + 1 >= self.max_new_tokens else None) for s in seqs]
        hits = torch.tensor([w is not None for w in why])

        # the next live beams: the best continuations that do not stop
        live_scores = top_scores + hits.to(torch.float32) * _BLOCKED
        nxt = torch.topk(live_scores, k=b)[1].tolist()
        new_parents = [parents[k] for k in nxt]
        running = [seqs[k] for k in nxt]
        running_scores = live_scores[nxt]

        # finished hypotheses: among the top num_beams continuations, those that stop, if they rank
        top = torch.zeros(self.keep, dtype=torch.bool)
        top[:b] = True
        just = hits & top
        fin = top_scores / ((t + 1) ** self.length_penalty)
        full = bool(self.is_finished.all()) and self.early_stopping is True
        fin = fin + float(full) * _BLOCKED
        fin = fin + float(not self.improvable) * _BLOCKED
        fin = fin + (~just).to(torch.float32) * _BLOCKED
        merged_scores = torch.cat([self.finished_scores, fin])
        pick = torch.topk(merged_scores, k=b)[1].tolist()
        merged = self.finished + seqs
        merged_how = self.finished_how + [w or "length" for w in why]
        merged_flag = torch.cat([self.is_finished, just])
        self.finished = [merged[k] for k in pick]
        self.finished_how = [merged_how[k] for k in pick]
        self.finished_scores, self.is_finished = merged_scores[pick], merged_flag[pick]
        self.running, self.scores = running, running_scores

        # can a live beam still beat the worst finished hypothesis?
        length = self.max_new_tokens if self.early_stopping == "never" and self.length_penalty > 0.0 else t + 1
        best = self.scores[:1] / (length**self.length_penalty)
        worst = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(_BLOCKED))
        self.improvable = self.improvable and bool((best > worst).any())
        self.done = (
            not self.improvable
            or (bool(self.is_finished.all()) and self.early_stopping is True)
            or bool(hits.all())
        )
        return torch.tensor(new_parents)

    def best(self) -> tuple[list[int], str]:
        """The best finished hypothesis and why it ended (``eos``, ``stop`` or ``length``)."""
        return self.finished[0], self.finished_how[0]


def reorder_cache_rows(cache: DynamicCache, low: int, upper: torch.Tensor | None, lower: torch.Tensor | None) -> None:
    """Row ``j`` of cache layers ``low..`` takes row ``upper[j]``'s keys and values, and likewise with ``lower`` in
    layers ``..low-1`` (``None``: those layers stay). A layer that owns its buffer (:class:`GrowingLayer`) moves
    only the rows that change, in place; any other layer gets new tensors."""
    for i, layer in enumerate(cache.layers):
        src = lower if i < low else upper
        if src is None or not layer.is_initialized:
            continue
        src = src.to(layer.keys.device)
        changed = (src != torch.arange(len(src), device=src.device)).nonzero().flatten()
        if not changed.numel():
            continue
        if isinstance(layer, GrowingLayer) and layer._views is not None and layer.keys is layer._views[0]:
            # both gathers are read before either write lands (advanced indexing copies the source rows)
            keys, values = layer.keys[src[changed]], layer.values[src[changed]]
            layer.keys[changed] = keys
            layer.values[changed] = values
        else:
            layer.keys = layer.keys.index_select(0, src)
            layer.values = layer.values.index_select(0, src)


def _clone(gen: torch.Generator | None) -> torch.Generator | None:
    if gen is None:
        return None
    copy = torch.Generator(device=gen.device)
    copy.set_state(gen.get_state())
    return copy


def _clone_draws(d: Draws | torch.Generator | None):
    if isinstance(d, Draws):
        return Draws(_clone(d.gen), _clone(d.prefix_gen), d.prefix)
    return _clone(d)


def searches(engine, opts: GenerationOptions, n: int, num_beams: int) -> list[BeamState]:
    """One :class:`BeamState` per prompt, under ``opts``' length penalty, early stopping and length."""
    args = (num_beams, len(engine.eos), opts.length_penalty, opts.early_stopping, opts.max_new_tokens)
    return [BeamState(*args) for _ in range(n)]


def stop_rule(engine, opts: GenerationOptions) -> Callable[[list[int], int], str | None]:
    """Why a continuation ``(tokens, last token)`` ends: ``"eos"``, ``"stop"`` (a stop string in its text) or
    ``None``."""

    def stops(seq: list[int], last: int) -> str | None:
        if last in engine.eos:
            return "eos"
        if opts.stop_strings and any(
            s in engine.tokenizer.decode(seq, skip_special_tokens=True) for s in opts.stop_strings
        ):
            return "stop"
        return None

    return stops


def choose(st: BeamState, z: torch.Tensor, history: HistoryProcessors, prompt: list[int], stops) -> list[int]:
    """One step of ``st`` from the beams' scores ``z`` ``(beams, vocab)`` (log-softmax, then the history
    processors): the parents of the new beams."""
    scores = F.log_softmax(z.float(), dim=-1)
    if history:
        scores = history(scores, st.running, prompt)
    return st.step(scores, stops).tolist()


def search_results(engine, beams: list[BeamState], opts: GenerationOptions, seeds) -> list[GenerationResult]:
    """Each prompt's best finished hypothesis as its result (the text cut before a stop string it ends on)."""
    tok, results = engine.tokenizer, []
    for p, st in enumerate(beams):
        ids, how = st.best()
        text = tok.decode(ids, skip_special_tokens=True) if tok is not None else ""
        if how == "stop":
            hit = [text.find(s) for s in opts.stop_strings if s in text]
            text = text[: min(hit)] if hit else text
        results.append(GenerationResult(text, ids, how, seeds[p]))
    return results


def beam_decode(engine, layout, prefill, plan, lang_draws, image_cols, opts: GenerationOptions, seeds, prompt_ids,
                states=None):  # fmt: skip
    """Beam search from a prefill (the engine's :meth:`~causalmm.decoding.Engine.generate_encoded` hands over
    its rows, prefill, sharing plan, language draws, image columns and per-prompt states); one result per prompt."""
    fw, cfg, method, ad = engine.forward, engine.config, engine.method, engine.adapter
    nb, rows0, n = opts.num_beams, layout.rows, len(layout.imgs)
    logits, cache, mask, positions = prefill
    # every row becomes nb beams, beam b of row i at i * nb + b
    low0 = list(range(len(rows0))) if plan is None else plan.keep
    select_cache_rows(cache, fw.share_low, [i for i in range(len(rows0)) for _ in range(nb)],
                      [j for j in range(len(low0)) for _ in range(nb)])  # fmt: skip
    logits = logits.repeat_interleave(nb, 0)
    fw.exit_logits = {k: v.repeat_interleave(nb, 0) for k, v in fw.exit_logits.items()}
    mask, positions = mask.repeat_interleave(nb, 0), positions.repeat_interleave(nb, -2)
    rows = [Row(r.prompt * nb + b, r.branch, r.draw) for r in rows0 for b in range(nb)]
    origin = [(i, b) for i in range(len(rows0)) for b in range(nb)]  # (prefill row, beam) of each row
    lower_keys = [(layout.lower_key(rows0[i]), b) for i, b in origin]
    lang_all = {i * nb + b: _clone_draws(d) for i, d in lang_draws.items() for b in range(nb)}
    image_cols = None if image_cols is None else image_cols.repeat_interleave(nb, 0)
    # each beam of prompt p is prompt p * nb + b of the rows: it carries its prompt's state
    states = None if states is None else {p * nb + b: s for p, s in states.items() for b in range(nb)}
    plan = fw.plan(lower_keys)
    beams = searches(engine, opts, n, nb)
    history, stops = HistoryProcessors(opts), stop_rule(engine, opts)

    active = list(range(len(rows)))
    low_rows = active if plan is None else plan.keep
    # each prompt's rows by (beam, branch) in `rows` order
    fact_of = {(rows0[i].prompt, b): i * nb + b for i, b in origin if rows0[i].branch is None}
    cf_of: dict[tuple[int, int, str], list[int]] = {}
    rows_of: dict[int, list[tuple[int, int, int]]] = {}  # each prompt's rows: (row, prefill row, beam)
    for j, (i, b) in enumerate(origin):
        r = rows0[i]
        rows_of.setdefault(r.prompt, []).append((j, i, b))
        if r.branch is not None:
            cf_of.setdefault((r.prompt, b, r.branch.name), []).append(j)

    for step in range(opts.max_new_tokens):
        where = {i: j for j, i in enumerate(active)}
        source = {i: i for i in active}
        for p in range(n):
            st = beams[p]
            if st.done:
                continue
            zs = []
            for b in range(nb):
                fl = logits[where[fact_of[(p, b)]]]
                cf = {}
                for br in engine.branches:
                    idx = [where[j] for j in cf_of[(p, b, br.name)]]
                    cf[br.name] = logits[idx].mean(0)
                if fw.exit_logits:
                    exits = {k: t[where[fact_of[(p, b)]]] for k, t in fw.exit_logits.items()}
                    zs.append(method.combine(fl, cf, cfg, step, exits=exits))
                else:
                    zs.append(method.combine(fl, cf, cfg, step) if engine.branches else fl)
            parents = choose(st, torch.stack(zs), history, prompt_ids[p], stops)
            for j, i, b in rows_of[p]:
                if j in where and parents[b] != b:
                    source[j] = i * nb + parents[b]
        if all(st.done for st in beams) or step == opts.max_new_tokens - 1:
            break
        # the beams' rows take their parents' caches, then finished prompts leave the batch
        if any(source[i] != i for i in active):
            upper = torch.tensor([where[source[i]] for i in active])
            at = {i: j for j, i in enumerate(low_rows)}
            lower = torch.tensor([at[source[i]] for i in low_rows]) if fw.share_low else None
            reorder_cache_rows(cache, fw.share_low, upper, lower)
        keep = [j for j, i in enumerate(active) if not beams[rows0[origin[i][0]].prompt].done]
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=mask.device)
            active = [active[j] for j in keep]
            plan = fw.plan([lower_keys[i] for i in active])
            kept_low = active if plan is None else [active[j] for j in plan.keep]
            at = {i: j for j, i in enumerate(low_rows)}
            select_cache_rows(cache, fw.share_low, keep, [at[i] for i in kept_low])
            low_rows = kept_low
            mask, positions = mask[sel], positions[..., sel, :]
        last = [beams[rows0[origin[i][0]].prompt].running[origin[i][1]][-1] for i in active]
        nxt = torch.tensor([[t] for t in last], device=mask.device)
        positions = ad.next_positions(positions)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        lang = {j: lang_all[i] for j, i in enumerate(active) if i in lang_all}
        cols = None if image_cols is None else image_cols[active]
        batch_rows = [rows[i] for i in active]
        logits = fw.step(
            {"input_ids": nxt}, mask, positions, cache, lang, plan, batch_rows,
            edits=engine.needs.edits(cols, batch_rows, prefill=False, states=states),
        )  # fmt: skip

    return search_results(engine, beams, opts, seeds)


def check_beam_options(opts: GenerationOptions, legacy: bool, branch_logits: bool, search: str | None = None) -> None:
    """Refuse what beam search (or a method's own search, ``search``) does not combine with, naming the fix."""
    from ..config import ConfigError

    what = search or "beam search"
    if opts.do_sample:
        raise ConfigError(f"{what} is deterministic here: use do_sample=False")
    if legacy:
        raise ConfigError(f"legacy=True (the contrast on the first token only) decodes greedily, not by {what}")
    if branch_logits:
        fix = "use a method with a per-token rule" if search else "use num_beams=1"
        raise ConfigError(f"branch logits are recorded along one sequence (explain), not over beams: {fix}")
