"""Explain a CausalMM answer token by token: what each branch proposed and what the contrast changed.

:func:`explain` runs the engine with ``return_branch_logits=True`` (greedy decoding) and, for every generated
token, lists the top-k candidates (decoded text, probability, logit, rank) under the factual branch, each
counterfactual branch and the combined rule, and which tokens the contrast promoted or suppressed relative
to the factual branch. The :class:`Explanation` renders as JSON, a ``rich`` table or a self-contained HTML
report.

Probabilities are the softmax of each branch's scores; for ``combined`` that is the softmax of the rule's
output ``z`` (tokens cut by the plausibility constraint, ``z = -inf``, have probability 0 and no rank).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

__all__ = ["Candidate", "Change", "Explanation", "Step", "explain"]


@dataclass
class Candidate:
    """One candidate token of one branch at one step. ``rank`` is 1-based (1 = the branch's best)."""

    token_id: int
    text: str
    prob: float
    logit: float | None  # None where the rule cut the token (-inf)
    rank: int


@dataclass
class Change:
    """How the contrast moved one token from the factual branch to the combined scores.

    ``combined_rank`` is ``None`` where the plausibility cut-off removed the token."""

    token_id: int
    text: str
    factual_rank: int
    combined_rank: int | None
    factual_prob: float
    combined_prob: float

    @property
    def delta_prob(self) -> float:
        return self.combined_prob - self.factual_prob


@dataclass
class Step:
    """One generated token: the chosen one, the branches' top-k and what the contrast changed."""

    index: int
    token_id: int
    text: str
    factual_choice: int  # the factual branch's argmax (what regular greedy decoding would have picked here)
    top: dict[str, list[Candidate]]  # branch name -> top-k, in the order factual, counterfactuals, combined
    promoted: list[Change]
    suppressed: list[Change]

    @property
    def flipped(self) -> bool:
        """Whether the contrast chose another token than the factual branch would have."""
        return self.token_id != self.factual_choice


@dataclass
class Explanation:
    """The token-by-token account of one generation (see :func:`explain`).

    ``branch_logits`` are the engine's recorded scores (``(steps, vocab)`` per branch), kept for analysis and
    left out of :meth:`to_json`.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int
    model: str
    config: dict[str, Any]
    branches: list[str]  # the counterfactual branches, in the engine's order
    top_k: int
    steps: list[Step]
    branch_logits: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- outputs -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no NaN or infinity: a cut token's logit is ``null``)."""
        steps = []
        for s in self.steps:
            steps.append(
                {
                    "index": s.index,
                    "token_id": s.token_id,
                    "token": s.text,
                    "factual_choice": s.factual_choice,
                    "flipped": s.flipped,
                    "top": {name: [asdict(c) for c in cands] for name, cands in s.top.items()},
                    "promoted": [asdict(c) | {"delta_prob": c.delta_prob} for c in s.promoted],
                    "suppressed": [asdict(c) | {"delta_prob": c.delta_prob} for c in s.suppressed],
                }
            )
        return {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "model": self.model,
            "config": self.config,
            "branches": ["factual", *self.branches, "combined"],
            "top_k": self.top_k,
            "steps": steps,
        }

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The per-token table as plain text: column names and one row per generated token (the app's view)."""
        names = ["factual", *self.branches, "combined"]
        head = ["#", "token", *names, "promoted", "suppressed"]
        out = []
        for s in self.steps:
            row = [str(s.index), repr(s.text) + (" *" if s.flipped else "")]
            row += ["\n".join(f"{c.text!r} {c.prob:.3f}" for c in s.top[name]) for name in names]
            row += ["\n".join(_change(c) for c in s.promoted), "\n".join(_change(c) for c in s.suppressed)]
            out.append(row)
        return head, out

    def table(self):
        """A ``rich.table.Table``: one row per generated token, one column per branch."""
        from rich.table import Table
        from rich.text import Text

        cfg = self.config
        title = (
            f"{cfg.get('method')} / {cfg.get('mode')}  gamma={cfg.get('gamma')} epsilon={cfg.get('epsilon')}  "
            f"answer: {self.text!r}"
        )
        table = Table(title=title, show_lines=True)
        table.add_column("#", justify="right")
        table.add_column("token")
        names = ["factual", *self.branches, "combined"]
        for name in names:
            table.add_column(name)
        table.add_column("promoted", style="green")
        table.add_column("suppressed", style="red")
        for s in self.steps:
            cells: list[Any] = [str(s.index), Text(repr(s.text) + (" *" if s.flipped else ""), style="bold")]
            for name in names:
                cell = Text()
                for c in s.top[name]:
                    line = f"{c.text!r} {c.prob:.3f}\n"
                    cell.append(line, style="bold" if c.token_id == s.token_id else "")
                cell.rstrip()
                cells.append(cell)
            cells.append("\n".join(_change(c) for c in s.promoted))
            cells.append("\n".join(_change(c) for c in s.suppressed))
            table.add_row(*cells)
        table.caption = "* the contrast chose another token than the factual branch; bold: the chosen token"
        return table

    def to_html(self, path: str | Path, figure: str | Path | None = None) -> Path:
        """Write a self-contained HTML report (``figure``, a PNG, embedded as base64). Returns the path."""
        from .inputs import InputError, check_output_file, write_failed

        out = check_output_file(path, "HTML report", "report.html")
        img = ""
        if figure is not None:
            fig = Path(figure)
            if not fig.is_file():
                raise InputError(f"figure not found: {fig} (give the path of a PNG, e.g. from `causalmm visualize`)")
            data = base64.b64encode(fig.read_bytes()).decode("ascii")
            img = f'<figure><img alt="attention maps" src="data:image/png;base64,{data}"></figure>'
        e = html.escape
        names = ["factual", *self.branches, "combined"]
        head = "".join(f"<th>{e(n)}</th>" for n in ["#", "token", *names, "promoted", "suppressed"])
        rows = []
        for s in self.steps:
            cells = [f"<td>{s.index}</td>", f'<td class="tok">{e(repr(s.text))}{" *" if s.flipped else ""}</td>']
            for name in names:
                items = "".join(
                    f"<li{' class=chosen' if c.token_id == s.token_id else ''}>{e(repr(c.text))} "
                    f"<span>{c.prob:.3f}</span></li>"
                    for c in s.top[name]
                )
                cells.append(f"<td><ol>{items}</ol></td>")
            cells.append("<td class=up>" + "<br>".join(e(_change(c)) for c in s.promoted) + "</td>")
            cells.append("<td class=down>" + "<br>".join(e(_change(c)) for c in s.suppressed) + "</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>causalmm explain</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }}
th {{ background: #f3f3f3; }}
ol {{ margin: 0; padding-left: 1.4em; }}
li span {{ color: #666; }}
li.chosen {{ font-weight: bold; }}
td.up {{ color: #176317; }} td.down {{ color: #a31515; }}
td.tok {{ font-weight: bold; white-space: nowrap; }}
figure img {{ max-width: 100%; }}
code {{ background: #f6f6f6; padding: 1px 3px; }}
</style></head><body>
<h1>CausalMM: token by token</h1>
<p><b>model</b> <code>{e(self.model)}</code> &nbsp; <b>seed</b> {self.seed}</p>
<p><b>prompt</b> {e(self.prompt)}</p>
<p><b>answer</b> {e(self.text)} <i>({e(self.finish_reason)})</i></p>
<p><b>config</b> <code>{e(cfg)}</code></p>
{img}
<p>Top-{self.top_k} tokens per branch (probability); bold: the chosen token; * the contrast chose another token
than the factual branch. Promoted / suppressed: rank change from the factual branch to the combined rule
(<i>cut</i>: removed by the plausibility cut-off).</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(doc, encoding="utf-8")
        except OSError as err:
            raise write_failed(err, out, "HTML report") from err
        return out


def _change(c: Change) -> str:
    after = "cut" if c.combined_rank is None else f"#{c.combined_rank}"
    return f"{c.text!r} #{c.factual_rank}->{after} ({c.delta_prob:+.3f})"


def _rank(scores: torch.Tensor, token: int) -> int | None:
    """1-based rank of ``token`` in ``scores`` (ties share the better rank); ``None`` for a ``-inf`` score."""
    v = scores[token]
    if torch.isneginf(v):
        return None
    return int((scores > v).sum()) + 1


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _step(index: int, token: int, logs: dict[str, torch.Tensor], k: int, decode) -> Step:
    probs = {name: torch.softmax(z.float(), -1) for name, z in logs.items()}
    top: dict[str, list[Candidate]] = {}
    for name, z in logs.items():
        p = probs[name]
        kk = min(k, int(torch.isfinite(z).sum()))
        vals, ids = torch.topk(z, max(kk, 1))
        top[name] = [
            Candidate(int(i), decode(int(i)), float(p[i]), _finite(float(v)), r)
            for r, (v, i) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True), start=1)
        ]
    fl, cz = logs["factual"], logs["combined"]
    pool = list(dict.fromkeys([c.token_id for c in top["factual"]] + [c.token_id for c in top["combined"]]))
    promoted, suppressed = [], []
    for t in pool:
        fr, cr = _rank(fl, t), _rank(cz, t)
        ch = Change(t, decode(t), fr, cr, float(probs["factual"][t]), float(probs["combined"][t]))
        if cr is not None and cr < fr:
            promoted.append(ch)
        elif cr is None or cr > fr:
            suppressed.append(ch)
    promoted.sort(key=lambda c: c.combined_rank)
    suppressed.sort(key=lambda c: c.factual_rank)
    return Step(index, token, decode(token), int(fl.argmax()), top, promoted, suppressed)


def explain(
    cm: Any,
    image: Any,
    prompt: str,
    *,
    max_new_tokens: int = 16,
    top_k: int = 5,
    seed: int | None = None,
) -> Explanation:
    """Generate greedily under ``cm.config`` and explain each token (see :class:`Explanation`).

    Args:
        cm: a :class:`causalmm.api.CausalMM` (its config decides the method, branches, gamma and epsilon).
        image: a path or a PIL image.
        prompt: the question or instruction.
        max_new_tokens: tokens to generate.
        top_k: candidates listed per branch and step.
        seed: the sample's seed (``None``: ``cm.config.seed``).

    Raises:
        InputError: missing/unreadable image, empty prompt. ConfigError: ``top_k`` below 1 or above the
            vocabulary, ``max_new_tokens`` < 1.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be an integer >= 1")
    vocab = getattr(cm.model.config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and top_k > vocab:
        raise ConfigError(f"top_k={top_k} is more than the model's {vocab} tokens: give 1 to {vocab}")
    res = cm.generate(
        image,
        prompt,
        max_new_tokens=max_new_tokens,
        seeds=None if seed is None else [int(seed)],
        return_branch_logits=True,
    )
    logs = res.branch_logits
    tok = getattr(cm.processor, "tokenizer", cm.processor)
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tok.decode([i])
        return cache[i]

    branches = [b.name for b in cm.engine.branches]
    order = ["factual", *branches, "combined"]
    steps = [
        _step(t, token, {name: logs[name][t] for name in order}, top_k, decode) for t, token in enumerate(res.token_ids)
    ]
    model = str(getattr(cm.model.config, "_name_or_path", "") or type(cm.model).__name__)
    return Explanation(
        prompt=prompt,
        text=res.text,
        token_ids=list(res.token_ids),
        finish_reason=res.finish_reason,
        seed=res.seed,
        model=model,
        config=cm.config.to_dict(),
        branches=branches,
        top_k=top_k,
        steps=steps,
        branch_logits=logs,
    )
