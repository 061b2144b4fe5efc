"""The lmms-eval plugin end to end, offline: the toy world's POPE questions as a local lmms-eval task (a parquet in
the lmms-lab/POPE layout and a task YAML for --include_path), answered in-process and through the `lmms-eval`
command, answer for answer as `causalmm eval pope` answers them; `causalmm score pope` reads the logged samples."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("CI"):
        pytest.fail("lmms-eval is not installed in CI: `make test` installs it (the lmms extra, lmms-eval --no-deps)")
    pytest.skip(
        'lmms-eval is not installed: pip install "causalmm[lmms]" && pip install --no-deps "lmms-eval>=0.7.3,<0.8"',
        allow_module_level=True,
    )

from PIL import Image  # noqa: E402

from causalmm import CausalMMConfig  # noqa: E402
from causalmm.benchmarks.evaluate import RunSpec, evaluate  # noqa: E402
from causalmm.benchmarks.lmms_samples import read_lmms_pope_samples  # noqa: E402
from causalmm.lmms.task import write_pope_task  # noqa: E402
from causalmm.toyworld import WorldConfig, write_splits  # noqa: E402

TOY = str(Path(__file__).resolve().parents[1] / "src" / "causalmm" / "toyworld" / "model")
TASK = "toy_pope"

#: (model, model_args for lmms-eval, the same as a CausalMMConfig, lmms-eval gen_kwargs, causalmm eval generation)
CASES = {
    "regular": ("toy", {"method": "regular"}, CausalMMConfig(method="regular"), None, None),
    "causalmm": (
        "toy",
        {"method": "causalmm", "mode": "multimodal", "language_layers": "all", "gamma": 4, "epsilon": 0.01},
        CausalMMConfig(method="causalmm", mode="multimodal", language_layers="all", gamma=4, epsilon=0.01),
        None,
        None,
    ),
    # The toy model is too sure of its yes/no for any seed to change an answer. The tiny random-weight model,
    # sampling, answers otherwise under other seeds: there the answers prove the seeds agree too. `until=`
    # (no stop string) as causalmm eval has none.
    "causalmm-sampled": (
        "tiny",
        {"method": "causalmm", "mode": "multimodal", "gamma": 2},
        CausalMMConfig(method="causalmm", mode="multimodal", gamma=2.0),
        "temperature=1.0,do_sample=true,until=",
        {"do_sample": True, "temperature": 1.0},
    ),
}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The toy world's random-split POPE questions on 2 test images (12 questions) as a local lmms-eval task."""
    root = tmp_path_factory.mktemp("toy")
    write_splits(root / "splits", WorldConfig(), n_images_val=1, n_images_test=2)
    test = root / "splits" / "test"
    parquet, _ = write_pope_task(root / "task", test / "pope_random.jsonl", test / "images", task=TASK)
    return {"folder": root / "task", "parquet": parquet, "root": root}


def _eval(task, model, cfg, generation, name):
    """`causalmm eval pope --seed S` (the run seed is the config's, as on the command line) on the task's parquet:
    its prediction records."""
    out = task["root"] / f"eval-{name}"
    spec = RunSpec("pope", model, task["parquet"], config=cfg, generation=generation, seeds=(cfg.seed,))
    evaluate(spec, out=out, batch_size=5, progress=False, n_boot=0)
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _lmms_texts(samples):
    records = read_lmms_pope_samples(list(enumerate(samples, 1)), Path("in-process"))
    return {r["id"]: r["text"] for r in records}


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_answers_equal_causalmm_eval(task, model_dirs, case):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from causalmm.lmms.model import CausalMMLmms

    model, model_args, cfg, gen_kwargs, generation = CASES[case]
    path = TOY if model == "toy" else str(model_dirs["llava"])
    lm = CausalMMLmms(pretrained=path, batch_size=4, device="cpu", **model_args)
    result = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task["folder"])),
                             log_samples=True, gen_kwargs=gen_kwargs)  # fmt: skip
    got = _lmms_texts(result["samples"][TASK])
    assert len(got) == 12
    out = _eval(task, path, cfg, generation, case)
    assert got == {r["id"]: r["text"] for r in out}
    # every request had the sample and image seed causalmm eval gives its question
    by_id = {str(d["question_id"]): i for i, d in enumerate(lm.task_dict[TASK]["test"])}
    assert {r["id"]: lm.seeds[(TASK, by_id[r["id"]])] for r in out} == {
        r["id"]: (r["sample_seed"], r["image_seed"]) for r in out
    }
    if generation:  # the seeds matter here: another run seed answers otherwise
        other = _eval(task, path, cfg.replace(seed=1), generation, case + "-seed1")
        assert got != {r["id"]: r["text"] for r in other}


