"""Evaluation throughput on a POPE-style workload (several questions per image), with and without prefix reuse.

    python speed/eval_throughput.py                         # CPU preset (LLaVA shape, 576 image tokens)
    python speed/eval_throughput.py --preset toyworld       # the embedded toy-world model on its own POPE
    python speed/eval_throughput.py --preset llava7b        # 7B-shaped LLaVA-1.5 in bf16, CUDA only
    python speed/eval_throughput.py --preset tiny --images 2 --reps 1     # a smoke run

It writes random textured images and a POPE question file (``--questions`` consecutive questions per image,
as in the official files) to a temporary folder and runs them through the real ``causalmm eval`` path,
:func:`causalmm.benchmarks.evaluate.evaluate`, with a preloaded model (the presets of ``speed_models.py``,
random weights, so answers run to ``--max-new-tokens`` unless the model happens to emit eos). The ``toyworld``
preset is the trained embedded model on its own POPE questions (test-split scenes), so answers end at eos after
a word, as a real model's POPE answers do. For regular
decoding and CausalMM multimodal it measures questions per second of

* ``naive``: batch size 1, the engine's optimisations off (every question prefilled alone, image included,
  every branch row through every LLM layer, the LM head on every row);
* ``batched``: batch size ``--batch-size``, optimisations off (batching alone);
* ``reuse``: batch size ``--batch-size``, optimisations on (the image prefix prefilled once per image and
  image-side draw; language rows skip the LLM layers below the first intervened one; counterfactual logits on
  the plausible tokens only).

Configurations are interleaved per repetition; the ratios to ``naive`` are printed, and the predictions of
the three variants are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import PRESETS, build, resolve_device  # noqa: E402

from causalmm import CausalMM, CausalMMConfig  # noqa: E402
from causalmm.benchmarks.evaluate import RunSpec, evaluate  # noqa: E402

OBJECTS = ["dog", "cat", "car", "person", "chair", "bottle", "cup", "tree"]
METHODS = {
    "regular": CausalMMConfig(method="regular"),
    "causalmm multimodal": CausalMMConfig(mode="multimodal"),
}
VARIANTS = ("naive", "batched", "reuse")
#: the engine's optimisations, all off in ``naive`` and ``batched`` and all on in ``reuse``
OFF = {"reuse_prefix": False, "share_layers": False, "plausible_head": False, "preallocate_cache": False}


def write_workload(root: Path, n_images: int, per_image: int) -> Path:
    """Textured images (400x300, resized by the processor) and a POPE jsonl with consecutive questions per image."""
    (root / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_images):
        arr = (torch.rand(300, 400, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
        for j in range(per_image):
            obj = OBJECTS[(i + j) % len(OBJECTS)]
            rows.append(
                {
                    "question_id": len(rows) + 1,
                    "image": f"img{i}.png",
                    "text": f"Is there a {obj} in the image?",
                    "label": "yes" if j % 2 == 0 else "no",
                }
            )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_toyworld_workload(root: Path, n_images: int) -> Path:
    """The toy world's own POPE questions (random split: 3 present and 3 absent objects per image) on test-split
    scenes of the world the shipped model was trained on, so the trained model answers as it would in an eval."""
    from causalmm.toyworld.demo import trained_world
    from causalmm.toyworld.model import shipped_model_path
    from causalmm.toyworld.render import render
    from causalmm.toyworld.splits import eval_scenes, pope_questions

    world = trained_world(shipped_model_path())
    (root / "images").mkdir(parents=True)
    scenes = eval_scenes(world, "test", n_images)
    names = [f"test_{i:05d}.png" for i in range(n_images)]
    for scene, name in zip(scenes, names, strict=True):
        render(world, scene).save(root / "images" / name)
    rows = pope_questions(world, "test", scenes, names)["random"]
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_once(
    cm: CausalMM, config: CausalMMConfig, data: Path, out: Path, batch_size: int, max_new_tokens: int
) -> tuple[float, list[str]]:
    """Seconds for one full evaluation into a fresh ``out``, and the predicted texts in order."""
    t0 = time.perf_counter()
    spec = RunSpec("pope", "random-weights", data, data.parent / "images", config, {"max_new_tokens": max_new_tokens})
    evaluate(spec, out=out, batch_size=batch_size, progress=False, n_boot=0, causalmm=cm)
    seconds = time.perf_counter() - t0
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return seconds, [json.loads(x)["text"] for x in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument(
        "--questions", type=int, default=None, help="questions per image (default and POPE: 6; toyworld: its own 6)"
    )
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="POPE's default limit is 16")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda for llava7b, else cpu")
    args = parser.parse_args(argv)
    if args.preset == "toyworld" and args.questions not in (None, 6):
        parser.error("--preset toyworld asks its split's own 6 POPE questions per image; leave --questions out")
    questions = 6 if args.questions is None else args.questions
    resolved = resolve_device(args.preset, args.device)
    if resolved is None:
        return 2
    device, dtype = resolved
    torch.set_grad_enabled(False)
    base = build(args.preset, device, dtype)[0]
    models = {
        "naive": base.with_config(base.config, **OFF),
        "batched": base.with_config(base.config, **OFF),
        "reuse": base.with_config(base.config, **{k: True for k in OFF}),
    }
    batch = {"naive": 1, "batched": args.batch_size, "reuse": args.batch_size}
    times: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "toyworld":
            data = write_toyworld_workload(Path(tmp) / "pope", args.images)
        else:
            data = write_workload(Path(tmp) / "pope", args.images, questions)
        n_questions = len(data.read_text(encoding="utf-8").splitlines())
        per_image = n_questions // args.images
        first = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()[:2]]
        warm = Image.open(data.parent / "images" / first[0]["image"])
        models["reuse"].generate([warm, warm], [q["text"] for q in first], max_new_tokens=2)
        for rep in range(args.reps):
            for method, config in METHODS.items():
                for variant in VARIANTS:
                    out = Path(tmp) / f"run-{rep}-{method.replace(' ', '_')}-{variant}"
                    secs, preds = run_once(models[variant], config, data, out, batch[variant], args.max_new_tokens)
                    times.setdefault((method, variant), []).append(secs)
                    texts[(method, variant)] = preds
                    print(
                        f"rep {rep + 1}/{args.reps} {method} {variant}: {n_questions / secs:.2f} questions/s",
                        file=sys.stderr,
                    )
    n_params = sum(p.numel() for p in base.model.parameters())
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores visible)"
    print(f"\n## eval throughput — preset {args.preset} ({n_params / 1e6:.3g}M params, {dtype}), {where}")
    print(
        f"POPE-style: {args.images} images x {per_image} questions, max {args.max_new_tokens} new tokens, "
        f"batch size {args.batch_size}, {args.reps} interleaved repetition(s), torch {torch.__version__}\n"
    )
    print("| method | variant | batch | optimisations | questions/s (median) | × naive | predictions = naive |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        ref = statistics.median(times[(method, "naive")])
        for variant in VARIANTS:
            med = statistics.median(times[(method, variant)])
            same = texts[(method, variant)] == texts[(method, "naive")]
            print(
                f"| {method} | {variant} | {batch[variant]} | {'on' if variant == 'reuse' else 'off'} | "
                f"{n_questions / med:.2f} | {ref / med:.2f} | {'yes' if same else 'NO'} |"
            )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
