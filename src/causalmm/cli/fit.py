"""``causalmm fit``: the offline fits a method reads at decoding time (VTI's directions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import AttentionOpt, DeviceOpt, DtypeOpt, ModelOpt, console, fail, hf_kwargs, user_errors, within

__all__ = ["fit_app"]

fit_app = typer.Typer(no_args_is_help=True, help="Fit what a method reads at decoding time (VTI's directions).")


@fit_app.command("vti")
def vti(
    model: ModelOpt,
    demos: Annotated[Path, typer.Option(help="JSON lines: image, value (a caption), h_value (it, hallucinated).")],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write (give it as --param vectors=OUT).")],
    images: Annotated[Path | None, typer.Option(help="Folder of the demo images (default: the demo file's).")] = None,
    n_demos: Annotated[int, typer.Option(help="Demos drawn from the file (all if fewer); 1..100000.")] = 70,
    trials: Annotated[int, typer.Option(help="Masked copies of each demo image; 1..10000.")] = 50,
    mask_ratio: Annotated[float, typer.Option(help="Share of the image's patches masked in a trial; (0, 1).")] = 0.99,
    alpha_image: Annotated[
        float, typer.Option(help="The tower's shift while the text direction is fitted (0: none); 0..10.")
    ] = 0.9,
    vision: Annotated[
        bool, typer.Option("--vision/--no-vision", help="Fit the tower's directions too (a packed tower cannot).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the demos drawn and of the masks.")] = 42,
    batch_size: Annotated[int, typer.Option(help="Masked images per tower call; 1..1024.")] = 16,
    attention: AttentionOpt = "sdpa",
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Fit VTI's directions for a model from demos (the official recipe: 70 demos, 50 masked trials, 99% masked)."""
    from ..api import CausalMM
    from ..fit.store import save_fitted
    from ..fit.vti import fit_vti, read_demos
    from ..inputs import check_output_file
    from ..outputs import check_output_file as check_not_overwriting

    within("--n-demos", n_demos, 1, 100_000)
    within("--trials", trials, 1, 10_000)
    within("--batch-size", batch_size, 1, 1024)
    within("--alpha-image", alpha_image, 0.0, 10.0)
    if not 0 < mask_ratio < 1:
        fail(f"--mask-ratio {mask_ratio} is out of range: give a share between 0 and 1 (exclusive)")
    if out.suffix != ".safetensors":
        fail(f"--out {out} must end in .safetensors (the fit is written in that format)")
    try:
        check_output_file(out, "--out", "vti.safetensors")
        check_not_overwriting(out, "--out", [("--demos", demos), ("--images", images), ("--model", model)])
        found = read_demos(demos, images)
        cm = CausalMM.from_pretrained(model, base=attention, **hf_kwargs(device, dtype))
        fitted = fit_vti(
            cm.adapter, found, n_demos=n_demos, trials=trials, mask_ratio=mask_ratio, alpha_image=alpha_image,
            seed=seed, vision=vision, batch_size=batch_size, model_name=str(model),
            log=lambda line: console.print(line, highlight=False, markup=False),  # progress: stderr
        )  # fmt: skip
        path = save_fitted(fitted, out)
    except user_errors() as err:
        fail(str(err))
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in fitted.tensors.items())
    print(f"wrote {path} ({shapes}); decode with --method vti --param vectors={path}")