def test_lmms_eval_command_and_score(task, causalmm_cli, tmp_path):
    """The documented command, batch_size among the model_args (lmms-eval also hands the model its --batch_size
    default: the two once collided in a "multiple values" TypeError, a traceback and exit code 0)."""
    args = "pretrained=" + TOY + ",method=causalmm,mode=multimodal,gamma=1,language_layers=0-1,vision_layers=-1"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "causalmm", "--model_args", args + ",batch_size=8",
           "--tasks", TASK, "--include_path", str(task["folder"]), "--output_path", str(tmp_path / "out"),
           "--log_samples"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    # lmms-eval exits 0 even when the evaluation failed: its results file says whether it ran
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert proc.returncode == 0 and len(results) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 prompt(s) per batch" in proc.stdout + proc.stderr
    metrics = json.loads(results[0].read_text())["results"][TASK]
    samples_file = next((tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl"))
    lines = [json.loads(line) for line in samples_file.read_text().splitlines()]
    cfg = CausalMMConfig(method="causalmm", mode="multimodal", gamma=1.0, language_layers="0-1", vision_layers=-1)
    assert _lmms_texts(lines) == {r["id"]: r["text"] for r in _eval(task, TOY, cfg, None, "cli")}
    # lmms-eval's yes-ratio counts the labels, not the answers
    labels = [line["target"] for line in lines]
    assert metrics["pope_yes_ratio,none"] == pytest.approx(labels.count("yes") / len(labels))
    causalmm_cli("score", "pope", samples_file, "--data", task["parquet"], "--out", tmp_path / "score")
    scored = json.loads((tmp_path / "score" / "metrics.json").read_text())["metrics"]
    ours = json.loads((task["root"] / "eval-cli" / "metrics.json").read_text())["metrics"]
    assert {k: scored[k] for k in ("accuracy", "f1", "yes_ratio", "n")} == {
        k: ours[k] for k in ("accuracy", "f1", "yes_ratio", "n")
    }


def test_two_processes_answer_as_one(task, tmp_path):
    """`accelerate launch` with 2 processes (CPU, gloo): lmms-eval deals the docs by rank, and every answer is the
    one `causalmm eval` gives (seeds depend on the question, not on the process that answered it)."""
    args = "pretrained=" + TOY + ",method=causalmm,mode=multimodal,gamma=1,language_layers=0-1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval",
           "--model", "causalmm", "--model_args", args, "--tasks", TASK, "--include_path", str(task["folder"]),
           "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    samples = list((tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl"))
    assert proc.returncode == 0 and len(samples) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6/6" in proc.stderr  # the main process answered its half
    lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
    cfg = CausalMMConfig(method="causalmm", mode="multimodal", gamma=1.0, language_layers="0-1")
    assert _lmms_texts(lines) == {r["id"]: r["text"] for r in _eval(task, TOY, cfg, None, "two-processes")}


@pytest.mark.parametrize(
    ("model_args", "flags", "message"),
    [
        ("gama=1", [], "unknown model_args key(s) gama for --model causalmm; valid keys:"),
        ("batch_size=4", ["--batch_size", "8"], "batch_size is given twice, batch_size=4 in --model_args and --batch_"),
        ("", ["--batch_size", "auto"], "batch_size='auto': give a whole number >= 1 (batch_size=auto is not"),
    ],
)
def test_bad_model_args_through_the_command_are_one_line_and_exit_2(task, tmp_path, model_args, flags, message):
    """lmms-eval prints the traceback of any exception and exits 0; the plugin's refusals end the run instead."""
    args = ",".join(a for a in (f"pretrained={TOY}", model_args) if a)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "causalmm", "--model_args", args, *flags,
           "--tasks", TASK, "--include_path", str(task["folder"]), "--output_path", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*_results.json"))


def test_model_args_and_the_command_lines_options_build_the_model(task):
    """lmms-eval builds the model from the model_args string and its own --batch_size/--max_batch_size/--device
    (create_from_arg_string); from Python a refusal is raised, not turned into an exit."""
    from causalmm.inputs import InputError
    from causalmm.lmms.args import ModelArgsError
    from causalmm.lmms.model import CausalMMLmms

    cli = {"batch_size": 1, "max_batch_size": None, "device": None}
    assert CausalMMLmms.create_from_arg_string(f"pretrained={TOY},batch_size=4,device=cpu", cli).batch_size == 4
    lm = CausalMMLmms.create_from_arg_string({"pretrained": TOY}, {**cli, "batch_size": "3", "device": "cpu"})
    assert (lm.batch_size, str(lm.device)) == (3, "cpu")
    with pytest.raises(ModelArgsError, match="give key=value pairs separated by commas"):
        CausalMMLmms.create_from_arg_string(f"pretrained={TOY},eager", cli)
    with pytest.raises(InputError, match="device 'gpu' is not a device torch knows"):
        CausalMMLmms.create_from_arg_string(f"pretrained={TOY},device=gpu", cli)


def _request(doc_to_visual, task="toy_pope", gen_kwargs=None):
    from lmms_eval.api.instance import Instance

    args = ("Is there a kite?", gen_kwargs or {"until": ["\n\n"]}, doc_to_visual, 0, task, "test")
    return Instance("generate_until", args, 0, metadata={"task": task, "doc_id": 0, "repeats": 1})


def test_refused_requests_name_the_problem(task):
    from causalmm.lmms.model import CausalMMLmms, UnsupportedRequestError

    lm = CausalMMLmms(pretrained=TOY, device="cpu")
    image = Image.new("RGB", (32, 32))
    lm.task_dict = {TASK: {"test": [{"question_id": "1"}]}}
    with pytest.raises(UnsupportedRequestError, match="gives 2 images; causalmm answers about exactly one image"):
        lm.generate_until([_request(lambda doc: [image, image])])
    with pytest.raises(UnsupportedRequestError, match="gives video input"):
        lm.generate_until([_request(lambda doc: ["clip.mp4"])])
    with pytest.raises(UnsupportedRequestError, match="num_beams=3 with temperature=0.5"):
        lm.generate_until([_request(lambda doc: [image], gen_kwargs={"num_beams": 3, "temperature": 0.5})])
    with pytest.raises(UnsupportedRequestError, match="the loglikelihood / multiple_choice tasks \\(seedbench_ppl"):
        lm.loglikelihood([_request(lambda doc: [image])])
    # one image given as a PIL image outside any data set: seeded by its pixels, answered
    assert lm.generate_until([_request(lambda doc: [image], gen_kwargs={"max_new_tokens": 3})])[0] is not None
