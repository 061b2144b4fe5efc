"""The tuner: registry grids under one budget, the selection rule, the dev/test split by image, a resumed tune,
and ``eval --tuned`` on the test images only."""

import json
import shutil

import pytest
import torch
from PIL import Image

from causalmm.benchmarks import get_benchmark
from causalmm.benchmarks.base import BenchmarkError, Sample
from causalmm.errors import ConfigError
from causalmm.methods import METHODS
from causalmm.tuning import Row, grid, parse_overrides, parse_rows, registry_rows, rule_for, select, split_by_image
from causalmm.tuning.grid import axes
from causalmm.tuning.tune import tune


def test_every_registry_grid_holds_the_official_setting_first():
    for row in registry_rows():
        settings = grid(row)
        method = METHODS[row.settings["method"]]
        for p in method.tunable(row.settings):
            assert p.default in axes(row)[p.field], (row.name, p.field)
        first = settings[0]
        for p in method.tunable(row.settings):
            value = first.get(p.field) if p.field in first else first.get("params", {}).get(p.field)
            assert value == p.default, (row.name, p.field, value)
        assert len({json.dumps(s, sort_keys=True) for s in settings}) == len(settings)


def test_a_parameter_outside_its_grid_default_is_added():
    # CausalMM's language layers default to the middle third (None), which the grid lists beside all/shallow/deep
    row = Row("causalmm/language", {"method": "causalmm", "mode": "language"})
    assert axes(row)["language_layers"][0] is None
    assert "vision_layers" not in axes(row)  # not read in language mode
    # AGLA's share kept applies to matcher=self only
    assert "keep" not in axes(Row("agla", {"method": "agla"}))
    assert axes(Row("agla", {"method": "agla", "params": {"matcher": "self"}}))["keep"] == (0.5, 0.75)


def test_the_budget_keeps_the_official_setting_and_draws_the_rest_by_seed():
    row = next(r for r in registry_rows() if r.name == "causalmm/multimodal")
    whole = grid(row)
    assert len(whole) == 2 * 4 * 3 * 2
    a, b, c = grid(row, budget=5, seed=0), grid(row, budget=5, seed=0), grid(row, budget=5, seed=1)
    assert a == b and a != c
    assert len(a) == 5 and a[0] == whole[0]
    assert [whole.index(s) for s in a] == sorted(whole.index(s) for s in a)  # kept in grid order
    assert grid(row, budget=100) == whole
    with pytest.raises(ConfigError, match="at least 1"):
        grid(row, budget=0)


def test_rows_and_overrides_are_read_and_checked():
    rows = parse_rows("vcd,causalmm/language")
    assert [r.name for r in rows] == ["regular", "vcd", "causalmm/language"]
    assert [r.name for r in parse_rows("causalmm")] == ["regular", "causalmm/vision"]
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_rows("nope")
    over = parse_overrides(["vcd.gamma=1,3", "causalmm.language_layers=none,2-3", "vcd.noise_step=999"], rows)
    assert over == {
        "vcd": {"gamma": (1.0, 3.0), "noise_step": (999,)},
        "causalmm/language": {"language_layers": (None, "2-3")},
    }
    settings = grid(rows[1], over["vcd"])
    assert [(s["gamma"], s["noise_step"]) for s in settings[:2]] == [(1.0, 999), (1.0, 999)]
    assert len(settings) == 2 * 2  # gamma x epsilon; noise_step fixed
    with pytest.raises(ConfigError, match="has no parameter 'lamb'"):
        parse_overrides(["vcd.lamb=1"], rows)
    with pytest.raises(ConfigError, match="none of the rows tuned"):
        parse_overrides(["pai.alpha=1"], rows)
    with pytest.raises(ConfigError, match="ROW.PARAM=V1,V2"):
        parse_overrides(["gamma=1"], rows)
    with pytest.raises(ConfigError, match="gamma"):
        grid(rows[1], {"gamma": (-1.0,)})  # checked as a config before any run


def _entry(chair_i, recall):
    return {"settings": {"chair_i": chair_i}, "metrics": {"CHAIR_i": chair_i, "recall": recall}}


