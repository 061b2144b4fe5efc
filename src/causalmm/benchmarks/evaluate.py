"""``evaluate``: load a benchmark, run a model on what is not done yet, score, write the run folder."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import CausalMMConfig
from . import get_benchmark
from .base import Benchmark, BenchmarkError, Sample, check_images
from .runner import (
    IMAGE_SEEDS,
    check_run_info,
    finalize,
    limit_samples,
    load_done,
    pending,
    run_samples,
    write_run_info,
)
from .stats import bootstrap_ci

__all__ = ["evaluate", "load_run_samples", "plan_run", "sample_image", "score_predictions"]


def sample_image(sample: Sample):
    """The PIL image of a sample (a path, or encoded bytes from a parquet layout)."""
    from PIL import Image, UnidentifiedImageError

    from ..api import load_image

    if isinstance(sample.image, bytes):
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise BenchmarkError(f"sample {sample.id}: its image bytes are not an image PIL can read") from err
    if sample.image is None:
        raise BenchmarkError(f"sample {sample.id} has no image; the engine needs one image per prompt")
    return load_image(sample.image)


def load_run_samples(bench: Benchmark, data: str | Path, images: str | Path | None, limit: int | None) -> list[Sample]:
    """The samples of a run: loaded, checked, limited (keeping whole units)."""
    samples = bench.load(Path(data) if not isinstance(data, Path) else data, Path(images) if images else None)
    if not samples:
        raise BenchmarkError(f"{data}: no samples")
    samples = limit_samples(bench, samples, limit)
    check_images(samples, Path(images) if images else None, Path(data))
    return samples


def plan_run(
    benchmark: str,
    *,
    model: str,
    data: str | Path,
    images: str | Path | None = None,
    config: CausalMMConfig | None = None,
    generation: dict[str, Any] | None = None,
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Benchmark, list[Sample], dict[str, Any]]:
    """Everything a run is, checked before any model is loaded: the benchmark, its samples, ``run.json``."""
    config = config or CausalMMConfig()
    bench = get_benchmark(benchmark, **(options or {}))
    generation = {"max_new_tokens": bench.max_new_tokens, **(generation or {})}
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise BenchmarkError("give at least one seed")
    samples = load_run_samples(bench, data, images, limit)
    info = {
        "benchmark": bench.name,
        "options": bench.describe(),
        "model": str(model),
        "config": config.to_dict(),
        "generation": generation,
        "data": str(data),
        "images": str(images) if images else None,
        "seeds": seeds,
        "limit": limit,
        "image_seeds": IMAGE_SEEDS,
        "causalmm_version": __version__,
    }
    return bench, samples, info


def evaluate(
    benchmark: str,
    *,
    model: str,
    data: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    config: CausalMMConfig | None = None,
    generation: dict[str, Any] | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 1,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    base: str = "sdpa",
    hf_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    n_boot: int = 1000,
    causalmm: Any = None,
) -> dict[str, Any]:
    """Run ``benchmark`` with ``model`` into ``out``; resumes what is there. Returns the metrics summary.

    ``causalmm`` may be an already-loaded :class:`causalmm.CausalMM` (its config is replaced by ``config``);
    otherwise the model is loaded only if something is left to generate.
    """
    config = config or CausalMMConfig()
    bench, samples, info = plan_run(
        benchmark,
        model=model,
        data=data,
        images=images,
        config=config,
        generation=generation,
        seeds=seeds,
        limit=limit,
        options=options,
    )
    generation, seeds, out = info["generation"], info["seeds"], Path(out)
    rank, world, barrier = _processes()
    merged = check_run_info(out, info)  # every process refuses a mismatched run before anyone writes
    barrier()
    if rank == 0:
        write_run_info(out, merged)
    done = load_done(out)  # every process reads the same finished set before anyone appends
    barrier()
    if pending(samples, seeds, done, out)[rank::world]:
        cm = _model(causalmm, model, config, base, _process_hf_kwargs(hf_kwargs, world))

        def generate(
            batch: Sequence[Sample], sample_seeds: Sequence[int], image_seeds: Sequence[int]
        ) -> list[dict[str, Any]]:
            results = cm.generate(
                [sample_image(s) for s in batch],
                [s.prompt for s in batch],
                seeds=list(sample_seeds),
                image_seeds=list(image_seeds),
                **generation,
            )
            return [{"text": r.text, "finish_reason": r.finish_reason, "n_tokens": len(r.token_ids)} for r in results]

        run_samples(
            bench,
            samples,
            out,
            generate,
            seeds=seeds,
            batch_size=batch_size,
            progress=progress,
            rank=rank,
            world=world,
            done=done,
        )
    barrier()
    if rank == 0:
        summary = finalize(bench, samples, out, seeds=seeds, info=info, n_boot=n_boot)
    barrier()
    if rank != 0:
        summary = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return summary


def _processes() -> tuple[int, int, Any]:
    """(rank, world size, barrier) under ``accelerate launch`` / ``torchrun``; (0, 1, no-op) otherwise."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


def _process_hf_kwargs(hf_kwargs: dict[str, Any] | None, world: int) -> dict[str, Any]:
    """Place each process's model replica: its own GPU, or (``device_map="auto"``) its own slice of the GPUs."""
    kwargs = dict(hf_kwargs or {})
    if world == 1:
        return kwargs
    import os

    import torch

    if not torch.cuda.is_available():
        kwargs.pop("device_map", None)
        return kwargs
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if kwargs.get("device_map") == "auto":
        per = max(1, torch.cuda.device_count() // local_world)
        mine = range(local_rank * per, (local_rank + 1) * per)
        kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in mine}
    else:
        kwargs["device_map"] = f"cuda:{local_rank}"
    return kwargs


def _model(causalmm: Any, model: str, config: CausalMMConfig, base: str, hf_kwargs: dict[str, Any] | None):
    if causalmm is not None:
        return causalmm.with_config(config)
    from ..api import CausalMM

    return CausalMM.from_pretrained(model, config, base=base, **(hf_kwargs or {}))


def score_predictions(
    benchmark: str,
    predictions: str | Path,
    *,
    data: str | Path | None = None,
    annotations: str | Path | None = None,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Metrics of predictions made elsewhere, read in the benchmark's own format, by the runners' metric code."""
    bench = get_benchmark(benchmark, **(options or {}))
    path = Path(predictions)
    if not path.exists():
        raise BenchmarkError(f"predictions not found: {path}")
    records = bench.read_predictions(path, Path(data) if data else None, Path(annotations) if annotations else None)
    if not records:
        raise BenchmarkError(f"{path}: no predictions")
    records = [{"seed": 0, **r} for r in records]
    records = [{**r, **bench.parse(r)} for r in records]
    summary: dict[str, Any] = {
        "benchmark": bench.name,
        "options": bench.describe(),
        "predictions": str(path),
        "data": str(data) if data else None,
        "n_records": len(records),
        "metrics": bench.metrics(records),
    }
    if n_boot:
        summary["ci95"] = {k: list(v) for k, v in bootstrap_ci(bench, records, n_boot=n_boot).items()}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary
