"""Scale-out on accelerate (CPU, gloo): a run split over 2 processes gives what 1 process gives; a killed
multi-process run resumes with another process count; a mismatched resume is refused before launching."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from causalmm.benchmarks.run_folder import RunLockedError, lock_run_folder

N_QUESTIONS = 10


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope_mp")
    g = torch.Generator().manual_seed(3)
    (root / "images").mkdir()
    rows = []
    for i in range(N_QUESTIONS):
        name = f"{i // 2}.png"
        if not (root / "images" / name).exists():
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / "images" / name)
        label = "yes" if i % 2 == 0 else "no"
        rows.append({"question_id": i + 1, "image": name, "text": f"Is there a thing {i} here?", "label": label})
    (root / "q.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def args_for(model, data, out, *extra):
    return [
        "eval", "pope", "--model", str(model), "--data", str(data / "q.json"), "--images", str(data / "images"),
        "--out", str(out), "--max-new-tokens", "3", "--language-layers", "all", "--do-sample", "--no-progress",
        *extra,
    ]  # fmt: skip


def predictions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(model_dirs, pope_data, tmp_path_factory, causalmm_cli):
    out = tmp_path_factory.mktemp("mp") / "single"
    causalmm_cli(*args_for(model_dirs["llava"], pope_data, out, "--batch-size", "3"))
    return out


def test_two_processes_give_the_single_process_predictions_and_metrics(
    single, model_dirs, pope_data, tmp_path, causalmm_cli
):
    out = tmp_path / "two"
    proc = causalmm_cli(*args_for(model_dirs["llava"], pope_data, out, "--num-processes", "2", "--batch-size", "2"))
    assert proc.stdout.count("| accuracy |") == 1  # the report is printed once, by the main process
    assert predictions(out) == predictions(single)  # sampling too: per-sample seeds
    assert (
        json.loads((out / "metrics.json").read_text())["metrics"]
        == json.loads((single / "metrics.json").read_text())["metrics"]
    )
    assert not list(out.glob("predictions.part*.jsonl"))  # shards merged away


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_killed_worker_then_resume_with_another_process_count(single, model_dirs, pope_data, tmp_path, causalmm_cli):
    out = tmp_path / "killed"
    args = args_for(model_dirs["llava"], pope_data, out, "--batch-size", "1")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "causalmm",
        *args,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        shards = list(out.glob("predictions.part*.jsonl"))
        if sum(len(p.read_text().splitlines()) for p in shards) >= 2:
            break
        time.sleep(0.02)
    workers = [p for p in _descendants(proc.pid) if "causalmm" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers, "no worker process found"
    # under a user's `accelerate launch` the main process holds the folder's lock for all of them
    with pytest.raises(RunLockedError, match="in use by another causalmm eval"):
        with lock_run_folder(out):
            pass
    os.kill(workers[-1], signal.SIGKILL)  # one worker dies; the launcher tears the other down
    proc.wait(timeout=120)
    assert proc.returncode != 0
    n_done = sum(len(p.read_text().splitlines()) for p in out.glob("predictions.part*.jsonl"))
    assert 2 <= n_done < N_QUESTIONS, "the run must be killed part-way for this test to mean anything"
    assert not (out / "metrics.json").exists()
    causalmm_cli(*args)  # resume with ONE process: it merges the two shards and does the rest
    assert predictions(out) == predictions(single)
    assert (
        json.loads((out / "metrics.json").read_text())["metrics"]
        == json.loads((single / "metrics.json").read_text())["metrics"]
    )


def test_mismatched_resume_is_refused_before_launching(single, model_dirs, pope_data, causalmm_cli):
    proc = causalmm_cli(
        *args_for(model_dirs["llava"], pope_data, single, "--num-processes", "2", "--gamma", "3"), check=False
    )
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "holds a different run" in err and "gamma" in err and "Traceback" not in proc.stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; kill -9 relies on PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_launcher_stops_its_workers_and_frees_the_folder(
    sig, single, model_dirs, pope_data, tmp_path, causalmm_cli
):
    """`causalmm eval --num-processes 2` killed (SIGTERM as a scheduler does, or kill -9): no worker outlives it,
    nobody holds the folder afterwards, and the run resumes to the single-process result."""
    out = tmp_path / "launched"
    args = args_for(model_dirs["llava"], pope_data, out, "--batch-size", "1", "--num-processes", "2")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "causalmm", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if sum(len(p.read_text().splitlines()) for p in out.glob("predictions.part*.jsonl")) >= 1:
            break
        time.sleep(0.02)
    spawned = _descendants(proc.pid)  # accelerate's launcher and the two workers (in sessions of their own)
    assert len(spawned) >= 3, spawned
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    deadline = time.time() + 90
    while any(_alive(p) for p in spawned) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in spawned if _alive(p)], "a process of the run outlived its launcher"
    n_done = sum(len(p.read_text().splitlines()) for p in out.glob("predictions.part*.jsonl"))
    assert n_done < N_QUESTIONS and not (out / "metrics.json").exists()
    # free again: the kernel drops the lock once the last process holding its descriptor has exited, which can
    # trail the processes' deaths by a moment on a loaded machine (a stale lock would never free)
    deadline = time.time() + 60
    while True:
        try:
            with lock_run_folder(out):
                break
        except RunLockedError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    if sig == signal.SIGTERM:
        causalmm_cli(*args_for(model_dirs["llava"], pope_data, out, "--batch-size", "1"))
        assert predictions(out) == predictions(single)


def test_a_held_folder_refuses_the_launcher_before_it_launches(single, model_dirs, pope_data, causalmm_cli):
    hold = "import sys, time\nfrom pathlib import Path\nfrom causalmm.benchmarks.run_folder import lock_run_folder\n"
    hold += "with lock_run_folder(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(single)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = causalmm_cli(*args_for(model_dirs["llava"], pope_data, single, "--num-processes", "2"), check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"in use by another causalmm eval (pid {holder.pid} " in " ".join(proc.stderr.split())


def test_engine_under_accelerate_dispatch_hooks_matches_plain_loading(model_dirs, loaded, images, tmp_path):
    """Model parallelism (`device_map`) runs the model through accelerate's dispatch hooks; on CPU we exercise
    the same hooks by offloading two LLM layers to disk. CausalMM must give the same tokens."""
    from causalmm import CausalMM, CausalMMConfig

    cfg = CausalMMConfig(language_layers="all")
    ref = loaded("llava", "sdpa").with_config(cfg).generate(images[0], "Is there a cat?", max_new_tokens=6)
    lm = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{lm}.embed_tokens": "cpu",
                  f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "disk", f"{lm}.layers.2": "cpu", f"{lm}.layers.3": "disk",
                  f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    cm = CausalMM.from_pretrained(str(model_dirs["llava"]), cfg, device_map=device_map, offload_folder=str(tmp_path))
    assert hasattr(cm.model.model.language_model.layers[1], "_hf_hook")  # really dispatched
    out = cm.generate(images[0], "Is there a cat?", max_new_tokens=6)
    assert out.token_ids == ref.token_ids