def test_selection_follows_the_rule_by_hand():
    rule = rule_for("chair")  # lowest CHAIR_i with recall >= regular's - 2 points
    regular = {"CHAIR_i": 12.0, "recall": 60.0}
    entries = [_entry(11.0, 59.0), _entry(6.0, 50.0), _entry(9.0, 58.5), _entry(9.0, 58.0), _entry(9.0, 59.5)]
    best = select(entries, rule, regular)
    # 6.0 loses 10 points of recall; among the 9.0s the highest recall wins
    assert best["metrics"] == {"CHAIR_i": 9.0, "recall": 59.5} and best["admissible"] and best["score"] == 9.0
    fallback = select([_entry(3.0, 40.0), _entry(5.0, 45.0)], rule, regular)
    assert fallback["metrics"]["recall"] == 45.0 and not fallback["admissible"]
    pope = rule_for("pope")
    tie = [{"settings": i, "metrics": {"accuracy": a}} for i, a in enumerate([80.0, 85.0, 85.0])]
    assert select(tie, pope, {"accuracy": 70.0})["settings"] == 1  # ties go to the earlier setting
    assert rule_for("pope", "f1").metric == "f1"
    with pytest.raises(ConfigError, match="tunes on accuracy or f1"):
        rule_for("pope", "CHAIR_i")
    with pytest.raises(ConfigError, match="chair only"):
        rule_for("pope", floor=1.0)


def _samples(images, per_image=2):
    out, digests = [], {}
    for i, img in enumerate(images):
        for j in range(per_image):
            sid = f"{i}-{j}"
            out.append(Sample(sid, f"/data/{img}.png", "q?", {"label": "yes", "instance": f"inst{i // 2}"}))
            digests[sid] = f"digest-{img}"
    return out, digests


def test_the_split_is_by_image_disjoint_and_independent_of_sample_order():
    pope = get_benchmark("pope")
    samples, digests = _samples([f"im{k}" for k in range(10)])
    split = split_by_image(pope, samples, digests, 4, seed=3, data_digest="d")
    assert len(split.dev) == 4 and len(split.test) == 6
    assert not set(split.dev) & set(split.test)
    assert set(split.dev) | set(split.test) == set(digests.values())
    again = split_by_image(pope, list(reversed(samples)), digests, 4, seed=3, data_digest="d")
    assert again == split
    assert split_by_image(pope, samples, digests, 4, seed=4, data_digest="d").dev != split.dev
    assert split.names[split.dev[0]].startswith("im")
    with pytest.raises(BenchmarkError, match="give 1 to 9"):
        split_by_image(pope, samples, digests, 10, seed=0, data_digest="d")


def test_a_scoring_unit_spanning_images_stays_on_one_side():
    vlind = get_benchmark("vlind")  # its unit is the instance, which spans two images here
    samples, digests = _samples([f"im{k}" for k in range(10)])
    split = split_by_image(vlind, samples, digests, 3, seed=0, data_digest="d")
    assert len(split.dev) == 4  # whole instances of two images each, until at least 3
    for k in range(0, 10, 2):
        pair = {f"digest-im{k}", f"digest-im{k + 1}"}
        assert pair <= set(split.dev) or pair <= set(split.test)


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    (root / "images").mkdir()
    g = torch.Generator().manual_seed(2)
    rows = []
    for k in range(6):
        name = f"im{k}.png"
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "images" / name)
        for obj, label in (("cat", "yes"), ("dog", "no")):
            rows.append({"question_id": len(rows) + 1, "image": name, "text": f"Is there a {obj}?", "label": label})
    (root / "q.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _tune(model, root, out, cm):
    return tune(
        "pope", str(model), root / "q.json", images=root / "images", out=out, rows=parse_rows("vcd"),
        rule=rule_for("pope"), overrides={"vcd": {"noise_step": (999,)}}, budget=2, dev_images=2, split_seed=1,
        generation={"max_new_tokens": 2}, log=lambda _: None, causalmm=cm,
    )  # fmt: skip


def test_a_killed_tune_resumes_to_the_same_tuning_json(model_dirs, loaded, pope_root, tmp_path):
    root, _ = pope_root
    cm = loaded("llava", "sdpa")
    first = _tune(model_dirs["llava"], root, tmp_path / "a", cm)
    text = (tmp_path / "a" / "tuning.json").read_text()
    assert first["split"]["n_dev_images"] == 2 and len(first["grid"]["vcd"]) == 2
    dev = {d for d, _ in first["split"]["dev"]}
    for entries in first["grid"].values():
        for e in entries:
            records = [
                json.loads(x) for x in (tmp_path / "a" / e["run"] / "predictions.jsonl").read_text().splitlines()
            ]
            assert len(records) == 4 and {r["image_digest"] for r in records} <= dev
    # a kill: the second setting's folder half written, the tuning.json never written
    run = tmp_path / "a" / first["grid"]["vcd"][1]["run"]
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run / "predictions.jsonl").write_text("".join(lines[:1]))
    (run / "metrics.json").unlink()
    (tmp_path / "a" / "tuning.json").unlink()
    shutil.rmtree(tmp_path / "a" / first["grid"]["vcd"][0]["run"])
    _tune(model_dirs["llava"], root, tmp_path / "a", cm)
    assert (tmp_path / "a" / "tuning.json").read_text() == text
    with pytest.raises(BenchmarkError, match="another --dev-images|other data or another split"):
        tune(
            "pope", str(model_dirs["llava"]), root / "q.json", images=root / "images", out=tmp_path / "a",
            rows=parse_rows("vcd"), rule=rule_for("pope"), budget=1, dev_images=3, split_seed=1,
            generation={"max_new_tokens": 2}, log=lambda _: None, causalmm=cm,
        )  # fmt: skip


