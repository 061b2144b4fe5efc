"""CHAIR: the caption reading (tokens, singulars, phrases, synonyms), the ground truth, the metrics, the files.

Tiny COCO annotation files are written by the tests. Expected values of the reading come from the reference
script's own tools (nltk's word_tokenize, pattern's singularize), checked once against them.
"""

import json
from pathlib import Path

import pytest

from causalmm.benchmarks import get_benchmark
from causalmm.benchmarks.base import BenchmarkError
from causalmm.benchmarks.chair import Chair, coco_image_id, load_ground_truth, read_image_list
from causalmm.benchmarks.coco_objects import (
    COCO_SYNONYMS,
    OBJECT_OF_WORD,
    caption_objects,
    caption_words,
    singularize,
    tokenize,
)
from causalmm.benchmarks.evaluate import load_run_samples

CATEGORIES = ["person", "dog", "car", "elephant", "toilet", "sink", "cat", "bus"]

# image id -> (instance categories, reference captions); the ground truth is both together
IMAGES = {
    101: (["dog", "person"], ["A man throws a frisbee to his dog."]),  # {person, dog, frisbee}
    102: (["elephant"], ["An elephant standing in the grass."]),  # {elephant}
    103: (["toilet", "sink"], ["A small bathroom with a toilet."]),  # {toilet, sink}
    104: (["car"], ["A car parked on the street."]),  # {car}
}
TRAIN_IMAGES = {205: (["bus"], ["Two buses on a road."])}  # only in the train2014 files


def write_coco(root: Path, images: dict, split: str = "val2014", *, sub: str = "annotations") -> Path:
    folder = root / sub if sub else root
    folder.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(CATEGORIES)]
    ids = {n: i + 1 for i, n in enumerate(CATEGORIES)}
    imgs = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in images]
    inst, caps, k = [], [], 0
    for image_id, (objects, captions) in images.items():
        for name in objects:
            k += 1
            inst.append({"id": k, "image_id": image_id, "category_id": ids[name], "bbox": [0, 0, 1, 1]})
        for text in captions:
            k += 1
            caps.append({"id": k, "image_id": image_id, "caption": text})
    (folder / f"instances_{split}.json").write_text(
        json.dumps({"images": imgs, "categories": cats, "annotations": inst})
    )
    (folder / f"captions_{split}.json").write_text(json.dumps({"images": imgs, "annotations": caps}))
    return root


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco", IMAGES)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in [*IMAGES, *TRAIN_IMAGES]:
        (d / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"jpg")
    return d


def scored(bench, captions: dict[int, str]) -> list[dict]:
    records = [{"id": str(i), "image_id": i, "text": t, "seed": 0} for i, t in captions.items()]
    return [{**r, **bench.parse(r)} for r in records]


# -- reading captions ----------------------------------------------------------------------------------
def test_table_has_the_80_coco_categories_and_each_names_itself():
    assert len(COCO_SYNONYMS) == 80
    assert all(OBJECT_OF_WORD[name] == name for name in COCO_SYNONYMS)
    assert OBJECT_OF_WORD["puppy"] == "dog" and OBJECT_OF_WORD["motorbike"] == "motorcycle"
    assert OBJECT_OF_WORD["table"] == "dining table" and OBJECT_OF_WORD["seat"] == "chair"
    # written with a leading space / a capital in the reference table, so they never match a caption word
    assert "motor bike" not in OBJECT_OF_WORD and "cheesecake" not in OBJECT_OF_WORD


