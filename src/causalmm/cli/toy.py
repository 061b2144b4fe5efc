"""The toy-world commands: ``demo`` (the main job), ``plumbing`` and ``toyworld train|tune|splits``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import fail, int_list, user_errors, within

WORLD_HELP = "A shipped toy world: default (language prior) | vision-prior (a vision prior that reaches the answer)."


def demo(
    model: Annotated[
        Path | None, typer.Option(help="A toy-world model directory (default: the --world model in the package).")
    ] = None,
    world: Annotated[str, typer.Option(help=WORLD_HELP)] = "default",
    out: Annotated[Path, typer.Option(help="Where metrics.json and demo.png go.")] = Path("runs/demo"),
    images: Annotated[int, typer.Option(help="Test-split images (every object is asked about each); 1..100000.")] = 240,
    seeds: Annotated[str, typer.Option(help="Counterfactual seeds, comma-separated.")] = "0,1,2",
    batch_size: Annotated[int, typer.Option(help="Questions per batch; 1..1024.")] = 32,
    all_methods: Annotated[
        bool, typer.Option("--all", help="The full leaderboard: every baseline and the original feature gate too.")
    ] = False,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated leaderboard rows (regular is always run); not with --all.")
    ] = None,
) -> None:
    """Show what CausalMM does on the embedded toy-world model: prior-induced hallucination, before and after.

    Runs regular greedy, VCD and CausalMM (vision, language, multimodal) on the toy world's test split (with
    --all, every method of the leaderboard), with the settings chosen on its val split, and prints each
    method's rates and its cost per token relative to regular decoding, with 95% bootstrap intervals.
    """
    import shlex
    import sys

    from ..toyworld.demo import LEADERBOARD, METHODS
    from ..toyworld.demo import demo as run_demo

    seed_list = int_list(seeds, "--seeds")
    if len(set(seed_list)) != len(seed_list):
        fail(f"--seeds {seeds!r} repeats a seed: give distinct seeds (a repeat would count its answers twice)")
    within("--images", images, 1, MAX_IMAGES)
    within("--batch-size", batch_size, 1, MAX_BATCH)
    if methods is not None and all_methods:
        fail("--methods and --all both choose the rows: give one of them")
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    if names is not None and not names:
        fail("--methods is empty: give leaderboard rows, e.g. --methods vcd,agla")
    command = shlex.join(["causalmm", *sys.argv[1:]])
    try:
        result = run_demo(
            model, out=out, n_images=images, seeds=seed_list, batch_size=batch_size,
            methods=names or (LEADERBOARD if all_methods else METHODS), command=command, world=world,
        )  # fmt: skip
    except (FileNotFoundError, *user_errors()) as err:
        fail(str(err))
    _print_demo(result, out)


def _print_demo(result: dict, out: Path) -> None:
    from ..toyworld.demo import ci

    table = Table(
        title=f"Toy world, test split: {result['n_questions']} questions, seeds {result['seeds']} "
        f"(settings {result['settings_source']})"
    )
    vision = "vision_hallucination" in result["table"][0]
    columns = ["method", "prior-induced hallucination %", "Δ", "CIs disjoint"]
    if vision:
        columns[1:] = ["language-prior hallucination %", "Δ", "CIs disjoint", "vision-prior hallucination %", "Δ",
                       "CIs disjoint", "cued absent, no cue, false-yes %"]  # fmt: skip
    columns += ["other absent false-yes %", "prior-consistent accuracy %", "Δ", "accuracy %", "cost/token × regular"]
    for col in columns:
        table.add_column(col)
    for row in result["table"]:
        rates = result["rates"][row["method"]]
        cells = [row["method"], ci(row["prior_hallucination"]), f"{100 * row['delta_hallucination']:+.1f}",
                 "yes" if row["ci_disjoint_from_reference"] else ""]  # fmt: skip
        if vision:
            cells += [ci(row["vision_hallucination"]), f"{100 * row['delta_vision_hallucination']:+.1f}",
                      "yes" if row["vision_ci_disjoint_from_reference"] else "", ci(rates["cue_control"])]  # fmt: skip
        cells += [ci(rates["other_absent"]), ci(row["consistent_accuracy"]),
                  f"{100 * row['delta_consistent_accuracy']:+.1f}", ci(rates["accuracy"]),
                  ci(rates["cost_per_token"], 1.0, 2)]  # fmt: skip
        table.add_row(*cells)
    Console(width=max(Console().width, 150)).print(table)
    written = ", ".join(str(out / name) for name in ("metrics.json", "leaderboard.md", "demo.png"))
    print(f"wrote {written} ({result['wall_time_s']:.0f} s)")


def plumbing(
    family: Annotated[
        str, typer.Option(help="Tiny model family: llava | llava_next | qwen2_vl | qwen2_5_vl | ...")
    ] = "llava",
    out: Annotated[Path, typer.Option(help="Where the tiny model is built.")] = Path("runs/plumbing-model"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 8,
) -> None:
    """Run every method on a tiny random-weight model of any family and show what each branch did.

    The weights are random: this shows the machinery (branches, contrast, per-branch effect), not quality.
    """
    from PIL import Image

    from ..api import CausalMM
    from ..config import CausalMMConfig
    from ..tiny import ALL_FAMILIES, build_tiny_model

    if family not in ALL_FAMILIES:
        fail(f"--family {family!r} is not valid; choose one of {', '.join(ALL_FAMILIES)}")
    path = build_tiny_model(family, out / family)
    image = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    prompt = "Is there a red cat in the image? Answer yes or no."
    base = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"))
    rows = [("regular", CausalMMConfig(method="regular")), ("vcd", CausalMMConfig(method="vcd"))]
    rows += [
        (f"causalmm/{m}", CausalMMConfig(mode=m, **({} if m == "vision" else {"language_layers": "all"})))
        for m in ("vision", "language", "multimodal", "joint")
    ]
    table = Table(title=f"RANDOM WEIGHTS — tiny {family} model (plumbing demo, not a quality result)")
    for col in ("method", "tokens", "max |factual - branch| logit gap per branch (step 1)", "changed vs regular"):
        table.add_column(col)
    ref = None
    for name, cfg in rows:
        res = base.with_config(cfg).generate(image, prompt, max_new_tokens=max_new_tokens, return_branch_logits=True)
        ref = ref or res.token_ids
        fact = res.branch_logits["factual"][0]
        gaps = ", ".join(
            f"{k}={float((v[0] - fact).abs().max()):.3f}"
            for k, v in res.branch_logits.items()
            if k not in ("factual", "combined")
        )
        table.add_row(name, str(res.token_ids), gaps or "(no counterfactual branch)", str(res.token_ids != ref))
    Console(width=max(Console().width, 140)).print(table)


#: the most images a toy-world command draws per split (each is drawn, and saved or asked about: 100k take
#: minutes and about 1 GB)
MAX_IMAGES = 100_000
#: the files ``toyworld train`` writes into its --out (a from_pretrained folder and its training record)
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "training.json",
)  # fmt: skip
#: the most questions per batch: beyond it a batch only adds memory (the test split's 240 images ask 2400)
MAX_BATCH = 1024

toyworld_app = typer.Typer(no_args_is_help=True, help="The embedded toy world: train its model, tune, write splits.")


@toyworld_app.command("train")
def toyworld_train(
    out: Annotated[Path, typer.Option(help="Output directory (a from_pretrained model directory).")],
    world: Annotated[str, typer.Option(help=WORLD_HELP)] = "default",
    seed: Annotated[int, typer.Option(help="Initialisation seed (and the stretch of the data stream used).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default: the shipped model's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per step (default: the shipped model's).")] = None,
    threads: Annotated[
        int, typer.Option(help="CPU threads, 1 to the CPU count (results are reproducible for a fixed count).")
    ] = 2,
) -> None:
    """Train the toy-world LLaVA from scratch on generated data (about 14 minutes on 2 CPU cores; the
    vision-prior world 25 to 46)."""
    import os
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..outputs import check_results_folder
    from ..toyworld.train import TrainConfig, train
    from ..toyworld.worlds import get_world

    within("--threads", threads, 1, os.cpu_count() or 1, "this machine's CPU count")
    for flag_, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value is not None:
            within(flag_, value, 1)
    try:
        shipped = get_world(world)
        cfg = TrainConfig(seed=seed, threads=threads, **shipped.training)
        cfg = replace(cfg, **{k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v is not None})
        # before minutes of training: a model folder train made before is replaced, nothing else is
        check_results_folder(out, "--out", main="training.json", fmt="causalmm-toyworld-training/", writes=MODEL_FILES)
    except (ValueError, *user_errors()) as err:
        fail(str(err))
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ) as bar:
        task = bar.add_task("train", total=cfg.steps, info="")

        def on_log(record: dict) -> None:
            if "vision_step" in record:  # stage 1 (vision tower) done
                exact = record.get("patch_exact", record.get("image_exact", 0.0))
                bar.update(task, info=f"vision tower: exact-match accuracy {exact:.2f}")
                return
            acc = record["accuracy"]
            info = f"loss {record['loss']:.3f}  exist {acc.get('exist', 0):.2f}  colour {acc.get('colour', 0):.2f}"
            bar.update(task, completed=record["step"], info=info)

        path = train(out, world=shipped.config, cfg=cfg, on_log=on_log)
    print(f"wrote {path} (load it with --model {path})")


@toyworld_app.command("tune")
def toyworld_tune(
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the --world model shipped).")] = None,
    world: Annotated[str, typer.Option(help=WORLD_HELP)] = "default",
    images: Annotated[int, typer.Option(help="Val-split images; 1..100000.")] = 80,
    max_drop: Annotated[float, typer.Option(help="Largest prior-consistent accuracy loss allowed; 0..1.")] = 0.02,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated leaderboard names to (re-)tune; the others keep their choice.")
    ] = None,
) -> None:
    """Choose each method's settings on the val split; writes tuning.json beside the model (the demo reads it)."""
    from ..toyworld.demo import LEADERBOARD, tune

    within("--images", images, 1, MAX_IMAGES)
    within("--max-drop", max_drop, 0.0, 1.0, "a share of accuracy")
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(LEADERBOARD)
    try:
        result = tune(model, n_images=images, max_drop=max_drop, methods=names, world=world)
    except (FileNotFoundError, *user_errors()) as err:
        fail(str(err))
    for method, best in result["chosen"].items():
        r = best["rates"]
        vision = f"  vision {r['cue_conflict']:.3f}" if "cue_conflict" in r else ""
        print(f"{method:20s} {json.dumps(best['settings'])}  hallucination {r['prior_conflict']:.3f}{vision}  "
              f"consistent {r['prior_consistent']:.3f}")


