"""Measure prior-induced hallucination in the toy world, before and after mitigation, with confidence intervals.

Every object is asked about every evaluation image (POPE's question and answer rule), and each question is
put in a *group* by what the world's priors say about it:

* ``prior_conflict``: a language-prior-favoured object that is absent. Training text asked about favoured
  objects mostly when present (P(yes) = ``language_prior``), so a "yes" here is the hallucination the prior
  causes: this group's false-yes rate is **the prior-induced hallucination rate**.
* ``partner_absent``: the co-occurrence partner of an object in the image, absent (the visual prior).
* ``other_absent``: every other absent object (the baseline false-yes rate).
* ``prior_consistent``: questions whose answer agrees with the training text's answer prior for that object
  (favoured and present; other objects, whose training questions lean to "no", when absent and not a
  partner, nor a cued object under its cue). Their accuracy is what a mitigation must not lose.
* ``present``: every present object (recall).

In a world with a vision-encoder prior (``WorldConfig.vision_prior``), a cued object's questions get groups of
their own instead of ``other_absent``:

* ``cue_conflict``: the cued object absent and its cue present. Stage 1 taught the vision tower that the cue
  comes with the object, so a "yes" here is **the vision-prior-induced hallucination**.
* ``cue_control``: the cued object absent and its cue absent (the same objects' baseline false-yes rate).
* ``cued_present``: the cued object present (recall on those objects, cue or not).

The split is val (choose settings) or test (report); the questions are built in memory from
:func:`~causalmm.toyworld.splits.eval_scenes`, the same scenes ``write_splits`` writes.
Confidence intervals resample *questions* (all seeds of a drawn question together) and average over the
counterfactual seeds, as the point estimate does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..benchmarks.pope import DEFAULT_SUFFIX, parse_official
from ..config import CausalMMConfig
from .render import render
from .splits import eval_scenes
from .statistics import ask_probabilities, train_statistics
from .texts import exist_question
from .world import WorldConfig

__all__ = [
    "GROUPS", "Answers", "Question", "questions", "answer", "branch_margins", "cost_ratio", "group_rates", "objective",
    "summarise",
]  # fmt: skip

#: group -> (what is measured, the answer that counts as a hit): false-yes rates and accuracies
GROUPS: dict[str, str] = {
    "prior_conflict": "false-yes rate on absent language-prior-favoured objects (prior-induced hallucination)",
    "partner_absent": "false-yes rate on absent co-occurrence partners of a present object",
    "other_absent": "false-yes rate on the other absent objects",
    "cue_conflict": "false-yes rate on absent cued objects under their cue (vision-prior-induced hallucination)",
    "cue_control": "false-yes rate on absent cued objects without their cue",
    "cued_present": "yes rate on present cued objects",
    "prior_consistent": "accuracy on questions whose answer agrees with the training answer prior",
    "present": "yes rate on present objects (recall)",
}


@dataclass(frozen=True)
class Question:
    """One existence question about image ``image`` (an index into the split's images)."""

    image: int
    object: str
    label: str  # "yes" / "no"
    groups: tuple[str, ...]


def answer_prior(config: WorldConfig) -> dict[str, str]:
    """object -> the answer its training existence questions mostly had ("yes" or "no")."""
    stats = train_statistics(config)
    out = {}
    for name, (ask_present, ask_absent) in ask_probabilities(config).items():
        p = stats.presence(name)
        yes = p * ask_present / (p * ask_present + (1 - p) * ask_absent)
        out[name] = "yes" if yes > 0.5 else "no"
    return out


def questions(config: WorldConfig, split: str, n_images: int) -> tuple[list[Image.Image], list[Question]]:
    """The split's first ``n_images`` images and every object asked about each."""
    scenes = eval_scenes(config, split, n_images)
    prior = answer_prior(config)
    images = [render(config, s) for s in scenes]
    out = []
    for i, scene in enumerate(scenes):
        partners = config.partners(scene.present)
        for name in config.objects:
            present = name in scene.present
            label = "yes" if present else "no"
            cued = name in config.cue_of
            under_cue = cued and scene.cue == config.cue_of[name]
            groups = []
            if present:
                groups += ["present", "cued_present"] if cued else ["present"]
            elif name in config.favoured:
                groups.append("prior_conflict")
            elif name in partners:
                groups.append("partner_absent")
            elif cued:
                groups.append("cue_conflict" if under_cue else "cue_control")
            else:
                groups.append("other_absent")
            if prior[name] == label and not (not present and (name in partners or under_cue)):
                groups.append("prior_consistent")
            out.append(Question(i, name, label, tuple(groups)))
    return images, out


@dataclass(frozen=True)
class Answers:
    """:func:`answer`'s result: the parsed words (seeds, questions) and, per (seed, batch), the wall time of the
    ``generate`` call and the tokens it generated (the demo's cost per token)."""

    words: np.ndarray
    seconds: np.ndarray
    tokens: np.ndarray


def answer(
    causalmm: Any,
    config: CausalMMConfig,
    images: Sequence[Image.Image],
    qs: Sequence[Question],
    seeds: Sequence[int],
    *,
    batch_size: int = 32,
    advance: Callable[[int], None] | None = None,
    generation: dict[str, Any] | None = None,
) -> Answers:
    """The parsed answers (``.words``: a (seeds, questions) array of "yes" / "no" / "other", POPE's official
    rule), with each batch's ``generate`` call timed; ``generation``: more generation options (``num_beams``).

    Each (seed, question) gets its own counterfactual generator seed, so answers do not depend on batching.
    """
    cm = causalmm.with_config(config)
    out = np.empty((len(seeds), len(qs)), dtype=object)
    starts = range(0, len(qs), batch_size)
    seconds = np.zeros((len(seeds), len(starts)))
    tokens = np.zeros((len(seeds), len(starts)), dtype=np.int64)
    prompts = [exist_question(q.object) + DEFAULT_SUFFIX for q in qs]
    for s, seed in enumerate(seeds):
        for b, start in enumerate(starts):
            idx = range(start, min(start + batch_size, len(qs)))
            tic = time.perf_counter()
            results = cm.generate(
                [images[qs[i].image] for i in idx],
                [prompts[i] for i in idx],
                seeds=[seed * 1_000_003 + i for i in idx],
                max_new_tokens=3,
                **(generation or {}),
            )
            seconds[s, b] = time.perf_counter() - tic
            tokens[s, b] = sum(len(res.token_ids) for res in results)
            for i, res in zip(idx, results, strict=True):
                word, ok = parse_official(res.text)
                out[s, i] = word if ok else "other"
            if advance is not None:
                advance(len(idx))
    return Answers(out, seconds, tokens)


def branch_margins(
    causalmm: Any,
    config: CausalMMConfig,
    images: Sequence[Image.Image],
    qs: Sequence[Question],
    groups: Sequence[str],
    *,
    per_group: int = 40,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Why a contrast moves an answer: per group (its first ``per_group`` questions), each branch's mean
    ``yes − no`` score margin at the first answer token and the share of questions where it is positive.

    The rule ``l + γ(l − l_cf)`` lowers "yes" only where the counterfactual branch leans to "yes" more than the
    factual one: a branch that keeps a prior says "yes" where the prior does. Keys: ``factual`` and each
    counterfactual branch's name (not the combined scores: the plausibility cut makes their margins infinite);
    values ``{"margin", "yes_share", "n"}``.
    """
    tok = causalmm.adapter.processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    cm = causalmm.with_config(config)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in groups:
        chosen = [(i, q) for i, q in enumerate(qs) if group in q.groups][:per_group]
        margins: dict[str, list[float]] = {}
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            results = cm.generate(
                [images[q.image] for _, q in part],
                [exist_question(q.object) + DEFAULT_SUFFIX for _, q in part],
                seeds=[config.seed * 1_000_003 + i for i, _ in part],
                max_new_tokens=1,
                return_branch_logits=True,
            )
            for res in results:
                for name, scores in res.branch_logits.items():
                    if name != "combined":
                        margins.setdefault(name, []).append(float(scores[0, yes] - scores[0, no]))
        out[group] = {
            name: {"margin": float(np.mean(m)), "yes_share": float(np.mean(np.array(m) > 0)), "n": len(m)}
            for name, m in margins.items()
        }
    return out


def cost_ratio(
    method: Answers, reference: Answers, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float | list[float] | int]:
    """Cost per generated token of ``method`` relative to ``reference`` on the same batches of questions, with a
    95% bootstrap interval that resamples batches (paired: a drawn batch brings both runs' times).

    Each run's cost is its total time over its total tokens (every seed of a batch together), so a method that
    answers in fewer tokens is not credited with a cheaper token.
    """
    t_m, n_m = method.seconds.sum(axis=0), method.tokens.sum(axis=0)
    t_r, n_r = reference.seconds.sum(axis=0), reference.tokens.sum(axis=0)
    if t_m.shape != t_r.shape:
        raise ValueError(f"cost_ratio needs the same batches: {t_m.shape[0]} and {t_r.shape[0]}")

    def ratio(idx: np.ndarray) -> float:
        return float((t_m[idx].sum() / max(n_m[idx].sum(), 1)) / (t_r[idx].sum() / max(n_r[idx].sum(), 1)))

    n = t_m.shape[0]
    point = ratio(np.arange(n))
    rng = np.random.default_rng(seed)
    draws = [ratio(rng.integers(0, n, n)) for _ in range(n_boot)] if n > 1 else []
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (point, point)
    return {"mean": point, "ci95": [float(lo), float(hi)], "n": n}


def _rates(yes: np.ndarray, labels: np.ndarray, members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group, the rate per seed row of ``yes`` (seeds, questions) booleans."""
    out = {}
    correct = yes == (labels == "yes")
    for group, mask in members.items():
        if not mask.any():
            continue
        if group in ("prior_consistent",):
            out[group] = correct[:, mask].mean(axis=1)
        else:  # false-yes rates (absent groups) and the yes rate on present objects
            out[group] = yes[:, mask].mean(axis=1)
    out["accuracy"] = correct.mean(axis=1)
    return out


def group_rates(
    answers: np.ndarray, qs: Sequence[Question], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """For each group (and overall accuracy): the mean over seeds and its 95% bootstrap interval over questions."""
    labels = np.array([q.label for q in qs])
    members = {g: np.array([g in q.groups for q in qs]) for g in GROUPS}
    yes = answers == "yes"
    point = {k: float(v.mean()) for k, v in _rates(yes, labels, members).items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    n = len(qs)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        sub = _rates(yes[:, idx], labels[idx], {g: m[idx] for g, m in members.items()})
        for k in point:
            if k in sub:
                draws[k].append(float(sub[k].mean()))
    out = {}
    for k, v in point.items():
        lo, hi = np.percentile(draws[k], [2.5, 97.5]) if draws[k] else (v, v)
        out[k] = {"mean": v, "ci95": [float(lo), float(hi)], "n": int(members[k].sum()) if k in members else n}
    return out


def _disjoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["ci95"][1] < b["ci95"][0] or a["ci95"][0] > b["ci95"][1])


def objective(rates: dict[str, float]) -> float:
    """What ``tune`` minimises: the prior-induced false-yes rate, averaged with the vision-prior-induced one in
    a world that has a vision-encoder prior (so one choice is judged on both priors)."""
    if "cue_conflict" in rates:
        return (rates["prior_conflict"] + rates["cue_conflict"]) / 2
    return rates["prior_conflict"]


def summarise(rows: dict[str, dict[str, dict[str, float]]], reference: str = "regular") -> list[dict[str, Any]]:
    """Table rows: per method the prior-induced hallucination rate and consistent accuracy, with the change
    against ``reference`` and whether the 95% intervals of the hallucination rate are disjoint; in a world with
    a vision-encoder prior, the same for the vision-prior-induced rate (``vision_*``)."""
    ref = rows[reference]
    table = []
    for name, rates in rows.items():
        pc, cons = rates["prior_conflict"], rates["prior_consistent"]
        row = {
            "method": name,
            "prior_hallucination": pc,
            "consistent_accuracy": cons,
            "delta_hallucination": pc["mean"] - ref["prior_conflict"]["mean"],
            "delta_consistent_accuracy": cons["mean"] - ref["prior_consistent"]["mean"],
            "ci_disjoint_from_reference": _disjoint(pc, ref["prior_conflict"]) and name != reference,
        }
        if "cue_conflict" in rates:
            vc = rates["cue_conflict"]
            row["vision_hallucination"] = vc
            row["delta_vision_hallucination"] = vc["mean"] - ref["cue_conflict"]["mean"]
            row["vision_ci_disjoint_from_reference"] = _disjoint(vc, ref["cue_conflict"]) and name != reference
        table.append(row)
    return table
