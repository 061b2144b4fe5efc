"""``evaluate``: load a benchmark, run a model on what is not done yet, score, write the run folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import CausalMMConfig
from ..seeds import file_digest
from . import check_data_path, get_benchmark
from .base import Benchmark, BenchmarkError, Sample, check_images
from .records import check_done, data_digest, load_done, pending
from .run_folder import check_out_folder, check_run_info, lock_run_folder, write_run_info
from .runner import IMAGE_SEEDS, finalize, limit_samples, run_samples

__all__ = [
    "RunPlan",
    "RunSpec",
    "Subset",
    "check_folder",
    "check_prompts",
    "evaluate",
    "load_model",
    "load_run_samples",
    "plan_run",
    "preflight",
    "processes",
    "sample_image",
    "verify_images",
]


@dataclass(frozen=True)
class Subset:
    """The part of a benchmark's data a run answers: the samples about these images (content digests), such as
    the dev or the test split of a tune (:mod:`causalmm.tuning`). ``name`` says which part, in ``run.json``."""

    name: str
    images: frozenset[str]

    def describe(self) -> dict[str, Any]:
        """What ``run.json`` records: the part's name, its size and a digest of its images."""
        return {
            "name": self.name,
            "n_images": len(self.images),
            "images_digest": file_digest("\n".join(sorted(self.images)).encode()),
        }


@dataclass
class RunSpec:
    """What a run is, as the user describes it: the one object the CLI hands to the runner.

    Attributes:
        benchmark: ``pope``, ``mme``, ``chair`` or ``vlind``.
        model: a hub id or local directory.
        data: the benchmark's question file or folder (or a parquet export).
        images: the benchmark's image folder, where its data does not say.
        config: the decoding method and its settings.
        generation: generation options (``max_new_tokens`` defaults to the benchmark's own).
        seeds: run seeds; each sample's seeds derive from them (:mod:`causalmm.seeds`).
        limit: only the first ``limit`` samples (whole MME image pairs).
        options: the benchmark's own options (``parse``, ``suffix``, ``annotations``, ...).
        subset: only the samples about these images (a tune's dev or test split); ``None``: all.
    """

    benchmark: str
    model: str
    data: str | Path
    images: str | Path | None = None
    config: CausalMMConfig = field(default_factory=CausalMMConfig)
    generation: dict[str, Any] = field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    subset: Subset | None = None


@dataclass
class RunPlan:
    """Everything a run is, known before any model is loaded.

    Attributes:
        bench: the configured benchmark.
        samples: its samples after ``--limit``, every image checked readable.
        info: what ``run.json`` records (identity, data digest, versions).
        digests: sample id -> digest of its image (image seeds and the run's data identity).
        inputs: the paths the run reads (data, images, annotations), which ``--out`` must keep clear of.
    """

    bench: Benchmark
    samples: list[Sample]
    info: dict[str, Any]
    digests: dict[str, str]
    inputs: list[str | Path | None] = field(default_factory=list)

    def image_files(self) -> list[str | Path]:
        """The samples' image files (not bytes)."""
        return [s.image for s in self.samples if isinstance(s.image, (str, Path))]


def sample_image(sample: Sample):
    """The RGB PIL image of a sample (a path, or encoded bytes from a parquet layout), read by
    :func:`causalmm.images.load_image` either way, as :func:`verify_images` checked it."""
    from ..images import load_image
    from ..inputs import InputError

    if sample.image is None:
        raise BenchmarkError(f"sample {sample.id} has no image; the engine needs one image per prompt")
    try:
        return load_image(sample.image)
    except InputError as err:
        raise BenchmarkError(f"sample {sample.id}: {err}") from err


def load_run_samples(bench: Benchmark, data: str | Path, images: str | Path | None, limit: int | None) -> list[Sample]:
    """The samples of a run: loaded, checked, limited (keeping whole units)."""
    check_data_path(data)
    if images is not None and not Path(images).exists():
        raise BenchmarkError(
            f"the image folder {images} is missing (no such file or folder); pass --images DIR with the "
            "benchmark's image folder"
        )
    samples = bench.load(Path(data) if not isinstance(data, Path) else data, Path(images) if images else None)
    if not samples:
        raise BenchmarkError(f"{data}: no samples")
    samples = limit_samples(bench, samples, limit)
    check_images(samples, Path(images) if images else None, Path(data))
    return samples


