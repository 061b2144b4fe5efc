"""The toy-world study: choose each method's settings on the val split (:func:`tune`), report on test (:func:`demo`).

``tune`` sweeps, per method, the knobs the paper and the pilot point at (which layers are intervened, gamma,
epsilon; VCD's noise step) on the **val** images with one counterfactual seed, and keeps for each method the
setting with the lowest prior-induced hallucination rate among those that keep prior-consistent accuracy
within ``max_drop`` of regular decoding (on val). The choice, and the whole grid, go to ``tuning.json`` in
the model directory. ``demo`` (``causalmm demo``) runs regular greedy, VCD and CausalMM in vision, language
and multimodal mode (``--all``: the full leaderboard, every baseline and the original feature gate too) with
those settings on the **test** images, over three counterfactual seeds for the methods that draw one and once
for the others, times every batch against regular decoding, and writes ``metrics.json``, ``demo.png`` and
``leaderboard.md``: nothing in it is chosen on the numbers it reports. What is run and tried is in :mod:`.grid`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from ..config import CausalMMConfig, ConfigError
from ..tuning.select import Rule, select
from .grid import DEFAULTS, LEADERBOARD, METHODS, grid, seeded, split
from .study import GROUPS, Answers, answer, cost_ratio, group_rates, objective, questions, summarise
from .world import WorldConfig

#: stamped into the demo's metrics.json (a rerun into the same --out replaces only its own result)
DEMO_FORMAT = "causalmm-toyworld-demo/2"

__all__ = ["METHODS", "LEADERBOARD", "DEFAULTS", "tune", "demo", "load_settings", "plot", "leaderboard", "ci"]


def _with_regular(methods: Sequence[str]) -> list[str]:
    """``methods`` checked against the leaderboard, regular decoding first (the reference of every comparison)."""
    unknown = [m for m in methods if m not in LEADERBOARD]
    if unknown:
        raise ConfigError(f"unknown toy-world method(s) {', '.join(unknown)}; choose among {', '.join(LEADERBOARD)}")
    return ["regular", *(m for m in methods if m != "regular")]


def load_model(model: str | Path | None, world: str = "default") -> tuple[Any, Path]:
    from ..api import CausalMM
    from .worlds import shipped_model_path

    path = Path(model) if model is not None else shipped_model_path(world)
    return CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular")), path


def trained_world(path: Path) -> WorldConfig:
    """The world a model was trained on (its training.json), so questions come from the same world."""
    record = path / "training.json"
    if not record.is_file():
        return WorldConfig()
    world = json.loads(record.read_text(encoding="utf-8"))["world"]
    for key, value in world.items():  # JSON lists back to the config's tuples
        if isinstance(value, list):
            world[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return WorldConfig(**world)


def load_settings(path: Path, methods: Sequence[str] = METHODS) -> tuple[dict[str, dict[str, Any]], str]:
    """(method -> settings, where they came from): the model's tuning.json, or :data:`DEFAULTS` for the methods
    it has no choice for (the source says which)."""
    tuning = path / "tuning.json"
    chosen = json.loads(tuning.read_text(encoding="utf-8"))["chosen"] if tuning.is_file() else {}
    settings = {m: chosen[m]["settings"] if m in chosen else DEFAULTS[m] for m in methods}
    missing = [m for m in methods if m not in chosen]
    if not chosen:
        return settings, "defaults (no tuning.json beside the model)"
    if missing:
        return settings, f"chosen on the val split ({tuning.name}); defaults for {', '.join(missing)}"
    return settings, f"chosen on the val split ({tuning.name})"


def tune(
    model: str | Path | None = None,
    *,
    n_images: int = 80,
    seed: int = 0,
    max_drop: float = 0.02,
    batch_size: int = 32,
    write: bool = True,
    methods: Sequence[str] = LEADERBOARD,
    log: Callable[[str], None] = print,
    world: str = "default",
) -> dict[str, Any]:
    """Sweep each method's settings on the val split; keep the best admissible one per method (``model``: a
    model directory; else the shipped model of ``world``).

    Regular decoding is always run (its accuracy sets the floor). With ``write``, the choices join those of an
    earlier tuning.json made with the same images and seed, so one method can be re-tuned without the rest.
    """
    methods = _with_regular(methods)
    cm, path = load_model(model, world)
    images, qs = questions(trained_world(path), "val", n_images)
    n_vision = cm.adapter.model.config.vision_config.num_hidden_layers
    n_text = cm.adapter.model.config.text_config.num_hidden_layers
    settings_grid = grid(n_vision, n_text)
    results: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for method in methods:
        results[method] = []
        for settings in settings_grid[method]:
            kwargs, generation = split(settings, path)
            cfg = CausalMMConfig(seed=seed, **kwargs)
            words = answer(cm, cfg, images, qs, [seed], batch_size=batch_size, generation=generation).words
            rates = group_rates(words, qs, n_boot=0)
            results[method].append({"settings": settings, "rates": {k: v["mean"] for k, v in rates.items()}})
            r = results[method][-1]["rates"]
            vision = f" vision {r['cue_conflict']:.3f}" if "cue_conflict" in r else ""
            log(
                f"{method:20s} {json.dumps(settings):110s} hallucination {r['prior_conflict']:.3f}{vision} "
                f"consistent {r['prior_consistent']:.3f} acc {r['accuracy']:.3f}"
            )
    # the benchmarks' selection code (causalmm.tuning.select), with the world's rule: the objective, under a
    # floor on prior-consistent accuracy; nothing above the floor gives the least damaging setting, flagged
    rule = Rule(objective, lower_is_better=True, floor_metric="prior_consistent", floor=max_drop, name="objective")
    reference = results["regular"][0]["rates"]
    chosen = {}
    for method, rows in results.items():
        best = select([{"settings": r["settings"], "metrics": r["rates"]} for r in rows], rule, reference)
        chosen[method] = {"settings": best["settings"], "rates": best["metrics"], "admissible": best["admissible"]}
    walls = _walls(results, round(time.perf_counter() - start, 1))
    previous = _previous_tuning(path, n_images, seed, max_drop, results["regular"][0]) if write else None
    if previous is not None:  # keep the earlier choices of the methods not re-run, in leaderboard order
        keep = [m for m in LEADERBOARD if m in chosen or m in previous["chosen"]]
        chosen = {m: chosen[m] if m in chosen else previous["chosen"][m] for m in keep}
        results = {m: results[m] if m in results else previous["grid"][m] for m in keep}
        walls = {m: walls[m] if m in walls else previous["wall_time_s_by_method"][m] for m in keep}
    out = {
        "format": "causalmm-toyworld-tuning/2",
        "split": "val",
        "n_images": n_images,
        "n_questions": len(qs),
        "seed": seed,
        "max_drop": max_drop,
        "rule": (
            f"per method, the lowest {_objective_words(results['regular'][0]['rates'])} among settings whose "
            f"prior_consistent accuracy "
            f"is at least regular's minus {max_drop} (val split, one counterfactual seed); where no setting "
            f"qualifies, the one with the highest prior_consistent accuracy, marked admissible=false; ties go to the "
            f"higher prior_consistent accuracy, then to the earlier setting of the grid (the official one first)"
        ),
        "chosen": chosen,
        "grid": results,
        "wall_time_s_by_method": walls,
    }
    if write:
        (path / "tuning.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def _objective_words(rates: dict[str, float]) -> str:
    if "cue_conflict" in rates:
        return "mean of the prior_conflict and cue_conflict false-yes rates"
    return "prior_conflict false-yes rate"


def _walls(results: dict[str, list], wall: float) -> dict[str, float]:
    """This run's wall time, shared among the methods it ran in proportion to their grid sizes."""
    sizes = {m: len(rows) for m, rows in results.items()}
    return {m: round(wall * n / sum(sizes.values()), 1) for m, n in sizes.items()}


