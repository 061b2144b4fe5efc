"""``causalmm compare --html``: one self-contained page of a comparison — the table with its intervals, the
paired tests, the bar chart, and a filterable list of the samples where the runs disagree.

Numbers say *how much* two methods differ; the flipped samples say *where*, and a reader checks those before
trusting a number. The page needs no server and no network: images are embedded (each distinct image once, as
a data URI in a CSS class), the list is plain HTML that reads without JavaScript, and a few lines of inline
script filter it by run, by kind and by text.

**A disagreement** is a (sample, seed) whose parsed answer under some run differs from the reference run's
(:meth:`~causalmm.benchmarks.base.Benchmark.outcome`: the yes/no or true/false answer; for CHAIR, the objects
the caption names). Each other run's answer is then *fixed* (its per-sample score is higher: right where the
reference was wrong, fewer hallucinated objects), *broken* (lower) or *changed* (a different answer, the same
score).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .base import BenchmarkError
from .compare_render import FRONTIER_TEXT, frontier_table, reference_text, runs_table, tests_table

__all__ = ["KINDS", "disagreements", "render_html", "sample_images"]

#: how another run's answer stands against the reference's, where they differ
KINDS = ("fixed", "broken", "changed")

#: longest side of an embedded image, in pixels (the page stays small with hundreds of samples)
THUMB = 224


def disagreements(runs: Sequence[Any], labels: Sequence[str]) -> list[dict[str, Any]]:
    """The (sample, seed) pairs where some run's parsed answer differs from the first run's, in the first run's
    order. Each entry: ``id``, ``seed``, ``prompt``, ``label`` (what the answer is scored against),
    ``image_digest``, and ``answers``: one per run (``run``, ``text``, ``answer``, ``kind``: ``None`` for the
    reference and for runs that agree with it, else one of :data:`KINDS`)."""
    ref, bench = runs[0], runs[0].bench
    by_key = [{(str(r["id"]), int(r["seed"])): r for r in run.records} for run in runs]
    out = []
    for rec in ref.records:
        key = (str(rec["id"]), int(rec["seed"]))
        mine, my_score = bench.outcome(rec)
        answers, differ = [], False
        for run, label, records in zip(runs, labels, by_key, strict=True):
            other = records.get(key)
            if other is None:  # check_same_samples guarantees the ids; a seed set may differ
                answers.append({"run": label, "text": None, "answer": None, "kind": None})
                continue
            theirs, score = bench.outcome(other)
            kind = None
            if run is not ref and theirs != mine:
                differ = True
                if score is None or my_score is None or score == my_score:
                    kind = "changed"
                else:
                    kind = "fixed" if score > my_score else "broken"
            answers.append({"run": label, "text": other.get("text"), "answer": _shown(theirs), "kind": kind})
        if differ:
            out.append(
                {
                    "id": key[0],
                    "seed": key[1],
                    "prompt": rec.get("prompt"),
                    "label": bench.label_of(rec),
                    "image_digest": rec.get("image_digest"),
                    "answers": answers,
                }
            )
    return out


def _shown(answer: Any) -> str:
    if isinstance(answer, tuple):
        return ", ".join(map(str, answer)) if answer else "(no object)"
    return str(answer)


def sample_images(run: Any, wanted: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Image digest -> data URI of a small copy, for the samples ``wanted`` (id -> the image digest its records
    carry), read again from the run's ``--data``/``--images``; and a note when some could not be shown.

    Only an image whose bytes still have the digest its records carry is shown: a file replaced since the run
    would show a picture the model never saw. Only the wanted samples' files are read, each once."""
    from .evaluate import load_run_samples
    from .records import image_digest

    if not wanted:
        return {}, None
    info = run.info
    try:
        samples = load_run_samples(run.bench, info["data"], info.get("images"), info.get("limit"))
    except (BenchmarkError, OSError) as err:
        return {}, f"images not shown: the run's data cannot be read again ({err})"
    uris: dict[str, str] = {}
    memo: dict[Any, str] = {}
    for s in samples:
        digest = wanted.get(s.id)
        if digest is None or digest in uris or s.image is None:
            continue
        try:
            if image_digest(s, memo) == digest:
                uris[digest] = _data_uri(s.image)
        except OSError:
            continue
    missing = len(set(wanted.values()) - set(uris))
    note = None
    if missing:
        note = f"{missing} image(s) not shown: no file of the run's data has the bytes its records were made from"
    return uris, note


