"""VLind-Bench's native prediction format: the official inference writes each answer into ``data.json`` itself,
under ``{mid}_pred_*`` fields (:mod:`causalmm.benchmarks.vlind` says which); reading the model key and writing
the file for ``score_pipeline.py``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkError
from .vlind_prompts import infer_true_or_false

__all__ = ["NATIVE", "MODEL_KEY", "model_key", "write_data_json"]

#: (test, statement) -> key suffix of the official prediction fields (lp keys map image id -> answer)
NATIVE = {
    ("ck", 1): "a1_image",
    ("ck", 2): "a2_image",
    ("vp", 1): "b1",
    ("vp", 2): "b2",
    ("cb", 1): "c1_image",
    ("cb", 2): "c2_image",
    ("lp", 1): "d1",
    ("lp", 2): "d2",
}
MODEL_KEY = re.compile(r"^(?P<mid>.+)_pred_a1_image$")


def model_key(pred: list[tuple[str, dict[str, Any], str]], path: Path, wanted: str | None) -> str:
    """The ``{mid}`` of the ``{mid}_pred_*`` fields to read: ``wanted``, or the only one the file holds."""
    found = list(dict.fromkeys(m.group("mid") for _, inst, _ in pred for k in inst if (m := MODEL_KEY.match(k))))
    if wanted is not None:
        if wanted not in found:
            listed = ", ".join(found) or "none"
            raise BenchmarkError(f"{path}: no {wanted}_pred_* predictions (models present: {listed})")
        return wanted
    if not found:
        raise BenchmarkError(
            f"{path}: no {{model}}_pred_a1_image fields; not a VLind-Bench prediction file "
            "(the official inference writes them into data.json)"
        )
    if len(found) > 1:
        raise BenchmarkError(
            f"{path} holds predictions of several models ({', '.join(found)}); choose one with the "
            f"model_key option (e.g. model_key={found[0]!r})"
        )
    return found[0]


def write_data_json(records: Sequence[dict[str, Any]], out: Path, mid: str) -> list[Path]:
    """``data.json`` with ``{mid}_pred_*`` fields (``data_seed{S}.json`` per seed when several), for
    ``score_pipeline.py -dp FILE -mid {mid}``."""
    by_seed: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(r.get("seed"), []).append(r)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, part in by_seed.items():
        instances: dict[str, dict[str, Any]] = {}
        for r in part:
            try:
                iid, test, k, image_id = r["instance"], r["test"], r["statement"], r["image_id"]
                source = r["source"]
            except KeyError as err:
                raise BenchmarkError(f"record {r.get('id')!r} lacks the VLind-Bench field {err}") from None
            inst = instances.get(iid)
            if inst is None:
                inst = instances[iid] = dict(source)
            text = str(r.get("text") or "")
            answer = {"response": text, "answer": infer_true_or_false(text)}
            key = f"{mid}_pred_{NATIVE[(test, k)]}"
            if test == "lp":
                inst.setdefault(key, {})[str(image_id)] = answer
            else:
                inst[key] = answer
        name = "data.json" if len(by_seed) == 1 else f"data_seed{seed}.json"
        target = out / name
        target.write_text(json.dumps(list(instances.values()), indent=4, ensure_ascii=False) + "\n", "utf-8")
        paths.append(target)
    return paths
