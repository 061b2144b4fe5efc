"""The toy world's evaluation splits, written in the real benchmarks' formats (the training stream is
:mod:`.stream`).

Evaluation (:func:`write_splits`), for each of ``val`` (choose hyper-parameters) and ``test`` (report):

* ``images/``: the POPE/CHAIR images, ``{image_id:012d}.png`` (val ids from 300001, test from 400001).
* ``pope_{random,popular,adversarial}.jsonl``: POPE's construction (``utils.py`` of AoiDragon/POPE): per image
  3 present objects (images have at least 3 object types), each followed by one absent object: 6 questions,
  50% yes. Negatives: *random* uniform over the absent objects not asked yet; *popular* the most frequent
  objects of the training images; *adversarial* for each positive, the absent object that appears with it most
  often in the training images. Statistics come from the training images (POPE counts its own images; here
  the model's training data is known). The three files share images and positives (a random draw, where
  POPE takes the first annotated objects). Each line has ``question_id, image, text, label`` plus ``object``,
  ``favoured`` (a language-prior-favoured object) and ``partner`` (the co-occurrence partner of an object in
  the image) for analysis; the POPE loader ignores extra fields.
* ``pope_all.jsonl``: every object asked about every image (not balanced: the per-object false-yes table).
* ``chair_images.txt`` and ``annotations/{instances,captions}_val2014.json``: CHAIR's image list and COCO-style
  ground truth (one instance annotation per glyph, the reference caption); the file names are the ones
  CHAIR's loader looks for, whatever the split.
* ``vlind/data.json`` and ``vlind/images/``: VLind-Bench instances, each a factual image that follows a prior
  and counterfactual images that break it: the language prior (the favoured object absent), the
  co-occurrence prior (the anchor without its partner) and the colour prior (the object in another colour).

``splits.json`` (the manifest) records the config, the training statistics the negatives came from, every
file and per-file statistics (e.g. how many negatives are favoured objects, partners, others).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..benchmarks.coco_objects import OBJECT_OF_WORD, caption_objects
from .render import render
from .scenes import Scene, sample_scene
from .statistics import ask_probabilities, train_statistics
from .texts import (
    article,
    caption,
    colour_context,
    colour_statement,
    exist_context,
    exist_question,
    exist_statement,
    partner_context,
    plural,
    vocabulary,
)
from .world import WorldConfig, make_rng

__all__ = [
    "chair_categories",
    "eval_scenes",
    "pope_questions",
    "vlind_instances",
    "write_splits",
]

POPE_VARIANTS = ("random", "popular", "adversarial")
_IMAGE_ID_BASE = {"val": 300000, "test": 400000}
_POPE_PURPOSE, _VLIND_PURPOSE = 10, 20
#: VLind votes given to every counterfactual image (the benchmark keeps images with >= 2 votes)
_VOTES = 3


# -- POPE ----------------------------------------------------------------------------------------------
def eval_scenes(config: WorldConfig, split: str, n: int) -> list[Scene]:
    """The ``n`` POPE/CHAIR scenes of ``split`` (val or test): evaluation priors, >= ``pope_positives`` types."""
    return [sample_scene(config, split, i, evaluation=True, min_types=config.pope_positives) for i in range(n)]


def _group(config: WorldConfig, name: str, present: frozenset[str]) -> str:
    if name in config.favoured:
        return "favoured"
    return "partner" if name in config.partners(present) else "other"


def pope_questions(config: WorldConfig, split: str, scenes: list[Scene], images: list[str]) -> dict[str, list[dict]]:
    """POPE question lists (random, popular, adversarial, all) for ``scenes`` whose files are ``images``."""
    stats = train_statistics(config)
    popular = stats.popular()
    k = config.pope_positives
    out: dict[str, list[dict]] = {v: [] for v in (*POPE_VARIANTS, "all")}
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        rng = make_rng(config, split, i, _POPE_PURPOSE)
        present = [o for o in config.objects if o in scene.objects]
        absent = [o for o in config.objects if o not in scene.objects]
        positives = [present[j] for j in rng.choice(len(present), size=k, replace=False)]
        by_popularity = [o for o in popular if o not in scene.objects]
        adversarial: list[str] = []
        for pos in positives:  # POPE: for each positive, the absent object seen most often with it
            adversarial.append(stats.cooccurring(pos, [o for o in by_popularity if o not in adversarial])[0])
        negatives = {
            "random": [absent[j] for j in rng.choice(len(absent), size=k, replace=False)],
            "popular": by_popularity[:k],
            "adversarial": adversarial,
        }
        for variant, negs in negatives.items():
            for pos, neg in zip(positives, negs, strict=True):
                out[variant] += [_pope_line(config, scene, image, pos), _pope_line(config, scene, image, neg)]
        out["all"] += [_pope_line(config, scene, image, o) for o in config.objects]
    return {v: [{"question_id": q, **x} for q, x in enumerate(lines, 1)] for v, lines in out.items()}


def _pope_line(config: WorldConfig, scene: Scene, image: str, name: str) -> dict[str, Any]:
    present = scene.present
    return {
        "image": image,
        "text": exist_question(name),
        "label": "yes" if name in present else "no",
        "object": name,
        "favoured": name in config.favoured,
        "partner": name in config.partners(present),
    }


def _pope_stats(config: WorldConfig, lines: list[dict], scenes: dict[str, Scene]) -> dict[str, Any]:
    negatives = [x for x in lines if x["label"] == "no"]
    groups = Counter(_group(config, x["object"], scenes[x["image"]].present) for x in negatives)
    return {
        "n_images": len({x["image"] for x in lines}),
        "n_questions": len(lines),
        "yes_fraction": sum(x["label"] == "yes" for x in lines) / len(lines),
        "negatives": {g: groups.get(g, 0) for g in ("favoured", "partner", "other")},
        "negative_objects": dict(sorted(Counter(x["object"] for x in negatives).items())),
    }


# -- CHAIR ---------------------------------------------------------------------------------------------
def chair_categories(config: WorldConfig) -> tuple[dict[str, str], str | None]:
    """(object -> COCO category, None), or ({}, why not) when CHAIR's COCO reading cannot score this world.

    CHAIR reads captions through its fixed COCO synonym table: every object must be a word of it (singular
    and plural), and no other word the world says may be one.
    """
    cats: dict[str, str] = {}
    for name in config.objects:
        cat = OBJECT_OF_WORD.get(name)
        if cat is None:
            return {}, f"object {name!r} is not a word of CHAIR's COCO synonym table"
        for text in (f"{article(name)} red {name}.", f"two red {plural(name)}."):
            if caption_objects(text).objects != [cat]:
                return {}, f"CHAIR does not read {text!r} as one {cat}"
        cats[name] = cat
    stray = [w for w in vocabulary(config) if w in OBJECT_OF_WORD and w not in cats and w not in map(plural, cats)]
    if stray:
        return {}, f"the world's words {stray} are COCO objects to CHAIR"
    if len(set(cats.values())) != len(cats):
        return {}, "two objects map to the same COCO category"
    return cats, None


def _write_chair(config: WorldConfig, folder: Path, scenes: list[Scene], ids: list[int], names: list[str]) -> None:
    cats, _ = chair_categories(config)
    cat_id = {o: k for k, o in enumerate(config.objects, 1)}
    size = config.image_size
    images = [{"id": i, "file_name": n, "width": size, "height": size} for i, n in zip(ids, names, strict=True)]
    instances, captions = [], []
    for image_id, scene in zip(ids, scenes, strict=True):
        for it in scene.items:
            box = [it.x, it.y, it.size, it.h]
            ann = {"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id[it.name], "bbox": box}
            instances.append({**ann, "area": it.size * it.h, "iscrowd": 0})
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption(config, scene)})
    categories = [{"id": cat_id[o], "name": cats[o], "supercategory": "toyworld"} for o in config.objects]
    ann_dir = folder / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _dump(ann_dir / "instances_val2014.json", {"images": images, "categories": categories, "annotations": instances})
    _dump(ann_dir / "captions_val2014.json", {"images": images, "annotations": captions})
    (folder / "chair_images.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


# -- VLind-Bench ---------------------------------------------------------------------------------------
def vlind_instances(
    config: WorldConfig, split: str, *, per_prior: int, n_images: int
) -> list[tuple[dict[str, Any], Scene, list[Scene]]]:
    """(data.json instance, factual scene, counterfactual scenes) for ``per_prior`` instances of each prior:
    every favoured object (language prior), co-occurrence pair and colour-prior object."""
    if not 1 <= n_images <= 12:
        raise ValueError("VLind-Bench counterfactual image ids are 0..11: n_images must be 1 to 12")
    stream = f"{split}_vlind"
    out = []
    cid = 0
    for rep in range(per_prior):
        specs: list[tuple[str, str, str]] = [("language", f, "") for f in config.favoured]
        specs += [("cooccurrence", b, a) for a, b in config.cooccurrence]
        specs += [("colour", o, c) for o, c in config.colour_prior]
        for kind, name, extra in specs:
            cid += 1
            rng = make_rng(config, stream, cid, _VLIND_PURPOSE)

            def scene(k: int, require: dict[str, str | None], forbid: tuple[str, ...] = (), cid: int = cid) -> Scene:
                return sample_scene(config, stream, cid * 16 + k, evaluation=True, require=require, forbid=forbid)

            if kind == "language":
                fact = scene(0, {name: None})
                cfs = [scene(1 + k, {}, (name,)) for k in range(n_images)]
                contexts = exist_context(name, True), exist_context(name, False)
                statements = exist_statement(name, True), exist_statement(name, False)
                existent = sorted(cfs[0].present)
                existent = existent[int(rng.integers(len(existent)))]
            elif kind == "cooccurrence":
                fact = scene(0, {extra: None, name: None})
                cfs = [scene(1 + k, {extra: None}, (name,)) for k in range(n_images)]
                contexts = partner_context(extra, name, True), partner_context(extra, name, False)
                statements = exist_statement(name, True), exist_statement(name, False)
                existent = extra
            else:
                options = [c for c in config.colours if c != extra]
                other = options[rep % len(options)]
                fact = scene(0, {name: extra})
                cfs = [scene(1 + k, {name: other}) for k in range(n_images)]
                contexts = colour_context(name, extra), colour_context(name, other)
                statements = colour_statement(name, extra), colour_statement(name, other)
                existent = name
            if kind == "colour":
                missing = [o for o in config.objects if o not in cfs[0].present]
                absent = missing[int(rng.integers(len(missing)))]
            else:
                absent = name
            inst = {
                "concept": name,
                "context_id": cid,
                "context": contexts[1],
                "factual_context": contexts[0],
                "true_statement": statements[1],
                "false_statement": statements[0],
                "existent_noun": f"{article(existent)} {existent}",
                "non-existent_noun": f"{article(absent)} {absent}",
                "best_img_id": "0",
                "aggregated_human_label_good_images": {str(k): _VOTES for k in range(n_images)},
                "toyworld_prior": kind,
            }
            out.append((inst, fact, cfs))
    return out


# -- writing -------------------------------------------------------------------------------------------
def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def _save(config: WorldConfig, scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render(config, scene)
    if path.suffix == ".png":
        image.save(path, format="PNG")
    else:  # VLind-Bench's loader names .jpg files: lossless-ish JPEG, no chroma subsampling
        image.save(path, format="JPEG", quality=95, subsampling=0)


def _write_split(
    config: WorldConfig, split: str, root: Path, n_images: int, vlind_per_prior: int, vlind_images: int
) -> tuple[dict[str, Path], dict[str, Any]]:
    folder = root / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes = eval_scenes(config, split, n_images)
    ids = [_IMAGE_ID_BASE[split] + i + 1 for i in range(n_images)]
    names = [f"{i:012d}.png" for i in ids]
    for scene, name in zip(scenes, names, strict=True):
        _save(config, scene, folder / "images" / name)
    paths: dict[str, Path] = {f"{split}/images": folder / "images"}
    by_name = dict(zip(names, scenes, strict=True))
    stats: dict[str, Any] = {"images": str(folder / "images"), "n_images": n_images, "pope": {}}
    for variant, lines in pope_questions(config, split, scenes, names).items():
        path = folder / f"pope_{variant}.jsonl"
        _jsonl(path, lines)
        paths[f"{split}/pope_{variant}"] = path
        stats["pope"][variant] = {"path": str(path), **_pope_stats(config, lines, by_name)}
    cats, why = chair_categories(config)
    if why is None:
        _write_chair(config, folder, scenes, ids, names)
        paths[f"{split}/chair_images"] = folder / "chair_images.txt"
        paths[f"{split}/chair_annotations"] = folder / "annotations"
        stats["chair"] = {
            "images": str(folder / "chair_images.txt"),
            "annotations": str(folder / "annotations"),
            "categories": cats,
        }
    else:
        stats["chair"] = {"skipped": why}
    vl = folder / "vlind"
    data = []
    for inst, fact, cfs in vlind_instances(config, split, per_prior=vlind_per_prior, n_images=vlind_images):
        base = f"{inst['concept']}/{inst['context_id']}"
        _save(config, fact, vl / "images" / "factual" / f"{base}_{inst['factual_context']}" / "0.jpg")
        for k, cf in enumerate(cfs):
            _save(config, cf, vl / "images" / "counterfactual" / f"{base}_{inst['context']}" / f"{k}.jpg")
        data.append(inst)
    _dump(vl / "data.json", data)
    paths[f"{split}/vlind"] = vl / "data.json"
    stats["vlind"] = {
        "data": str(vl / "data.json"),
        "n_instances": len(data),
        "by_prior": dict(Counter(x["toyworld_prior"] for x in data)),
        "counterfactual_images_per_instance": vlind_images,
    }
    return paths, stats


def write_splits(
    out_dir: str | Path,
    config: WorldConfig,
    *,
    n_images_val: int,
    n_images_test: int,
    vlind_per_prior: int = 4,
    vlind_images: int = 4,
) -> dict[str, Path]:
    """Write the val and test splits of ``config``'s world under ``out_dir``; the paths written, by name.

    Names: ``{split}/images``, ``{split}/pope_{random,popular,adversarial,all}``, ``{split}/chair_images``,
    ``{split}/chair_annotations`` (absent when CHAIR cannot read the vocabulary, see :func:`chair_categories`),
    ``{split}/vlind`` (the data.json) and ``manifest`` (``splits.json``). ``vlind_per_prior`` instances per
    prior (favoured object, co-occurrence pair, colour-prior object), ``vlind_images`` counterfactual images each.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    stats = train_statistics(config)
    ask = ask_probabilities(config)
    paths: dict[str, Path] = {}
    manifest: dict[str, Any] = {
        "format": "causalmm-toyworld-splits/1",
        "config": asdict(config),
        "vocabulary_size": len(vocabulary(config)),
        "training": {
            "statistics_images": stats.n,
            "presence": {o: round(stats.presence(o), 4) for o in config.objects},
            "popular": stats.popular(),
            "cooccurrence_top": [
                [a, b, stats.cooccurrence[(a, b)]]
                for a, b in sorted(stats.cooccurrence, key=lambda p: -stats.cooccurrence[p])[:10]
            ],
            "ask_probability": {o: {"present": round(p, 4), "absent": round(a, 4)} for o, (p, a) in ask.items()},
        },
        "splits": {},
    }
    for split, n in (("val", n_images_val), ("test", n_images_test)):
        split_paths, split_stats = _write_split(config, split, root, n, vlind_per_prior, vlind_images)
        paths.update(split_paths)
        manifest["splits"][split] = split_stats
    manifest["commands"] = _commands(root, any(k.endswith("chair_images") for k in paths))
    paths["manifest"] = root / "splits.json"
    _dump(paths["manifest"], manifest)
    return paths


def _commands(root: Path, chair: bool) -> list[str]:
    out = []
    for split in ("val", "test"):
        s = root / split
        for v in POPE_VARIANTS:
            out.append(f"causalmm eval pope --data {s}/pope_{v}.jsonl --images {s}/images --out runs/{split}-pope-{v}")
        if chair:
            out.append(
                f"causalmm eval chair --data {s}/chair_images.txt --images {s}/images "
                f"--annotations {s}/annotations --out runs/{split}-chair"
            )
        out.append(f"causalmm eval vlind --data {s}/vlind/data.json --out runs/{split}-vlind")
    return out