@pytest.mark.parametrize(
    "word, singular",
    [
        ("dogs", "dog"), ("puppies", "puppy"), ("ponies", "pony"), ("knives", "knife"), ("calves", "calf"),
        ("gloves", "glove"), ("stoves", "stove"), ("benches", "bench"), ("glasses", "glass"), ("buses", "bus"),
        ("people", "person"), ("women", "woman"), ("policemen", "policeman"), ("children", "child"),
        ("geese", "goose"), ("mice", "mouse"), ("oxen", "ox"), ("skis", "ski"), ("buffaloes", "buffalo"),
        ("pandae", "panda"), ("sheep", "sheep"), ("scissors", "scissors"), ("giraffe", "giraffe"),
        # the reference singulariser's own answers, kept so the numbers match it
        ("bus", "bu"), ("glass", "glas"), ("tennis", "tenni"), ("ties", "ty"), ("canoes", "cano"),
        ("collies", "collies"), ("doggies", "doggies"),
        ("hot-dogs", "hot-dogs"), ("dog's", "dog's"),
    ],
)  # fmt: skip
def test_singularize_matches_the_reference(word, singular):
    assert singularize(word) == singular


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("a dog's bone, and two cats.", ["a", "dog", "'s", "bone", ",", "and", "two", "cats", "."]),
        ("it is 10:21. the clock", ["it", "is", "10:21.", "the", "clock"]),
        ("i can't.", ["i", "ca", "n't", "."]),
        ("a hot-dog stand, e.g. here.", ["a", "hot-dog", "stand", ",", "e.g.", "here", "."]),
        ("(a dog.)", ["(", "a", "dog", ".", ")"]),
        ("three men cannot stand.", ["three", "men", "can", "not", "stand", "."]),
        ('a "teddy bear" on a bed!', ["a", '"', "teddy", "bear", '"', "on", "a", "bed", "!"]),
        ("a cat/dog toy... two kittens.", ["a", "cat/dog", "toy", "...", "two", "kittens", "."]),
        ("a dog.the end 3,000 a,b", ["a", "dog.the", "end", "3,000", "a", ",", "b"]),
    ],
)
def test_tokenize_matches_nltk_word_tokenize(text, tokens):
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    "caption, words, objects",
    [
        ("Two dogs and a puppy.", ["dog", "puppy"], ["dog", "dog"]),
        ("A man on a motorbike.", ["man", "motorbike"], ["person", "motorcycle"]),
        ("A hot dog and two hot dogs.", ["hot dog", "hot dog"], ["hot dog", "hot dog"]),  # never a dog
        ("A teddy bear.", ["teddy bear"], ["teddy bear"]),  # not a bear
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"], ["elephant", "giraffe"]),  # no person
        ("A passenger train.", ["train"], ["train"]),  # no person
        ("A man with a bow tie.", ["man", "tie"], ["person", "tie"]),
        ("A wine glass and a traffic light.", ["wine glass", "traffic light"], ["wine glass", "traffic light"]),
        ("The toilet seat is up.", ["toilet"], ["toilet"]),  # the seat is the toilet's, no chair
        ("A seat, a toilet.", ["toilet"], ["toilet"]),  # any seat beside a toilet
        ("A seat by the window.", ["seat"], ["chair"]),
        ("A motor bike.", [], []),  # joined, then (as in the reference) matched by nothing: no bicycle
        ("A bus and two buses.", ["bus"], ["bus"]),  # singular "bus" is lost by the reference singulariser
        ("Dog's toys; CATS!", ["dog", "cat"], ["dog", "cat"]),
    ],
)
def test_caption_objects_synonyms_plurals_and_phrases(caption, words, objects):
    found = caption_objects(caption)
    assert (found.words, found.objects) == (words, objects)


def test_caption_length_counts_tokens_after_joining_phrases():
    # a | elephant | eat | a | hot dog | beside | a | teddy bear | .   (12 tokens, 3 phrases joined)
    assert caption_words("A baby elephant eats a hot dog beside a teddy bear.") == [
        "a", "elephant", "eat", "a", "hot dog", "beside", "a", "teddy bear", ".",
    ]  # fmt: skip
    assert caption_objects("A baby elephant eats a hot dog beside a teddy bear.").length == 9
    assert caption_objects("").length == 0


# -- ground truth and metrics ---------------------------------------------------------------------------
def test_ground_truth_is_instances_plus_reference_caption_objects(coco):
    gt = load_ground_truth(coco)
    assert gt.objects(101) == {"person", "dog", "frisbee"}  # frisbee only from the reference caption
    assert gt.objects(103) == {"toilet", "sink"}
    assert load_ground_truth(coco / ".") is gt  # one per folder
    assert (
        Chair(annotations=coco / "annotations" / "instances_val2014.json").ground_truth().root == coco / "annotations"
    )