def _data_uri(image: str | Path | bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        small = max(im.size) <= 128  # glyphs and diagrams: lossless; photos: JPEG
        im.save(buf, format="PNG" if small else "JPEG", quality=85)
    kind = "png" if small else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#1d1d1f}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.filters{display:flex;gap:18px;flex-wrap:wrap;align-items:center;margin:8px 0 12px;padding:8px;
background:#f5f5f7;border-radius:6px}
.sample{display:flex;gap:14px;border-top:1px solid #e3e3e3;padding:10px 0}
.thumb{width:112px;height:112px;flex:none;background-size:contain;background-repeat:no-repeat;
background-position:center;border:1px solid #ddd;image-rendering:pixelated}
.noimg{font-size:11px;color:#888;display:flex;align-items:center;justify-content:center;text-align:center}
.q{font-weight:600}.lab{color:#444}.answers{margin-top:4px;border:none}.answers td{border:none;padding:1px 8px 1px 0}
.kind{font-size:11px;padding:1px 6px;border-radius:8px;color:#fff}
.fixed{background:#1a7f37}.broken{background:#cf222e}.changed{background:#9a6700}.ref{background:#57606a}
.hidden{display:none}
"""

_JS = """
(function(){
  const boxes=[...document.querySelectorAll('input[name=kind]')];
  const run=document.getElementById('run-filter');const text=document.getElementById('text-filter');
  const count=document.getElementById('shown-count');
  function apply(){
    const kinds=new Set(boxes.filter(b=>b.checked).map(b=>b.value));
    const r=run?run.value:'';const t=text.value.trim().toLowerCase();let n=0;
    document.querySelectorAll('.sample').forEach(el=>{
      const mine=JSON.parse(el.dataset.kinds);
      const pairs=Object.entries(mine).filter(([k,v])=>(!r||k===r)&&kinds.has(v));
      const ok=pairs.length>0&&(!t||el.dataset.search.includes(t));
      el.classList.toggle('hidden',!ok);if(ok)n++;});
    count.textContent=n;}
  boxes.forEach(b=>b.addEventListener('change',apply));if(run)run.addEventListener('change',apply);
  text.addEventListener('input',apply);apply();
})();
"""


def render_html(
    result: dict[str, Any],
    runs: Sequence[Any],
    *,
    plot_png: bytes | None = None,
    frontier_png: bytes | None = None,
    command: str | None = None,
) -> str:
    """The page of a comparison (``result`` as :func:`~causalmm.benchmarks.compare.compare_runs` builds it,
    ``runs`` its loaded runs, in order; ``plot_png`` and ``frontier_png`` the charts written beside it). Its
    tables print the cells :mod:`.compare` builds for ``compare.md``, so the page and the file agree."""
    labels = [row["run"] for row in result["runs"]]
    flips = disagreements(runs, labels)
    wanted = {f["id"]: f["image_digest"] for f in flips if f["image_digest"]}
    uris, image_note = sample_images(runs[0], wanted)
    digest_class = {d: f"im{i}" for i, d in enumerate(sorted(uris))}
    esc = html.escape
    bench = result["benchmark"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    counts = {label: {k: 0 for k in KINDS} for label in labels[1:]}
    for f in flips:
        for a in f["answers"]:
            if a["kind"]:
                counts[a["run"]][a["kind"]] += 1

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(bench.upper())} comparison</title>",
        f"<style>{_CSS}",
        *(f".{c}{{background-image:url({uris[d]})}}" for d, c in digest_class.items()),
        "</style></head><body>",
        f"<h1>{esc(bench.upper())}: {esc(' vs '.join(labels))}</h1>",
        f'<p class="meta">Made {esc(when)} by causalmm compare'
        + (f" — <code>{esc(command)}</code>" if command else "")
        + "</p>",
        "<h2>Metrics (95% bootstrap intervals)</h2>",
        _table("metrics", *runs_table(result)),
    ]
    if plot_png:
        parts.append(_img(plot_png, "metrics with intervals"))
    for reference in result["references"]:
        parts += [
            f"<h2>Paired tests against {esc(reference['title'])} ({esc(reference['run'])})</h2>",
            f"<p>{esc(reference_text(reference))}</p>",
        ]
        head, rows = tests_table(result, reference)
        parts.append(_table(f"tests-{reference['name']}", head, rows) if rows else "<p>No other run to test.</p>")
    if "frontier" in result:
        parts += [
            "<h2>CHAIR: recall against CHAIR_i (the frontier)</h2>",
            f"<p>{esc(FRONTIER_TEXT)}</p>",
            _table("frontier", *frontier_table(result)),
            *(f'<p class="meta">Note: {esc(n)}</p>' for n in result["frontier"]["notes"]),
        ]
        if frontier_png:
            parts.append(_img(frontier_png, "recall against CHAIR_i, with the regular curve"))
    if result.get("notes"):
        parts += [f'<p class="meta">Note: {esc(n)}</p>' for n in result["notes"]]
    parts += [
        "<h2>Where the runs disagree</h2>",
        "<p>A sample is listed when a run's parsed answer differs from the first run's; "
        "<b>fixed</b>: better than the first run on that sample, <b>broken</b>: worse, <b>changed</b>: "
        "a different answer, no better or worse.</p>",
        _counts_table(counts),
    ]
    if image_note:
        parts.append(f'<p class="meta">{esc(image_note)}</p>')
    parts.append('<div class="filters">')
    parts.append(
        " ".join(
            f'<label><input type="checkbox" name="kind" value="{k}" checked> <span class="kind {k}">{k}</span></label>'
            for k in KINDS
        )
    )
    if len(labels) > 2:
        options = "".join(f'<option value="{esc(lab)}">{esc(lab)}</option>' for lab in labels[1:])
        options = f'<option value="">every run</option>{options}'
        parts.append(f'<label>run <select id="run-filter">{options}</select></label>')
    parts.append('<label>text <input id="text-filter" type="search" placeholder="question, answer, id"></label>')
    parts.append(f'<span><b id="shown-count">{len(flips)}</b> of {len(flips)} shown</span></div>')
    parts.append('<div id="samples">')
    for f in flips:
        parts.append(_sample_html(f, digest_class))
    parts.append("</div>")
    if not flips:
        parts.append("<p>The runs agree on every sample.</p>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _img(png: bytes, alt: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="{src}" style="max-width:100%"></p>'


def _table(table_id: str, head: list[str], rows: list[list[str]]) -> str:
    """An HTML table of the cells :mod:`.compare` builds; cells that read as numbers are right-aligned."""
    esc = html.escape
    out = [f'<table id="{esc(table_id)}"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for cells in rows:
        tds = "".join(f'<td class="num">{esc(c)}</td>' if _numeric(c) else f"<td>{esc(c)}</td>" for c in cells)
        out.append(f"<tr>{tds}</tr>")
    return "\n".join(out) + "</table>"


def _numeric(cell: str) -> bool:
    head = cell.split(" ", 1)[0].lstrip("+-−")
    return head.replace(".", "", 1).replace("e-", "", 1).isdigit()


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    head = "<tr><th>run</th>" + "".join(f"<th>{k}</th>" for k in KINDS) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(run)}</td>" + "".join(f'<td class="num">{c[k]}</td>' for k in KINDS) + "</tr>"
        for run, c in counts.items()
    )
    return f'<table id="counts">{head}{body}</table>'


def _sample_html(f: dict[str, Any], digest_class: dict[str, str]) -> str:
    esc = html.escape
    kinds = {a["run"]: a["kind"] for a in f["answers"] if a["kind"]}
    words = [f["id"], f["prompt"] or "", f["label"] or ""] + [a["text"] or "" for a in f["answers"]]
    search = " ".join(words).lower()
    cls = digest_class.get(f["image_digest"] or "")
    thumb = (
        f'<div class="thumb {cls}" role="img" aria-label="image of sample {esc(f["id"])}"></div>'
        if cls
        else '<div class="thumb noimg">image not available</div>'
    )
    rows = []
    for i, a in enumerate(f["answers"]):
        badge = (
            '<span class="kind ref">first</span>'
            if i == 0
            else (f'<span class="kind {a["kind"]}">{a["kind"]}</span>' if a["kind"] else "agrees")
        )
        text = "(no record for this seed)" if a["text"] is None else a["text"]
        rows.append(
            f'<tr data-run="{esc(a["run"])}"><td><b>{esc(a["run"])}</b></td><td>{badge}</td>'
            f'<td class="answer">{esc(str(a["answer"]))}</td><td class="text">{esc(text)}</td></tr>'
        )
    return (
        f'<div class="sample" data-id="{esc(f["id"])}" data-seed="{f["seed"]}" '
        f"data-kinds='{esc(json.dumps(kinds))}' data-search=\"{esc(search)}\">{thumb}<div>"
        f'<div class="q">{esc(f["prompt"] or "")}</div>'
        f'<div class="lab">label: {esc(f["label"] or "—")} · id {esc(f["id"])} · seed {f["seed"]}</div>'
        f'<table class="answers">{"".join(rows)}</table></div></div>'
    )
