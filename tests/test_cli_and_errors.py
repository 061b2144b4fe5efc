"""The CLI as a user runs it, and bad input turned into one clear line."""

import json
import subprocess

import pytest
import torch
from PIL import Image

from causalmm import CausalMMConfig, ConfigError, InputError
from causalmm.adapters import UnsupportedModelError, get_adapter


def test_cli_generate_json_is_one_object_matching_the_api(model_dirs, image_file, loaded, causalmm_cli):
    args = ["generate", "--model", str(model_dirs["llava"]), "--image", str(image_file)]
    args += ["--prompt", "Is there a cat?", "--max-new-tokens", "5", "--mode", "language", "--json"]
    args += ["--attention", "eager", "--language-layers", "all"]
    proc = causalmm_cli(*args)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert {"text", "token_ids", "method", "config"} <= payload.keys()
    assert payload["method"] == "causalmm" and payload["config"]["mode"] == "language"
    cfg = CausalMMConfig(mode="language", language_layers="all")
    api = loaded("llava").with_config(cfg).generate(str(image_file), "Is there a cat?", max_new_tokens=5)
    assert payload["token_ids"] == api.token_ids and payload["text"] == api.text


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_cli_generate_plain_text_other_families(family, model_dirs, image_file, causalmm_cli):
    proc = causalmm_cli(
        "generate",
        "--model",
        str(model_dirs[family]),
        "--image",
        str(image_file),
        "--prompt",
        "Describe it.",
        "--method",
        "vcd",
        "--max-new-tokens",
        "3",
        "--do-sample",
        "--seed",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")


@pytest.mark.parametrize(
    ("flags", "config", "options"),
    [
        (["--mode", "language", "--num-beams", "3", "--early-stopping", "never", "--length-penalty", "0.5"],
         {"mode": "language"},
         {"num_beams": 3, "early_stopping": "never", "length_penalty": 0.5}),
        (["--method", "opera", "--param", "candidates=2"], {"method": "opera", "params": {"candidates": 2}}, {}),
    ],
)  # fmt: skip
def test_cli_beam_searches_match_the_api(flags, config, options, model_dirs, image_file, loaded, causalmm_cli):
    args = ["generate", "--model", str(model_dirs["llava"]), "--image", str(image_file), "--prompt", "Describe it."]
    args += ["--max-new-tokens", "6", "--attention", "eager", "--json", *flags]
    payload = json.loads(causalmm_cli(*args).stdout)
    api = loaded("llava").with_config(CausalMMConfig(**config))
    want = api.generate(str(image_file), "Describe it.", max_new_tokens=6, **options)
    assert payload["token_ids"] == want.token_ids


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--method", "magic"], ["method='magic'", "regular"]),
        (["--mode", "both"], ["mode='both'", "multimodal"]),
        (["--vision-cf", "noise"], ["vision_cf='noise'", "shuffle"]),
        (["--gamma", "-1"], ["gamma=-1.0", ">= 0"]),
        (["--epsilon", "1.5"], ["epsilon=1.5", "[0, 1]"]),
        (["--language-layers", "40"], ["language layer index 40", "4 layers"]),
        (["--mode", "vision", "--vision-layers", "2"], ["vision layer index 2", "2 layers"]),
        (["--language-layers", "x-y"], ["cannot read"]),
        (["--num-beams", "2", "--do-sample"], ["do_sample=False"]),
        (["--num-beams", "2", "--early-stopping", "soon"], ["--early-stopping 'soon'", "never"]),
        (["--method", "opera", "--param", "beams=1"], ["beams=1", ">= 2"]),
    ],
)
def test_cli_bad_config_is_one_line(extra, needles, model_dirs, image_file, causalmm_cli):
    args = ["generate", "--model", str(model_dirs["llava"]), "--image", str(image_file), "--prompt", "hi", *extra]
    _one_line_error(causalmm_cli(*args, check=False), *needles)


def test_cli_bad_inputs_are_one_line(model_dirs, image_file, tmp_path, causalmm_cli):
    base = ["generate", "--model", str(model_dirs["llava"]), "--prompt", "hi"]
    _one_line_error(
        causalmm_cli(*base, "--image", str(tmp_path / "nope.jpg"), check=False), "image not found", "nope.jpg"
    )
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    _one_line_error(causalmm_cli(*base, "--image", str(bad), check=False), "cannot read image")
    _one_line_error(
        causalmm_cli(
            "generate", "--model", str(model_dirs["llava"]), "--image", str(image_file), "--prompt", "  ", check=False
        ),
        "prompt is empty",
    )
    _one_line_error(
        causalmm_cli(
            "generate", "--model", "someone/some-vlm", "--image", str(image_file), "--prompt", "hi", check=False
        ),
        "HF_HUB_OFFLINE",
        "someone/some-vlm",
    )