def test_tune_and_eval_tuned_from_the_command_line(model_dirs, pope_root, tmp_path, causalmm_cli):
    root, rows = pope_root
    model = model_dirs["llava"]
    common = ["--model", model, "--images", root / "images", "--max-new-tokens", "2", "--no-progress"]
    proc = causalmm_cli(
        "tune", "pope", "--data", root / "q.json", "--out", tmp_path / "t", "--methods", "causalmm/language",
        "--budget", "2", "--dev-images", "2", "--grid", "causalmm/language.language_layers=all", *common,
    )  # fmt: skip
    assert "wrote" in proc.stdout
    tuning = json.loads((tmp_path / "t" / "tuning.json").read_text())
    # the same tune over two processes (each dev run's samples dealt between them) chooses from the same numbers
    causalmm_cli(
        "tune", "pope", "--data", root / "q.json", "--out", tmp_path / "t2", "--methods", "causalmm/language",
        "--budget", "2", "--dev-images", "2", "--grid", "causalmm/language.language_layers=all", *common,
        "--num-processes", "2",
    )  # fmt: skip
    two = json.loads((tmp_path / "t2" / "tuning.json").read_text())
    assert {k: v for k, v in two.items() if k != "command"} == {k: v for k, v in tuning.items() if k != "command"}
    assert "--num-processes" not in two["command"]
    assert [e["settings"]["language_layers"] for e in tuning["grid"]["causalmm/language"]] == ["all", "all"]
    test = {d for d, _ in tuning["split"]["test"]}

    def ev(out, data, *extra, tokens="2", check=True, tuned=True):
        return causalmm_cli(
            "eval", "pope", "--out", out, "--tuned" if tuned else "--test-split", tmp_path / "t" / "tuning.json",
            "--data", data, "--model", model, "--images", root / "images", "--max-new-tokens", tokens, "--no-progress",
            *extra, check=check,
        )  # fmt: skip

    ev(tmp_path / "e", root / "q.json", "--method", "causalmm/language")
    info = json.loads((tmp_path / "e" / "run.json").read_text())
    assert info["subset"]["name"] == "test" and info["subset"]["n_images"] == 4
    assert info["config"] == {**info["config"], **tuning["chosen"]["causalmm/language"]["settings"]}
    records = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["image_digest"] for r in records} <= test
    # another file that asks about a dev image is refused; one of test images alone runs whole
    dev_names = {n for _, n in tuning["split"]["dev"]}
    mixed = [r for r in rows if r["image"] in dev_names][:1] + [r for r in rows if r["image"] not in dev_names][:2]
    (tmp_path / "mixed.json").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    bad = ev(tmp_path / "m", tmp_path / "mixed.json", "--method", "causalmm/language", check=False)
    assert bad.returncode == 2 and "image(s) of the dev split of --tuned" in bad.stderr, bad.stderr
    clean = [r for r in rows if r["image"] not in dev_names][:2]
    (tmp_path / "clean.json").write_text("".join(json.dumps(r) + "\n" for r in clean))
    ev(tmp_path / "c", tmp_path / "clean.json", "--method", "causalmm/language")
    assert "subset" not in json.loads((tmp_path / "c" / "run.json").read_text())
    # a baseline the tune did not run (regular sampled) on the same test images
    ev(tmp_path / "s", root / "q.json", "--method", "regular", "--do-sample", tuned=False)
    sampled = json.loads((tmp_path / "s" / "run.json").read_text())
    assert sampled["subset"] == info["subset"] and sampled["generation"]["do_sample"] is True
    for extra, tokens, message in [
        (["--method", "causalmm/language", "--gamma", "2"], "2", "--tuned fixes the decoding settings; drop --gamma"),
        (["--method", "vcd"], "2", "no choice for --method 'vcd'"),
        (["--method", "causalmm/language"], "3", "max_new_tokens 2 there, 3 here"),
        (["--method", "causalmm/language", "--test-split", tmp_path / "t"], "2", "drop --test-split"),
    ]:
        proc = ev(tmp_path / "x", root / "q.json", *extra, tokens=tokens, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