@toyworld_app.command("fit-vti")
def toyworld_fit_vti(
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the --world model shipped).")] = None,
    world: Annotated[str, typer.Option(help=WORLD_HELP)] = "default",
) -> None:
    """Fit VTI's directions on demos drawn from the world (the official recipe); writes vti.safetensors beside the
    model, where the toy world's VTI settings read it."""
    import tempfile

    from ..toyworld.demo import load_model, trained_world
    from ..toyworld.fit import fit_toy_vti

    try:
        cm, path = load_model(model, world)
        with tempfile.TemporaryDirectory() as work:
            out = fit_toy_vti(cm, path, trained_world(path), Path(work), log=lambda _: None)
    except (FileNotFoundError, *user_errors()) as err:
        fail(str(err))
    print(f"wrote {out}")


@toyworld_app.command("splits")
def toyworld_splits(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    world: Annotated[str, typer.Option(help=WORLD_HELP)] = "default",
    val_images: Annotated[int, typer.Option(help="Val-split images; 1..100000.")] = 200,
    test_images: Annotated[int, typer.Option(help="Test-split images; 1..100000.")] = 500,
) -> None:
    """Write the val and test splits in the POPE, CHAIR and VLind-Bench formats (for `causalmm eval`)."""
    from dataclasses import asdict

    from ..outputs import check_results_folder
    from ..toyworld import write_splits
    from ..toyworld.worlds import get_world

    within("--val-images", val_images, 1, MAX_IMAGES)
    within("--test-images", test_images, 1, MAX_IMAGES)
    try:
        config = get_world(world).config
        sizes = {"val": val_images, "test": test_images}
        check_results_folder(
            out, "--out", main="splits.json", fmt="causalmm-toyworld-splits/", writes=("splits.json", "val", "test"),
            same=lambda old: old.get("config") == json.loads(json.dumps(asdict(config)))
            and {k: v.get("n_images") for k, v in old.get("splits", {}).items()} == sizes,
            what="another world or other split sizes",
        )  # fmt: skip
    except user_errors() as err:
        fail(str(err))
    paths = write_splits(out, config, n_images_val=val_images, n_images_test=test_images)
    print(f"wrote {paths['manifest']}; commands to run are listed in it")