def test_metrics_by_hand(coco):
    bench = Chair(annotations=coco)
    records = scored(
        bench,
        {
            # two | dog | and | a | puppy | play | with | a | frisbee | near | a | motorbike | .   -> 13 words
            # mentions dog, dog, frisbee, motorcycle; gt {person, dog, frisbee}: motorcycle hallucinated,
            # recalled {dog, frisbee}
            101: "Two dogs and a puppy play with a frisbee near a motorbike.",
            # a | elephant | eat | a | hot dog | beside | a | teddy bear | .   -> 9 words
            # mentions elephant, hot dog, teddy bear; gt {elephant}: 2 hallucinated, recalled {elephant}
            102: "A baby elephant eats a hot dog beside a teddy bear.",
            # the | toilet | i | next | to | the | sink | .   -> 8 words; mentions toilet, sink; none hallucinated
            103: "The toilet seat is next to the sink.",
            # a | cat | , | a | cat | and | a | car | .   -> 9 words; mentions cat, cat, car; gt {car}:
            # cat hallucinated twice (each mention counts), recalled {car}
            104: "A cat, a cat and a car.",
        },
    )
    assert [r["hallucinated"] for r in records] == [["motorcycle"], ["hot dog", "teddy bear"], [], ["cat", "cat"]]
    assert records[0]["recalled"] == ["dog", "frisbee"] and records[0]["gt_objects"] == ["dog", "frisbee", "person"]
    assert records[0]["mentioned_words"] == ["dog", "puppy", "frisbee", "motorbike"]
    json.dumps(records)  # records go to predictions.jsonl
    m = bench.metrics(records)
    assert m["n"] == 4
    assert m["CHAIR_s"] == pytest.approx(100 * 3 / 4)  # captions 101, 102, 104
    assert m["CHAIR_i"] == pytest.approx(100 * 5 / 12)  # (1 + 2 + 0 + 2) of (4 + 3 + 2 + 3) mentions
    assert m["recall"] == pytest.approx(100 * 6 / 7)  # (2 + 1 + 2 + 1) of (3 + 1 + 2 + 1) gt objects
    assert m["length"] == pytest.approx((13 + 9 + 8 + 9) / 4)
    # one caption alone, and the empty-denominator conventions
    m = bench.metrics(records[2:3])
    assert (m["CHAIR_s"], m["CHAIR_i"], m["recall"]) == (0.0, 0.0, 100.0)
    empty = scored(bench, {102: "Nothing to see."})
    assert bench.metrics(empty)["CHAIR_i"] == 0.0


def test_metrics_need_parsed_records_and_at_least_one(coco):
    bench = Chair(annotations=coco)
    with pytest.raises(BenchmarkError, match="not parsed"):
        bench.metrics([{"id": "101", "text": "a dog"}])
    with pytest.raises(BenchmarkError, match="no CHAIR records"):
        bench.metrics([])


def test_train2014_files_are_read_for_images_not_in_val(tmp_path):
    root = write_coco(tmp_path / "coco", IMAGES, sub="")
    write_coco(root, TRAIN_IMAGES, split="train2014", sub="")
    bench = Chair(annotations=root)
    (rec,) = scored(bench, {205: "A bus next to two buses and a car."})
    assert rec["gt_objects"] == ["bus"] and rec["hallucinated"] == ["car"]
    with pytest.raises(BenchmarkError, match="image 999 is in none of the COCO annotations"):
        scored(bench, {999: "A dog."})