def test_text_only_model_is_refused_clearly(tmp_path, image_file, causalmm_cli):
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalmm.tiny import build_tokenizer

    tok = build_tokenizer("llava")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proc = causalmm_cli("generate", "--model", str(tmp_path), "--image", str(image_file), "--prompt", "hi", check=False)
    _one_line_error(proc, "cannot load", "vision-language")


def test_family_without_precomputed_features_is_refused():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    with pytest.raises(UnsupportedModelError, match="mm_encoder_outputs"):
        get_adapter(CLIPModel(cfg), processor=None)


def test_api_errors(loaded, images, tmp_path):
    cm = loaded("llava")
    with pytest.raises(InputError, match="prompt 0 is empty"):
        cm.generate(images[0], "")
    with pytest.raises(InputError, match="image not found"):
        cm.generate(tmp_path / "missing.png", "hi")
    with pytest.raises(InputError, match="unknown generation option"):
        cm.generate(images[0], "hi", beams=3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        cm.generate(images[0], "hi", max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        cm.generate(images[0], "hi", do_sample=True, top_p=1.5)
    with pytest.raises(ConfigError, match="head index 9"):
        cm.with_config(CausalMMConfig(mode="language", language_heads=[9]))
    with pytest.raises(ConfigError, match="num_cf_samples"):
        CausalMMConfig(num_cf_samples=0)
    with pytest.raises(ConfigError, match="unknown config field"):
        CausalMMConfig.from_dict({"gamma": 1.0, "alpha": 2})
    assert CausalMMConfig.from_dict(CausalMMConfig(language_layers=[1, 2]).to_dict()) == CausalMMConfig(
        language_layers=[1, 2]
    )


def test_layer_specs():
    from causalmm import resolve_layers

    assert resolve_layers("middle", 32) == list(range(11, 21))
    assert resolve_layers("shallow", 6) == [0, 1]
    assert resolve_layers("deep", 6) == [4, 5]
    assert resolve_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert resolve_layers("2:4", 8) == [2, 3]
    assert resolve_layers(-1, 8) == [7]
    assert resolve_layers(None, 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers([8], 8)


def test_plumbing_demo_runs_and_labels_random_weights(tmp_path, causalmm_cli):
    proc = causalmm_cli("plumbing", "--out", str(tmp_path), "--max-new-tokens", "3")
    assert "RANDOM WEIGHTS" in proc.stdout
    for name in ("regular", "vcd", "causalmm/vision", "causalmm/joint"):
        assert name in proc.stdout
    assert torch.__version__  # the demo ran in the same environment as the tests


def test_cli_unknown_attention_is_refused_before_loading(tmp_path, image_file, causalmm_cli):
    # the model does not exist: the flag is checked first, naming the valid ones
    args = ["--model", str(tmp_path / "no-model"), "--image", str(image_file), "--prompt", "hi", "--attention", "foo"]
    _one_line_error(causalmm_cli("generate", *args, check=False), "--attention 'foo'", "sdpa, eager")


def test_cli_output_paths_that_cannot_be_written(model_dirs, image_file, tmp_path, causalmm_cli):
    base = ["--model", str(model_dirs["llava"]), "--image", str(image_file), "--prompt", "hi"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(
        causalmm_cli("explain", *base, "--html", str(tmp_path), check=False), "--html", "is a directory", "report.html"
    )
    _one_line_error(causalmm_cli("visualize", *base, "--out", str(tmp_path), check=False), "--out", "is a directory")
    _one_line_error(
        causalmm_cli("visualize", *base, "--out", str(blocker / "x.png"), check=False), "a-file is a file, not a dir"
    )
    # a full disk: found only when writing, after the work
    _one_line_error(
        causalmm_cli("visualize", *base, "--out", "/dev/full", check=False), "/dev/full", "No space left on device"
    )


def test_cli_bad_images_and_long_prompts_are_one_line(model_dirs, image_file, tmp_path, causalmm_cli, monkeypatch):
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 500)).save(thin)
    qwen = ["generate", "--model", str(model_dirs["qwen2_vl"]), "--prompt", "hi", "--max-new-tokens", "2"]
    proc = causalmm_cli(*qwen, "--image", str(thin), check=False)
    # the tiny Qwen processor's own notice (loaded image-only) may come first; the error is then one line
    errors = [ln for ln in proc.stderr.splitlines() if "image-only" not in ln]
    _one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, "\n".join(errors)),
        "1x500 pixels",
        "aspect ratio",
        "200",
    )
    llava = ["generate", "--model", str(model_dirs["llava"]), "--image", str(image_file)]
    _one_line_error(
        causalmm_cli(*llava, "--prompt", "cat " * 1100, check=False), "too long", "but the LLM has 1024", "shorten"
    )
    _one_line_error(causalmm_cli(*llava, "--prompt", "hi", "--image", str(tmp_path), check=False), "is a directory")
    monkeypatch.setenv("CAUSALMM_MAX_IMAGE_PIXELS", "100")
    _one_line_error(
        causalmm_cli(*llava, "--prompt", "hi", check=False), "more than the limit of 100", "CAUSALMM_MAX_IMAGE_PIXELS=0"
    )


