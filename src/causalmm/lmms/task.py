"""A local lmms-eval POPE task from POPE question files: the questions as a parquet file in the ``lmms-lab/POPE``
layout (the images' encoded bytes inside) and a task YAML beside it, for ``lmms-eval --include_path FOLDER``.

For offline runs (the tests run the toy world's questions through lmms-eval this way) and for POPE files that are
not on the Hub. The YAML reuses lmms-eval's POPE functions (prompt, image, scorer), with the prompt suffix
``causalmm eval pope`` uses, so both see the same prompt; the parquet is also a ``--data`` for ``causalmm eval``.
"""

from __future__ import annotations

from pathlib import Path

from ..benchmarks.base import read_json_records
from ..benchmarks.pope import DEFAULT_SUFFIX

__all__ = ["write_pope_task"]

_METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")


def _yaml(task: str, parquet: str, max_new_tokens: int, suffix: str) -> str:
    utils = "lmms_eval.tasks.pope.utils"
    metrics = "".join(
        f"  - metric: pope_{m}\n    aggregation: !function {utils}.pope_aggregate_{m}\n    higher_is_better: true\n"
        for m in _METRICS
    )
    return (
        f"task: {task}\n"
        "dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {utils}.pope_doc_to_visual\n"
        f"doc_to_text: !function {utils}.pope_doc_to_text\n"
        'doc_to_target: "answer"\n'
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n  temperature: 0\n  top_p: 0\n  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function {utils}.pope_process_results\n"
        f"metric_list:\n{metrics}"
        "lmms_eval_specific_kwargs:\n"
        f'  default:\n    pre_prompt: ""\n    post_prompt: "{suffix}"\n'
        "metadata:\n  - version: 0.0\n"
    )


def write_pope_task(
    out: str | Path,
    questions: str | Path,
    images: str | Path,
    *,
    task: str = "pope_local",
    category: str = "local",
    limit: int | None = None,
    max_new_tokens: int = 16,
    suffix: str = DEFAULT_SUFFIX,
) -> tuple[Path, Path]:
    """Write ``{task}.parquet`` and ``{task}.yaml`` into ``out`` from an official POPE question file (``{question_id,
    image, text, label}`` lines) and its image folder; returns both paths.

    The parquet holds ``id, question_id, question, answer, image_source, image, category`` like ``lmms-lab/POPE``,
    ``image`` being each image file's bytes as they are (so ``causalmm eval`` and the plugin seed it alike).
    """
    import datasets

    out, images = Path(out), Path(images)
    out.mkdir(parents=True, exist_ok=True)
    items = [item for _, item in read_json_records(Path(questions), what="POPE question")][:limit]
    rows: dict[str, list] = {k: [] for k in ("id", "question_id", "question", "answer", "image_source", "image",
                                              "category")}  # fmt: skip
    for i, item in enumerate(items):
        rows["id"].append(str(i))
        rows["question_id"].append(str(item["question_id"]))
        rows["question"].append(str(item["text"]))
        rows["answer"].append(str(item["label"]))
        rows["image_source"].append(Path(item["image"]).stem)
        rows["image"].append({"bytes": (images / item["image"]).read_bytes(), "path": None})
        rows["category"].append(category)
    features = datasets.Features({k: datasets.Value("string") for k in rows if k != "image"})
    features["image"] = datasets.Image()
    parquet = out / f"{task}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    yaml = out / f"{task}.yaml"
    yaml.write_text(_yaml(task, parquet.name, max_new_tokens, suffix.replace('"', '\\"')), encoding="utf-8")
    return parquet, yaml