def verify_images(samples: Sequence[Sample]) -> dict[str, str]:
    """Decode every sample's image once, before any model is loaded; returns sample id -> image digest.

    A corrupt or truncated image would otherwise stop the run when its batch comes up, possibly hours in.
    Each distinct image (file, or bytes of a parquet export) is read once, digested (for its image seed and
    the run's data identity) and decoded by :func:`causalmm.images.load_image`, as generation will decode it, so
    whatever it refuses (a truncated file, an unsupported mode, an image over the pixel limit) is refused here.
    Raises one BenchmarkError naming how many images are bad and the first few, with the reason.
    """
    from ..images import load_image
    from ..inputs import InputError

    digests: dict[str, str] = {}
    by_path: dict[str, str] = {}
    decoded: set[str] = set()
    bad: list[str] = []
    for s in samples:
        if s.image is None:
            bad.append(f"sample {s.id} (no image)")
            continue
        if isinstance(s.image, (str, Path)):
            name = str(s.image)
            if name in by_path:
                digests[s.id] = by_path[name]
                continue
            try:
                data = Path(name).read_bytes()
            except OSError as err:
                by_path[name] = digests[s.id] = "unreadable"
                bad.append(f"{name} ({err.strerror or err})")
                continue
        else:
            name, data = f"the image bytes of sample {s.id}", s.image
        digest = file_digest(data)
        digests[s.id] = digest
        if isinstance(s.image, (str, Path)):
            by_path[name] = digest
        if digest in decoded:
            continue
        decoded.add(digest)
        try:
            load_image(data)
        except (InputError, OSError) as err:
            bad.append(f"{name} ({err})")
    if bad:
        raise BenchmarkError(
            f"{len(bad)} image(s) cannot be read as images, e.g. {'; '.join(bad[:3])}; replace them or remove "
            "their questions from --data (checked before loading the model)"
        )
    return digests


def plan_run(spec: RunSpec) -> RunPlan:
    """Everything a run is, checked before any model is loaded: the benchmark, its samples, ``run.json``."""
    options = spec.options or {}
    bench = get_benchmark(spec.benchmark, **options)
    generation = {"max_new_tokens": bench.max_new_tokens, **(spec.generation or {})}
    seeds = [int(s) for s in spec.seeds]
    if not seeds:
        raise BenchmarkError("give at least one seed")
    data, images = spec.data, spec.images
    samples = load_run_samples(bench, data, images, spec.limit)
    digests = verify_images(samples)
    if spec.subset is not None:
        samples = [s for s in samples if digests[s.id] in spec.subset.images]
        if not samples:
            raise BenchmarkError(
                f"{data}: no sample is about an image of the {spec.subset.name} split; pass the data file the split "
                "was drawn from"
            )
        digests = {s.id: digests[s.id] for s in samples}
    info = {
        "benchmark": bench.name,
        "options": bench.describe(),
        "model": str(spec.model),
        "config": (spec.config or CausalMMConfig()).to_dict(),
        "generation": generation,
        "data": str(data),
        "images": str(images) if images else None,
        "data_digest": data_digest(samples, digests),
        "n_samples": len(samples),
        "seeds": seeds,
        "limit": spec.limit,
        "image_seeds": IMAGE_SEEDS,
        "causalmm_version": __version__,
    }
    if spec.subset is not None:  # absent otherwise, so the run folders of whole benchmarks read as before
        info["subset"] = spec.subset.describe()
    inputs = [data, images, options.get("annotations")]
    return RunPlan(bench, samples, info, digests, inputs)


def preflight(spec: RunSpec, out: str | Path) -> RunPlan:
    """Every check :func:`evaluate` makes before writing, without writing: data, images, ``--out`` and a
    resumption's agreement with the folder. ``causalmm eval --num-processes`` runs it before it locks and
    launches anything, so bad input fails with one line, not once per process, and leaves nothing behind."""
    run = plan_run(spec)
    check_folder(run, Path(out))
    return run


def check_folder(run: RunPlan, out: Path) -> None:
    """``out`` suits ``run``: clear of its inputs, a run folder of the same run (or new), and its finished
    records made from the same prompts and images. Read-only; repeat it once the folder is locked."""
    check_out_folder(out, run.inputs, run.image_files())
    check_run_info(out, run.info)
    if out.is_dir():
        done = load_done(out)
        pending(run.samples, run.info["seeds"], done, out)
        check_done(run.samples, done, out, run.digests)


