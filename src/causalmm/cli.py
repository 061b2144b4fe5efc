"""The ``causalmm`` command line: a thin layer over the public API.

User errors (bad flags, missing image, unknown model) print one line ``error: ...`` and exit with code 2;
nothing below the API is shown to the user as a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="CausalMM: counterfactual-attention decoding that makes vision-language models hallucinate less.",
)
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors():
    from .adapters import UnsupportedModelError
    from .api import InputError
    from .config import ConfigError

    return (InputError, ConfigError, UnsupportedModelError)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Hub id or local directory of a vision-language model.")],
    image: Annotated[Path, typer.Option(help="Path of the image.")],
    prompt: Annotated[str, typer.Option(help="Question or instruction; wrapped in the model's chat template.")],
    method: Annotated[str, typer.Option(help="regular | causalmm | vcd")] = "causalmm",
    mode: Annotated[str, typer.Option(help="vision | language | multimodal | joint")] = "multimodal",
    vision_cf: Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")] = "random",
    language_cf: Annotated[str, typer.Option(help="random | uniform | reversed | reversed_raw | shuffle")] = "random",
    vision_layers: Annotated[str | None, typer.Option(help="e.g. '22', '0-3', 'all', 'deep'.")] = None,
    language_layers: Annotated[str | None, typer.Option(help="e.g. 'middle', '8-15', 'all'.")] = None,
    gamma: Annotated[float, typer.Option(help="Contrast strength (0 = regular decoding).")] = 1.0,
    epsilon: Annotated[float, typer.Option(help="Plausibility cut-off on factual probabilities, [0, 1].")] = 0.1,
    samples: Annotated[int, typer.Option(help="Counterfactual draws per branch (K), logits averaged.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the counterfactual draws and of sampling.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling.")] = None,
    legacy: Annotated[
        bool, typer.Option("--legacy", help="Original release: contrast on the first token only.")
    ] = False,
    vision_style: Annotated[str, typer.Option(help="attention | gate (the original feature gate)")] = "attention",
    attention: Annotated[str, typer.Option(help="Base attention for non-intervened calls: sdpa | eager")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, or 'auto' (device_map).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Answer one prompt about one image with the chosen decoding method."""
    from .api import CausalMM, load_image
    from .config import CausalMMConfig

    try:
        config = CausalMMConfig(
            method=method,
            mode=mode,
            vision_cf=vision_cf,
            language_cf=language_cf,
            vision_layers=vision_layers,
            language_layers=language_layers,
            gamma=gamma,
            epsilon=epsilon,
            num_cf_samples=samples,
            seed=seed,
            legacy=legacy,
            vision_style=vision_style,
        )
        if not prompt.strip():
            _fail("--prompt is empty; give a question or instruction about the image")
        pil = load_image(image)
        cm = CausalMM.from_pretrained(model, config, base=attention, **_hf_kwargs(device, dtype))
        result = cm.generate(
            pil,
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
    except _user_errors() as err:
        _fail(str(err))
    if as_json:
        payload = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "method": method,
            "config": config.to_dict(),
            "model": model,
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(result.text + "\n")


def _hf_kwargs(device: str | None, dtype: str) -> dict:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if dtype not in dtypes:
        _fail(f"--dtype {dtype!r} is not valid; choose one of {', '.join(dtypes)}")
    kwargs: dict = {"dtype": dtypes[dtype]}
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device:
        kwargs["device_map"] = device
    return kwargs


@app.command()
def demo(
    family: Annotated[
        str, typer.Option(help="Tiny model family: llava | llava_next | qwen2_vl | qwen2_5_vl")
    ] = "llava",
    out: Annotated[Path, typer.Option(help="Where the tiny model is built.")] = Path("runs/demo-model"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 8,
) -> None:
    """Run every method on a tiny random-weight model and show what each branch did.

    The weights are random: this shows the machinery (branches, contrast, per-branch effect), not quality.
    """
    from PIL import Image

    from .api import CausalMM
    from .config import CausalMMConfig
    from .tiny import FAMILIES, build_tiny_model

    if family not in FAMILIES:
        _fail(f"--family {family!r} is not valid; choose one of {', '.join(FAMILIES)}")
    path = build_tiny_model(family, out / family)
    image = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    prompt = "Is there a red cat in the image? Answer yes or no."
    base = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"))
    rows = [("regular", CausalMMConfig(method="regular")), ("vcd", CausalMMConfig(method="vcd"))]
    rows += [
        (f"causalmm/{m}", CausalMMConfig(mode=m, language_layers="all"))
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


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own one-line errors
    app()


if __name__ == "__main__":
    main()