def test_missing_annotations_are_clear_errors(tmp_path, coco):
    with pytest.raises(BenchmarkError, match="--annotations"):
        Chair().parse({"id": "101", "image_id": 101, "text": "a dog"})
    with pytest.raises(BenchmarkError, match="no COCO annotations in .*--annotations DIR"):
        Chair(annotations=tmp_path).parse({"id": "101", "image_id": 101, "text": "a dog"})
    (coco / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(BenchmarkError, match="instances_val2014.json but no captions_val2014.json"):
        Chair(annotations=coco).ground_truth()
    with pytest.raises(BenchmarkError, match="unknown CHAIR option"):
        get_benchmark("chair", parse="strict")


# -- image lists ---------------------------------------------------------------------------------------
def test_load_image_list_text_and_json(tmp_path, coco, image_dir):
    bench = get_benchmark("chair", annotations=str(coco))
    listing = tmp_path / "images.txt"
    listing.write_text("COCO_val2014_000000000101.jpg\n\nCOCO_val2014_000000000102.jpg\n")
    samples = bench.load(listing, image_dir)
    assert [s.id for s in samples] == ["101", "102"]
    assert samples[0].prompt == "Please describe this image in detail."
    assert samples[0].image == image_dir / "COCO_val2014_000000000101.jpg"
    assert samples[1].meta == {"image_id": 102, "image": "COCO_val2014_000000000102.jpg"}
    as_json = tmp_path / "images.json"
    as_json.write_text(json.dumps([{"image_id": 103}, {"image": "COCO_val2014_000000000104.jpg"}]))
    samples = Chair(annotations=coco, prompt="Describe.").load(as_json, image_dir)
    assert [(s.id, s.meta["image"], s.prompt) for s in samples] == [
        ("103", "COCO_val2014_000000000103.jpg", "Describe."),
        ("104", "COCO_val2014_000000000104.jpg", "Describe."),
    ]
    assert coco_image_id("val2014/COCO_val2014_000000310196.jpg") == 310196 and coco_image_id("x.jpg") is None


def test_image_list_errors_name_file_and_line(tmp_path, coco, image_dir):
    bench = Chair(annotations=coco)
    bad = tmp_path / "bad.txt"
    bad.write_text("COCO_val2014_000000000101.jpg\nholiday_photo.jpg\n")
    with pytest.raises(BenchmarkError, match=r"bad\.txt: line 2: 'holiday_photo\.jpg' is not a COCO image"):
        bench.load(bad, image_dir)
    dup = tmp_path / "dup.txt"
    dup.write_text("COCO_val2014_000000000101.jpg\nCOCO_val2014_000000000102.jpg\n000000000101.jpg\n")
    with pytest.raises(BenchmarkError, match=r"dup\.txt: line 3: image 101 is listed twice \(also line 1\)"):
        bench.load(dup, image_dir)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image_id": 101}\n{"image_id": \n')
    with pytest.raises(BenchmarkError, match=r"broken\.jsonl: line 2: not valid JSON"):
        read_image_list(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(BenchmarkError, match="empty"):
        bench.load(empty, image_dir)
    missing = tmp_path / "missing.txt"
    missing.write_text("COCO_val2014_000000000104.jpg\n")
    (image_dir / "COCO_val2014_000000000104.jpg").unlink()  # annotated, but its file is not there
    with pytest.raises(BenchmarkError, match="1 image.* missing"):
        load_run_samples(bench, missing, image_dir, None)  # the runner checks images after --limit
    with pytest.raises(BenchmarkError, match="--annotations"):
        Chair().load(missing, image_dir)  # before any model work


def test_image_not_in_the_annotations_fails_at_load_naming_image_line_and_files(tmp_path, coco, image_dir):
    # before: the list loaded, the model described every image, and scoring failed on the first unknown one
    listing = tmp_path / "list.txt"
    listing.write_text("COCO_val2014_000000000101.jpg\nCOCO_val2014_000000000205.jpg\n")  # 205: train2014 only
    with pytest.raises(BenchmarkError) as err:
        load_run_samples(Chair(annotations=coco), listing, image_dir, None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{listing}: 1 image(s) are in none of the COCO annotations")
    assert "instances_val2014.json, captions_val2014.json in " + str(coco / "annotations") in message
    assert "line 2: COCO_val2014_000000000205.jpg" in message and "train2014" in message
    both = write_coco(write_coco(tmp_path / "both", IMAGES), TRAIN_IMAGES, split="train2014")
    samples = Chair(annotations=both).load(listing, image_dir)  # with the train2014 files beside them it loads
    assert [s.id for s in samples] == ["101", "205"]


# -- prediction files ----------------------------------------------------------------------------------
def test_read_predictions_json_lines_and_json_list(tmp_path, coco):
    bench = Chair(annotations=coco)
    lines = tmp_path / "caps.jsonl"
    lines.write_text('{"image_id": 101, "caption": "A dog."}\n\n{"image_id": "102", "caption": "A cat."}\n')
    records = bench.read_predictions(lines, None, None)
    assert records == [
        {"id": "101", "text": "A dog.", "image_id": 101, "image": "COCO_val2014_000000000101.jpg"},
        {"id": "102", "text": "A cat.", "image_id": 102, "image": "COCO_val2014_000000000102.jpg"},
    ]
    as_list = tmp_path / "caps.json"
    as_list.write_text(
        json.dumps(
            [{"image": "COCO_val2014_000000000103.jpg", "text": "A sink."}, {"image_id": 104, "answer": "A car."}]
        )
    )
    records = bench.read_predictions(as_list, None, None)
    assert [(r["id"], r["text"]) for r in records] == [("103", "A sink."), ("104", "A car.")]
    assert bench.metrics([{**r, **bench.parse(r)} for r in records])["CHAIR_s"] == 0.0
    reference = tmp_path / "ref.json"  # the reference script's own input
    reference.write_text(json.dumps({"imgToEval": {"101": {"image_id": 101, "caption": "A dog."}}}))
    assert [r["id"] for r in bench.read_predictions(reference, None, None)] == ["101"]


def test_read_predictions_errors_and_image_list(tmp_path, coco):
    bench = Chair()
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"image_id": 101, "caption": "A dog."}\n{"image_id": 102, "caption": \n')
    with pytest.raises(BenchmarkError, match=r"caps\.jsonl: line 2: not valid JSON"):
        bench.read_predictions(bad, None, None)
    bad.write_text('{"image_id": 101, "caption": "A dog."}\n{"image_id": 102}\n')
    with pytest.raises(BenchmarkError, match=r"caps\.jsonl: line 2: no caption"):
        bench.read_predictions(bad, None, None)
    bad.write_text('{"image_id": 101, "caption": "A dog."}\n{"image_id": 101, "caption": "A cat."}\n')
    with pytest.raises(BenchmarkError, match=r"line 2: image 101 has a caption already \(line 1\)"):
        bench.read_predictions(bad, None, None)
    listing = tmp_path / "images.txt"
    listing.write_text("000000000101.jpg\n")
    bad.write_text('{"image_id": 101, "caption": "A dog."}\n{"image_id": 102, "caption": "A cat."}\n')
    with pytest.raises(BenchmarkError, match=r"line 2: image 102 is not in the image list"):
        bench.read_predictions(bad, listing, coco)
    bad.write_text('{"image_id": 101, "caption": "A dog."}\n')
    (record,) = bench.read_predictions(bad, listing, coco)
    assert record["image"] == "000000000101.jpg"
    assert bench.parse(record)["mentioned"] == ["dog"]  # the annotations given to read_predictions are used


def test_score_predictions_and_native_captions(tmp_path, coco):
    from causalmm.benchmarks.score import score_predictions

    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image_id": 101, "caption": "A dog and a cat."}\n{"image_id": 103, "caption": "A sink."}\n')
    summary = score_predictions("chair", caps, annotations=coco, options={"annotations": coco}, n_boot=20)
    assert summary["metrics"]["CHAIR_s"] == 50.0 and summary["metrics"]["CHAIR_i"] == pytest.approx(100 / 3)
    assert summary["options"] == {"prompt": "Please describe this image in detail.", "annotations": str(coco)}
    bench = Chair(annotations=coco)
    records = [{**r, "seed": 0} for r in bench.read_predictions(caps, None, None)]
    (path,) = bench.write_native(records, tmp_path / "out")
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"image_id": 101, "caption": "A dog and a cat."},
        {"image_id": 103, "caption": "A sink."},
    ]


def test_cli_eval_then_score_the_caption_file_end_to_end(coco, tmp_path, model_dirs, causalmm_cli):
    from PIL import Image

    images = tmp_path / "val2014"
    images.mkdir()
    for k, i in enumerate(IMAGES):
        Image.new("RGB", (32, 32), (60 * k, 120, 200)).save(images / f"COCO_val2014_{i:012d}.jpg")
    listing = tmp_path / "chair_images.txt"
    listing.write_text("".join(f"COCO_val2014_{i:012d}.jpg\n" for i in IMAGES))
    out = tmp_path / "run"
    causalmm_cli("eval", "chair", "--model", model_dirs["llava"], "--data", listing, "--images", images,
                 "--annotations", coco, "--out", out, "--max-new-tokens", "6", "--batch-size", "4",
                 "--method", "regular", "--no-progress")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 4 and {"CHAIR_s", "CHAIR_i", "recall", "length"} <= set(metrics["metrics"])
    assert metrics["options"]["prompt"] == "Please describe this image in detail."
    captions = out / metrics["native_files"][0]
    causalmm_cli("score", "chair", captions, "--annotations", coco, "--out", tmp_path / "s")
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"] == metrics["metrics"]
    # compare uses the paired bootstrap for CHAIR
    proc = causalmm_cli("compare", out, out, "--out", tmp_path / "cmp")
    assert "paired bootstrap (CHAIR_s)" in proc.stdout
