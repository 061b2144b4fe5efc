"""The benchmark scripts run from a clone with one command each (tiny preset: seconds). Their numbers are
not checked here (speed lives in speed/, never in tests); their tables and the prediction check are."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, preset: str = "tiny") -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "speed" / script), "--preset", preset, *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(table: str, key_columns: int = 1) -> dict[str, list[str]]:
    """The markdown table's body rows, keyed by their first ``key_columns`` cells joined by a space."""
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[1:]]
    return {" ".join(r[:key_columns]): r for r in rows}


def test_decode_speed_prints_every_configuration_with_ratios():
    only = "regular,language K=1,multimodal K=1,sequential ref. multimodal"
    out = _run("decode_speed.py", "--new-tokens", "3", "--reps", "1", "--only", only)
    rows = _rows(out)
    want = [
        "regular greedy",
        "causalmm language K=1",
        "causalmm language K=1, no layer sharing",
        "causalmm multimodal K=1",
        "causalmm multimodal K=1, no layer sharing",
        "causalmm multimodal K=1, full head",
        "regular greedy, eager attention",
        "causalmm multimodal K=1, eager attention",
        "regular greedy, DynamicCache",
        "causalmm multimodal K=1, DynamicCache",
        "regular beams 5",
        "causalmm language K=1 beams 5",
        "causalmm multimodal K=1 beams 5",
        "sequential ref. multimodal",
    ]
    assert list(rows) == want
    beams = re.search(r"beam search, per token × regular beams 5: regular beams 5 1\.00, causalmm language K=1 beams 5 "
                      r"(\d+\.\d\d), causalmm multimodal K=1 beams 5 (\d+\.\d\d)$", out, re.M)  # fmt: skip
    assert beams and all(float(x) > 0 for x in beams.groups())
    assert rows["regular greedy"][2] == "1.00"
    assert all(re.fullmatch(r"\d+\.\d\d", r[2]) and float(r[2]) > 0 for r in rows.values())
    assert re.search(r"engine is \d+\.\d\d× faster per token than the sequential reference", out)
    kept = re.search(r"plausible tokens per decode step \(factual row, epsilon 0.1\): median ([\d.]+) of 1024", out)
    assert kept and 1 <= float(kept.group(1)) < 256  # the preset's peaked head: the plausible set is small
    cell = r"([\d.]+) \(([\d.]+)×\)"
    costs = re.findall(rf"^- (F\.linear|W @ x\.T): {cell} / {cell} / {cell}$", out, re.M)
    assert [c[0] for c in costs] == ["F.linear", "W @ x.T"]
    assert costs[0][2] == "1.00" and all(float(x) > 0 for c in costs for x in c[1:])


def test_eval_throughput_runs_the_real_eval_path_and_predictions_agree():
    out = _run("eval_throughput.py", "--images", "2", "--reps", "1", "--max-new-tokens", "2")
    rows = _rows(out, key_columns=2)
    assert len(rows) == 6
    for method in ("regular", "causalmm multimodal"):
        for variant in ("naive", "batched", "reuse"):
            cells = rows[f"{method} {variant}"]
            assert cells[-1] == "yes", cells  # reuse and sharing change no prediction
            assert float(cells[4]) > 0


def test_decode_speed_toyworld_preset_runs_the_shipped_model():
    out = _run("decode_speed.py", "--new-tokens", "3", "--reps", "1", "--only", "vision K=1", preset="toyworld")
    assert "preset toyworld (0.833M params" in out
    rows = _rows(out)
    assert list(rows) == [f"causalmm vision K=1{x}" for x in ("", ", full head", ", eager attention", ", DynamicCache")]


def test_eval_throughput_toyworld_preset_answers_its_own_pope_questions():
    out = _run("eval_throughput.py", "--images", "2", "--reps", "1", preset="toyworld")
    assert "2 images x 6 questions" in out
    rows = _rows(out, key_columns=2)
    assert all(rows[f"{m} {v}"][-1] == "yes" for m in ("regular", "causalmm multimodal") for v in ("naive", "reuse"))


def test_eval_throughput_toyworld_preset_refuses_another_question_count():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "speed" / "eval_throughput.py"), "--preset", "toyworld", "--questions", "4"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--preset toyworld asks its split's own 6 POPE questions per image" in proc.stderr


def test_attention_base_switches_every_attention_call_and_restores_it():
    sys.path.insert(0, str(ROOT / "speed"))
    try:
        from decode_speed import attention_base, build
    finally:
        sys.path.remove(str(ROOT / "speed"))
    import torch

    cm, image, _ = build("tiny", "cpu", torch.float32)
    impls = lambda: {m.config._attn_implementation for m in (*cm.adapter.vision_attn, *cm.adapter.lm_attn)}  # noqa: E731
    assert impls() == {"causalmm_sdpa"}
    with attention_base(cm, "eager"):
        assert impls() == {"causalmm_eager"}
        out = cm.model(**cm.adapter.encode(image, "hi"), output_attentions=True)
        assert all(a is not None for a in out.attentions)  # eager returns the weights sdpa does not
    assert impls() == {"causalmm_sdpa"}