def test_cli_safety_net_turns_os_errors_the_user_caused_into_one_line(tmp_path, causalmm_cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["toyworld", "splits", "--val-images", "1", "--test-images", "1", "--out"]
    # a file as --out is refused up front now; a path below a file still reaches the safety net at the write
    _one_line_error(causalmm_cli(*args, str(blocker), check=False), f"--out {blocker} is a file; give a folder")
    _one_line_error(causalmm_cli(*args, str(blocker / "sub"), check=False), "not a directory", str(blocker / "sub"))


def test_user_os_error_lines_name_the_path_and_leave_bugs_alone():
    import errno

    from causalmm.cli import user_os_error

    line = user_os_error(PermissionError(errno.EACCES, "Permission denied", "/data/out.png"))
    assert line == "permission denied: /data/out.png; check the permissions, or choose another path"
    assert "/a -> /b" in user_os_error(FileExistsError(errno.EEXIST, "File exists", "/a", None, "/b"))
    assert "(the path was not reported)" in user_os_error(OSError(errno.ENOSPC, "No space left on device"))
    assert user_os_error(OSError(errno.EROFS, "Read-only file system", "/ro")).endswith("write elsewhere")
    assert user_os_error(OSError(errno.EIO, "Input/output error", "/x")) is None  # not the user's doing
    assert user_os_error(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None  # commands name those
    assert user_os_error(RuntimeError("a bug")) is None


def test_help_and_a_missing_option_load_no_model_code():
    """``causalmm --help`` and an incomplete command line end without importing torch: the safety net's error
    types load only when an exception reaches it (SystemExit, which ends every run, is not one)."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom causalmm.cli import main\nsys.argv = ['causalmm', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    for args, code in ((["--help"], 0), (["generate", "--prompt", "x"], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert proc.stdout.splitlines()[-1] == f"exit {code} False", (args, proc.stdout[-500:], proc.stderr[-500:])


def test_messages_print_brackets_as_written(model_dirs, tmp_path, causalmm_cli):
    """Rich reads "[cat]" as markup: an error naming such a path lost it ("/x/.png"), as the app's help lost [app]."""
    missing = tmp_path / "photos" / "[cat].png"
    proc = causalmm_cli("generate", "--model", model_dirs["llava"], "--image", missing, "--prompt", "hi", check=False)
    _one_line_error(proc, "[cat].png")
    odd = tmp_path / "[run]"
    odd.write_text("a file")
    _one_line_error(causalmm_cli("demo", "--out", odd, check=False), f"--out {odd} is a file")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lamb", "0.5"], "--lamb is a parameter of m3id, avisc, not a flag of its own: give --param lamb=0.5"),
        (["--candidates=7"], "--candidates is a parameter of opera, not a flag of its own: give --param candidates=7"),
    ],
)
def test_a_methods_own_parameter_typed_as_a_flag_is_answered_with_param(args, needle, causalmm_cli):
    for command in (["generate", "--image", "i.png", "--prompt", "hi"], ["eval", "pope", "--data", "d", "--out", "o"]):
        _one_line_error(causalmm_cli(*command, "--model", "m", *args, check=False), needle)