def evaluate(
    spec: RunSpec,
    *,
    out: str | Path,
    batch_size: int = 1,
    base: str = "sdpa",
    hf_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    n_boot: int = 1000,
    causalmm: Any = None,
) -> dict[str, Any]:
    """Run ``spec`` into ``out``; resumes what is there. Returns the metrics summary.

    ``causalmm`` may be an already-loaded :class:`causalmm.CausalMM` (its config is replaced by the spec's);
    otherwise the model is loaded only if something is left to generate. The run folder is locked for the
    whole run (see :mod:`.runner`): under several processes the main one holds the lock, unless the
    launcher already does, and the others wait at a barrier until it has it.
    """
    run = plan_run(spec)
    bench, samples, info = run.bench, run.samples, run.info
    generation, seeds, out = info["generation"], info["seeds"], Path(out)
    check_out_folder(out, run.inputs, run.image_files())
    rank, world, barrier = processes()
    created = not out.exists()
    try:
        with lock_run_folder(out) if rank == 0 else nullcontext():
            barrier()  # nobody reads the folder before the main process holds its lock
            merged = check_run_info(out, info)  # every process refuses a mismatched run before anyone writes
            done = load_done(out)  # every process reads the same finished set before anyone appends
            check_done(samples, done, out, run.digests)
            todo = pending(samples, seeds, done, out)
            cm = None
            if todo:
                config = spec.config or CausalMMConfig()
                cm = _model(causalmm, spec.model, config, base, _process_hf_kwargs(hf_kwargs, world))
                # every process checks every pending prompt, so all refuse alike and none waits at a barrier
                check_prompts(cm, [s for _, s in todo], generation["max_new_tokens"])
            barrier()
            if rank == 0:  # only now, with every check passed, does the folder get its run.json
                write_run_info(out, merged)
            barrier()
            if todo[rank::world]:

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
                    return [
                        {"text": r.text, "finish_reason": r.finish_reason, "n_tokens": len(r.token_ids)}
                        for r in results
                    ]

                run_samples(
                    bench, samples, out, generate, seeds=seeds, batch_size=batch_size, progress=progress,
                    rank=rank, world=world, done=done, digests=run.digests,
                )  # fmt: skip
            barrier()
            if rank == 0:
                summary = finalize(bench, samples, out, seeds=seeds, info=info, n_boot=n_boot, digests=run.digests)
            barrier()
    except BaseException:
        if rank == 0 and created:
            _remove_if_unused(out)  # a run refused before it wrote anything leaves no folder behind
        raise
    if rank != 0:
        summary = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return summary


def check_prompts(cm: Any, samples: Sequence[Sample], max_new_tokens: int) -> None:
    """Encode every sample once as generation will (its method's prompt variants too) and refuse, by id and
    place in the data, those whose prompt leaves no room for ``max_new_tokens`` or whose image the processor
    refuses: before ``run.json`` or any prediction is written, never hours into the run."""
    from ..inputs import InputError

    bad: list[str] = []
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:  # a sample under several run seeds is one prompt
            continue
        seen.add(s.id)
        try:
            cm.check_prompt(sample_image(s), s.prompt, max_new_tokens)
        except InputError as err:
            bad.append(f"sample {s.id}{f' ({s.where})' if s.where else ''}: {err}")
    if bad:
        raise BenchmarkError(
            f"{len(bad)} sample(s) cannot be answered by this model as asked (checked before writing anything), "
            f"e.g. {'; '.join(bad[:2])}"
        )


def _remove_if_unused(out: Path) -> None:
    """Take back a run folder this call created, when it was refused before writing anything of its own."""
    from .run_folder import LOCK_NAME

    if not out.is_dir():
        return
    leftovers = {p.name for p in out.iterdir()}
    if leftovers <= {LOCK_NAME}:
        (out / LOCK_NAME).unlink(missing_ok=True)
        out.rmdir()


def processes() -> tuple[int, int, Any]:
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


def load_model(model: str, config: CausalMMConfig, base: str = "sdpa", hf_kwargs: Any = None) -> Any:
    """This process's :class:`causalmm.CausalMM` for ``model``, placed as :func:`evaluate` places it (one replica
    per process under ``accelerate launch``): loaded once by a caller that runs many runs (``causalmm tune``)."""
    return _model(None, str(model), config, base, _process_hf_kwargs(dict(hf_kwargs or {}), processes()[1]))