def _previous_tuning(
    path: Path, n_images: int, seed: int, max_drop: float, regular: dict[str, Any]
) -> dict[str, Any] | None:
    """An earlier tuning.json whose choices still hold: same images, seed and rule, and regular decoding giving
    the same rates (the floor every choice was made against); otherwise None and it is replaced whole."""
    file = path / "tuning.json"
    if not file.is_file():
        return None
    old = json.loads(file.read_text(encoding="utf-8"))
    same = (
        old.get("format") == "causalmm-toyworld-tuning/2"
        and (old.get("n_images"), old.get("seed"), old.get("max_drop")) == (n_images, seed, max_drop)
        and old.get("chosen", {}).get("regular", {}).get("rates") == regular["rates"]
    )
    return old if same else None


def demo(
    model: str | Path | None = None,
    *,
    out: str | Path = "runs/demo",
    n_images: int = 240,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    batch_size: int = 32,
    n_boot: int = 2000,
    command: str = "causalmm demo",
    progress: bool = True,
    world: str = "default",
) -> dict[str, Any]:
    """``methods`` on the test split; writes metrics.json, demo.png and leaderboard.md under ``out`` (``model``:
    a model directory; else the shipped model of ``world``).

    Methods whose answers depend on the counterfactual seed run once per seed, the others once. Every
    ``generate`` call is timed; each method's cost per token is reported relative to regular decoding on the
    same batches (regular is always run). One warm-up batch per method runs before its timed ones.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..outputs import check_results_folder
    from .worlds import shipped_model_path

    methods = _with_regular(methods)
    where = str(Path(model) if model is not None else shipped_model_path(world))
    check_results_folder(
        out, "--out", main="metrics.json", fmt=DEMO_FORMAT.split("/")[0] + "/",
        writes=("metrics.json", "leaderboard.md", "demo.png"), inputs=[("--model", where)],
        same=lambda earlier: earlier.get("model") == where, what="another model",
    )  # fmt: skip
    cm, path = load_model(model, world)
    settings, source = load_settings(path, methods)
    images, qs = questions(trained_world(path), "test", n_images)
    runs = {m: list(seeds) if seeded(settings[m]) else list(seeds)[:1] for m in methods}
    total = sum(len(s) for s in runs.values()) * len(qs)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    answers: dict[str, Answers] = {}
    start = time.perf_counter()
    with Progress(
        TextColumn("{task.description:22s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=False,
    ) as bar:
        task = bar.add_task("demo", total=total)
        for method in methods:
            bar.update(task, description=method)
            kwargs, generation = split(settings[method], path)
            cfg = CausalMMConfig(**kwargs)
            # warm-up: one full batch
            answer(cm, cfg, images, qs[:batch_size], [0], batch_size=batch_size, generation=generation)
            answers[method] = answer(
                cm, cfg, images, qs, runs[method], batch_size=batch_size, advance=lambda n: bar.advance(task, n),
                generation=generation,
            )  # fmt: skip
            rows[method] = group_rates(answers[method].words, qs, n_boot=n_boot)
            rows[method]["cost_per_token"] = cost_ratio(answers[method], answers["regular"], n_boot=n_boot)
    table = summarise(rows)
    result = {
        "format": DEMO_FORMAT,
        "model": str(path),
        "split": "test",
        "n_images": n_images,
        "n_questions": len(qs),
        "seeds": list(seeds),
        "seeds_run": runs,
        "settings": settings,
        "settings_source": source,
        "groups": GROUPS,
        "rates": rows,
        "table": table,
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": command,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "leaderboard.md").write_text(leaderboard(result), encoding="utf-8")
    plot(result, out / "demo.png")
    return result


def machine() -> str:
    """What the timings ran on, for the table's caption."""
    import torch

    return (
        f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def describe(settings: dict[str, Any]) -> str:
    """A setting in a table cell: every knob but the method's name (``gamma 4, epsilon 0.01, layers all``)."""
    flat = {k: v for k, v in settings.items() if k not in ("method", "params")}
    flat.update(settings.get("params", {}))
    return ", ".join(f"{k} {v}" for k, v in flat.items() if v is not None) or "-"


def ci(x: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """A rate with its interval, ``59.1 [53.8, 64.2]`` (percent by default; ``scale=1, digits=2`` for a ratio)."""
    lo, hi = x["ci95"]
    return f"{scale * x['mean']:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def leaderboard(result: dict[str, Any]) -> str:
    """The demo's table as markdown: date, machine and command in the caption, every rate with its interval."""

    vision = "vision_hallucination" in result["table"][0]
    head = "| method | settings | prior-induced hallucination % | Δ | "
    if vision:
        head = "| method | settings | language-prior hallucination % | Δ | vision-prior hallucination % | Δ | "
        head += "cued object absent, no cue, false yes % | "
    head += "other absent, false yes % | prior-consistent accuracy % | accuracy % | cost per token × regular |"
    lines = [
        f"Toy world, test split: {result['n_questions']} questions, counterfactual seeds {result['seeds']} (methods "
        f"that draw none run once); 95% bootstrap intervals (questions for rates, batches for cost). Settings "
        f"{result['settings_source']}. {result['date']}, {result['machine']}; `{result['command']}` "
        f"({result['wall_time_s']:.0f} s).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in result["table"]:
        name = row["method"]
        rates = result["rates"][name]
        cells = [_bold(name, row), describe(result["settings"][name]), _bold(ci(row["prior_hallucination"]), row)]
        cells.append(f"{100 * row['delta_hallucination']:+.1f}")
        if vision:
            cells.append(_bold(ci(row["vision_hallucination"]), row, "vision_"))
            cells += [f"{100 * row['delta_vision_hallucination']:+.1f}", ci(rates["cue_control"])]
        cells += [ci(rates["other_absent"]), ci(row["consistent_accuracy"]), ci(rates["accuracy"])]
        cells.append(ci(rates["cost_per_token"], 1.0, 2))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bold: hallucination lower than regular's with disjoint intervals.", ""]
    return "\n".join(lines)


def _bold(text: str, row: dict[str, Any], kind: str = "") -> str:
    """``text`` in bold where the row's (``kind``) hallucination is below regular's with disjoint intervals."""
    lower = row[f"{kind}ci_disjoint_from_reference"] and row[f"delta_{kind}hallucination"] < 0
    return f"**{text}**" if lower else text


def plot(result: dict[str, Any], path: Path) -> Path:
    """Bars with 95% intervals, one row per method: prior-induced hallucination (in a world with a vision-encoder
    prior: of each kind, and the cued objects' false yes without their cue), other absent objects' false-yes,
    prior-consistent accuracy and cost per token relative to regular (a dashed line marks regular's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("prior_conflict", "prior-induced hallucination\n(false yes, favoured object absent)", (0, 1)),
        ("other_absent", "false yes,\nother absent objects", (0, 1)),
        ("prior_consistent", "accuracy,\nprior-consistent questions", (0, 1)),
        ("cost_per_token", "cost per token\n× regular", None),
    ]
    if "cue_conflict" in result["rates"]["regular"]:
        panels[:1] = [
            ("prior_conflict", "language-prior hallucination\n(false yes, favoured object absent)", (0, 1)),
            ("cue_conflict", "vision-prior hallucination\n(false yes, cue on, cued object absent)", (0, 1)),
            ("cue_control", "false yes, cued object\nabsent, no cue", (0, 1)),
        ]
    methods = list(result["rates"])
    height = max(3.2, 1.2 + 0.28 * len(methods))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.25 * len(panels), height), dpi=110, sharey=True)
    colours = [plt.get_cmap("tab20")(i % 20) for i in range(len(methods))]
    colours[0] = "#777777"  # regular
    rows = range(len(methods))
    for ax, (key, title, limits) in zip(axes, panels, strict=True):
        means = [result["rates"][m][key]["mean"] for m in methods]
        lo = [m - result["rates"][x][key]["ci95"][0] for m, x in zip(means, methods, strict=True)]
        hi = [result["rates"][x][key]["ci95"][1] - m for m, x in zip(means, methods, strict=True)]
        ax.barh(rows, means, xerr=[lo, hi], capsize=2, color=colours)
        ax.axvline(means[0], color="#444444", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        if limits is not None:
            ax.set_xlim(*limits)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, methods, fontsize=8)
    axes[0].invert_yaxis()  # table order, top to bottom
    fig.suptitle(
        f"toy world, test split: {result['n_questions']} questions, {len(result['seeds'])} counterfactual seeds "
        "(methods that draw none: one run), 95% bootstrap intervals",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
