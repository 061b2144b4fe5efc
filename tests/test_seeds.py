"""Seeds: every part of a seed's address hashed whole, so no two samples or images of a run share a draw.

The collision tests use each benchmark's real id formats at full size: the nine official POPE files (from
``../shared/data/pope`` where present), MME's fourteen subtasks with its 1,187 images in their release naming,
every COCO val2014 image id CHAIR can meet, VLind-Bench's instances with all twelve counterfactual images, and
the image digests of 40,504 files (COCO val2014's size).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from causalmm import seeds as streams
from causalmm.benchmarks import get_benchmark

SHARED_POPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pope"
RUN_SEEDS = (0, 1, 2)


def _distinct(ids: list[str], what: str) -> None:
    """Every id gets its own sample seed, under each run seed, and no seed is shared across run seeds either."""
    assert len(set(ids)) == len(ids), f"{what}: the ids themselves repeat"
    seeds = [streams.sample_seed(run, i) for run in RUN_SEEDS for i in ids]
    assert len(set(seeds)) == len(seeds), f"{what}: {len(seeds) - len(set(seeds))} colliding sample seeds"
    assert all(0 <= s < 2**63 for s in seeds)


def test_parts_are_hashed_whole_and_canonically():
    # ids that share their first 4 bytes (the old derivation kept only those)
    assert streams.derive_seed(0, "existence/000000006040.jpg#0") != streams.derive_seed(0, "existence/1.jpg#0")
    assert streams.derive_seed(0, "310196") != streams.derive_seed(0, "310197")
    # the two language streams began alike ("lang")
    assert streams.derive_seed(7, streams.LANGUAGE, "b", 0) != streams.derive_seed(7, streams.LANGUAGE_PREFIX, "b", 0)
    # no two tuples share an encoding: split points, types, signs and size all count
    tuples = [("ab", "c"), ("a", "bc"), ("abc",), (1,), ("1",), (-1,), (2**64 + 1,), (1, 0), (10,), ("", "")]
    assert len({streams.derive_seed(*t) for t in tuples}) == len(tuples)
    # stable across processes and platforms: a fixed value (it seeds every shipped table; a new scheme must
    # regenerate them and change IMAGE_SEEDS so old runs are not resumed)
    assert streams.derive_seed(0, "q1") == 959589882175352151
    assert streams.derive_seed(0, "q1") != streams.derive_seed(1, "q1")


def test_numpy_ints_are_ints_and_other_types_are_refused():
    np = pytest.importorskip("numpy")
    assert streams.derive_seed(np.int64(5), "x") == streams.derive_seed(5, "x")
    for bad in (1.5, None, b"bytes", True):
        with pytest.raises(TypeError, match="seed parts are ints or strings"):
            streams.derive_seed(0, bad)


@pytest.mark.skipif(not SHARED_POPE.is_dir(), reason="../shared/data/pope not present")
def test_pope_ids_of_the_nine_official_files_never_share_a_seed():
    bench = get_benchmark("pope")
    for f in sorted(SHARED_POPE.glob("*.json")):
        _distinct([s.id for s in bench.load(f, None)], f.name)


def _mme_release_names() -> dict[str, list[str]]:
    """MME's images per subtask, in the release's naming (COCO numbers, IMDb ids, Places365, landmark hashes,
    numbered files), at the release's counts: 1,187 images, two questions each."""
    coco = [f"{n:012d}.jpg" for n in range(6040, 6040 + 30 * 977, 977)]
    return {
        "existence": coco,
        "count": coco,
        "position": coco,
        "color": coco,
        "posters": [f"tt{1000000 + 731 * i:07d}.jpg" for i in range(147)],
        "celebrity": [f"tt{32138 + i:07d}_shot_{395 + i:04d}_img_{i % 3}.jpg" for i in range(170)],
        "scene": [f"Places365_val_{i * 17 + 1:08d}.jpg" for i in range(200)],
        "landmark": [f"{i * 0x9E3779B97F4A7C15 % 2**64:016x}.jpg" for i in range(200)],
        "artwork": [f"{10002 + 13 * i}.jpg" for i in range(200)],
        "OCR": [f"{i:04d}.jpg" for i in range(1, 21)],
        "commonsense_reasoning": [f"{i:04d}.png" for i in range(1, 71)],
        "numerical_calculation": [f"{i:04d}.png" for i in range(1, 21)],
        "text_translation": [f"{i:04d}.png" for i in range(1, 21)],
        "code_reasoning": [f"{i:04d}.png" for i in range(1, 21)],
    }


def test_mme_ids_at_full_size_never_share_a_seed(tmp_path):
    """MME ids are ``subtask/image#k``: every question of a subtask began with the same 4 bytes."""
    names = _mme_release_names()
    for sub, imgs in names.items():
        lines = [f"{img}\tIs question {k} about {img}?\t{('Yes', 'No')[k]}" for img in imgs for k in (0, 1)]
        (tmp_path / f"{sub}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = get_benchmark("mme").load(tmp_path, None)
    assert len(samples) == 2 * sum(len(v) for v in names.values()) == 2374
    _distinct([s.id for s in samples], "MME")


def test_chair_ids_every_coco_val2014_number_never_share_a_seed():
    """CHAIR's ids are COCO image numbers (val2014's run up to 581,929): every number a run can meet."""
    _distinct([str(i) for i in range(1, 581_930)], "COCO image ids")


def test_vlind_ids_at_full_size_never_share_a_seed(tmp_path):
    """VLind-Bench ids are ``concept/context_id/test/image/statement`` over its instances, all 12 images good."""
    concepts = ["animal", "animal habitat", "color", "food", "landmark", "nature", "object", "plant", "weather"]
    instances = []
    for n in range(302):
        concept = concepts[n % len(concepts)]
        instances.append(
            {
                "concept": concept,
                "context_id": n,
                "context": f"context {n}",
                "factual_context": f"factual {n}",
                "existent_noun": "a cat",
                "non-existent_noun": "a dog",
                "true_statement": "The cat is here.",
                "false_statement": "The dog is here.",
                "best_img_id": n % 12,
                "aggregated_human_label_good_images": {str(i): 3 for i in range(12)},
            }
        )
    path = tmp_path / "data.json"
    path.write_text(json.dumps(instances), encoding="utf-8")
    samples = get_benchmark("vlind").load(path, None)
    assert len(samples) == 302 * (2 + 2 + 2 + 2 * 12)
    _distinct([s.id for s in samples], "VLind-Bench")


def test_image_seeds_of_40504_files_never_collide():
    """Image seeds hash the whole 128-bit file digest (the old derivation kept 16 bits of it: a 240-image split
    had even odds of two images sharing their draws)."""
    digests = [streams.file_digest(f"COCO_val2014_{i:012d}.jpg".encode()) for i in range(40_504)]
    assert len(set(digests)) == len(digests)
    for run in RUN_SEEDS:
        seeds = {streams.image_seed(run, d) for d in digests}
        assert len(seeds) == len(digests)
    # two digests alike in their first 4 hex digits
    assert streams.image_seed(0, "abcd" + "0" * 28) != streams.image_seed(0, "abcd" + "1" * 28)


def test_a_run_made_with_the_colliding_seeds_is_not_resumed(tmp_path):
    """Old and new seeds must not mix in one predictions file: a run.json from before is refused, saying why."""
    from causalmm.benchmarks.run_folder import RunMismatchError, check_run_info
    from causalmm.benchmarks.runner import IMAGE_SEEDS

    old_scheme = (
        "per image: derive_seed(run_seed, 'image', blake2b of the image file); seeds the vision branch, VCD's noise "
        "and the language branch's draws over the image prefix"
    )
    info = {"benchmark": "pope", "options": {}, "model": "m", "config": {}, "generation": {}, "seeds": [0]}
    for old in ({**info, "image_seeds": old_scheme}, info):
        (tmp_path / "run.json").write_text(json.dumps(old))
        with pytest.raises(RunMismatchError, match="earlier causalmm whose seeds collided.*pick another --out"):
            check_run_info(tmp_path, {**info, "image_seeds": IMAGE_SEEDS})
    (tmp_path / "run.json").write_text(json.dumps({**info, "image_seeds": IMAGE_SEEDS}))
    assert check_run_info(tmp_path, {**info, "image_seeds": IMAGE_SEEDS})["seeds"] == [0]
