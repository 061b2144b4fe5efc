"""Loading: checkpoints laid out as the hub and ``transformers`` write them (video processor included) load
without torchvision, image-only and announced once; video input is refused; a device this machine lacks and
broken weights are one-line errors; the KV cache goes under the name the installed transformers expects."""

import inspect
import json
import logging
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import DynamicCache

from causalmm import CausalMM, CausalMMConfig
from causalmm.decoding import cache_kwargs
from causalmm.inputs import InputError
from causalmm.tiny import build_tiny_model

#: family -> (the processor class its hub checkpoints name, the video processor class they name, or None)
REAL = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor"),
    "internvl": ("InternVLProcessor", "InternVLVideoProcessor"),
    "mistral3": ("PixtralProcessor", None),
}
#: nested: one processor_config.json holding every sub-processor, as ``save_pretrained`` of the real class writes it
#: in transformers 5; hub: one file per sub-processor (preprocessor_config.json, video_preprocessor_config.json,
#: chat_template.json), as the checkpoints on the hub carry them
LAYOUTS = ("nested", "hub")
PROMPT = "Is there a cat in the image?"

no_torchvision = pytest.mark.skipif(
    transformers.utils.is_torchvision_available(), reason="torchvision is installed: no fallback is needed"
)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-loading")
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


def _write(path, data):
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def as_real_checkpoint(src, dst, family, layout):
    """Copy a tiny checkpoint into the layout a checkpoint saved by the real processor class has: with the video
    processor's config (the sub-processor the real class requires) and the real class names."""
    shutil.copytree(src, dst)
    processor_cls, video_cls = REAL[family]
    config = json.loads((dst / "processor_config.json").read_text())
    assert config["processor_class"] == processor_cls  # the tiny builder already names the real class
    image = config["image_processor"]
    video = None
    if video_cls is not None:
        keep = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample")
        video = {k: image[k] for k in keep if k in image} | {"video_processor_type": video_cls}
        for key in ("patch_size", "merge_size", "temporal_patch_size", "size"):
            if key in image:
                video[key] = image[key]
    if layout == "nested":
        if video is not None:
            config["video_processor"] = video
        _write(dst / "processor_config.json", config)
        return dst
    del config["image_processor"]
    _write(dst / "preprocessor_config.json", image | {"processor_class": processor_cls})
    if video is not None:
        _write(dst / "video_preprocessor_config.json", video | {"processor_class": processor_cls})
    if set(config) == {"processor_class"}:  # Qwen's hub checkpoints carry no processor_config.json
        (dst / "processor_config.json").unlink()
    else:
        _write(dst / "processor_config.json", config)
    template = dst / "chat_template.jinja"
    _write(dst / "chat_template.json", {"chat_template": template.read_text(encoding="utf-8")})
    template.unlink()
    return dst


def _pil_image_processor(tiny_dir):
    """The PIL (slow) image processor class the checkpoint names, built directly from its saved options."""
    options = dict(json.loads((tiny_dir / "processor_config.json").read_text())["image_processor"])
    name = options.pop("image_processor_type")
    return getattr(transformers, f"{name}Pil")(**options)


@no_torchvision
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(REAL))
def test_real_processor_checkpoint_loads_and_processes_images_as_the_real_class(
    family, layout, tiny_dirs, images, tmp_path
):
    """Before the loader, each of these failed in AutoProcessor with an ImportError ("requires the Torchvision
    library") or, for a layout without a video config, an OSError naming video_preprocessor_config.json."""
    tiny = tiny_dirs(family)
    path = as_real_checkpoint(tiny, tmp_path / family, family, layout)
    cm = CausalMM.from_pretrained(str(path), CausalMMConfig(method="regular"))
    processor_cls = REAL[family][0]
    assert any(
        c.__name__ == processor_cls and c.__module__.startswith("transformers.") for c in type(cm.processor).__mro__
    )
    # pixels exactly as the PIL image processor computes them, token expansion by the real class's own code
    enc = cm.adapter.encode(images[1], PROMPT)
    # PixtralProcessor hands its image processor the merged patch size (patch_size * spatial_merge_size)
    call = {"patch_size": 2 * cm.processor.patch_size} if family == "mistral3" else {}
    ref = _pil_image_processor(tiny)(images=[images[1]], return_tensors="pt", **call)
    shared = [key for key in ref if key in enc]  # the processor may consume some (InternVL's num_patches)
    assert "pixel_values" in shared
    for key in shared:
        assert torch.equal(enc[key], torch.as_tensor(ref[key])), key
    # the same weights behind the tiny checkpoint's layout and this one: the same answer
    plain = CausalMM.from_pretrained(str(tiny), CausalMMConfig(method="regular"))
    got = cm.generate(images[0], PROMPT, max_new_tokens=4).token_ids
    assert got == plain.generate(images[0], PROMPT, max_new_tokens=4).token_ids


@no_torchvision
def test_cli_generates_from_a_hub_layout_checkpoint(tiny_dirs, image_file, causalmm_cli, tmp_path):
    path = as_real_checkpoint(tiny_dirs("qwen2_vl"), tmp_path / "qwen2_vl", "qwen2_vl", "hub")
    proc = causalmm_cli("generate", "--model", path, "--image", image_file, "--prompt", PROMPT, "--json")
    out = json.loads(proc.stdout)
    assert out["token_ids"] and out["model"] == str(path)
    announced = [line for line in proc.stderr.splitlines() if "loaded image-only" in line]
    assert announced == [
        "Qwen2VLProcessor loaded image-only (its video processor needs torchvision, which is not installed): "
        "images work as with the full class, video input is refused"
    ]
    assert "Traceback" not in proc.stderr


@no_torchvision
def test_the_fallback_is_announced_once_per_class(tiny_dirs, tmp_path, caplog, monkeypatch):
    from causalmm import loading

    monkeypatch.setattr(loading, "_announced", set())
    path = as_real_checkpoint(tiny_dirs("qwen2_5_vl"), tmp_path / "q", "qwen2_5_vl", "nested")
    with caplog.at_level(logging.INFO, logger="causalmm.loading"):
        loading.load_processor(str(path))
        loading.load_processor(str(path))
    lines = [r.getMessage() for r in caplog.records if "image-only" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Qwen2_5_VLProcessor loaded image-only")


def test_a_checkpoint_without_video_config_loads_image_only_also_with_torchvision(tiny_dirs, monkeypatch):
    """The tiny checkpoints carry no video processor config: the stock class would look for one even where
    torchvision is installed (an OSError), so the image-only class is used there too."""
    from causalmm import loading

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    processor = loading.load_processor(str(tiny_dirs("qwen2_vl")))
    assert type(processor).__module__ == "causalmm.loading" and not hasattr(processor, "video_processor")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "internvl"])
def test_video_input_is_refused_in_one_line(family, tiny_dirs, images):
    cm = CausalMM.from_pretrained(str(tiny_dirs(family)))
    frames = [images[2]] * 4
    video_token = cm.processor.video_token
    with pytest.raises(InputError, match=r"^\w+Processor was loaded image-only .* cannot process video; give images"):
        cm.processor(text=[f"{video_token} what happens?"], videos=[frames], return_tensors="pt")
    with pytest.raises(InputError, match="cannot process video"):
        cm.processor(None, [f"{video_token} what happens?"], [frames])  # videos given by position
    # images still go through
    assert "pixel_values" in cm.adapter.encode(images[0], PROMPT)


def test_core_modules_do_not_import_tiny(tiny_dirs, image_file):
    """A model loads and generates in a process where causalmm.tiny (test support) was never imported."""
    code = (
        "import sys\nfrom causalmm import CausalMM\n"
        f"cm = CausalMM.from_pretrained({str(tiny_dirs('qwen2_vl'))!r})\n"
        f"assert cm.generate({str(image_file)!r}, 'Is there a cat?', max_new_tokens=2).token_ids\n"
        "import causalmm.cli, causalmm.loading, causalmm.decoding\n"
        "assert 'causalmm.tiny' not in sys.modules, 'causalmm.tiny was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- devices ---------------------------------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0, {"": "cuda:0"}])
def test_cuda_without_cuda_is_refused_before_loading(device, tmp_path):
    # the directory does not exist: the device is checked first
    with pytest.raises(InputError, match=r"needs CUDA, but .*; run on the CPU \(--device cpu.* CUDA build of torch"):
        CausalMM.from_pretrained(str(tmp_path / "nowhere"), device_map=device)


def test_a_device_torch_does_not_know_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"device 'gpu' is not a device torch knows; use cpu, cuda"):
        CausalMM.from_pretrained(str(tmp_path / "nowhere"), device_map="gpu")


@no_cuda
def test_cli_device_cuda_without_cuda_is_one_line_exit_2(tiny_dirs, image_file, causalmm_cli):
    proc = causalmm_cli(
        "generate",
        "--model",
        tiny_dirs("llava"),
        "--image",
        image_file,
        "--prompt",
        PROMPT,
        "--device",
        "cuda",
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda' needs CUDA"), proc.stderr
    assert "--device cpu" in lines[0]


def test_cpu_and_auto_device_maps_load(tiny_dirs):
    for device in ("cpu", "auto"):
        assert CausalMM.from_pretrained(str(tiny_dirs("llava")), device_map=device).adapter.device.type == "cpu"


# -- weights ---------------------------------------------------------------------------------------------


class _Payload:
    """What a malicious checkpoint pickles: loading it unsafely would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def _broken_copy(tiny, dst, how):
    shutil.copytree(tiny, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(bytes(range(256)) * 16)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "pickle":
        import argparse

        state = load_file(str(weights))
        state["training_args"] = argparse.Namespace(lr=1e-4)  # a pickled object, not a tensor
        weights.unlink()
        torch.save(state, dst / "pytorch_model.bin")
    elif how in ("malicious", "malicious-raw"):
        import pickle

        state = load_file(str(weights))
        state["payload"] = _Payload()  # unpickling it would call os.system
        weights.unlink()
        if how == "malicious":
            torch.save(state, dst / "pytorch_model.bin")
        else:  # a bare pickle, not torch's zip layout
            (dst / "pytorch_model.bin").write_bytes(pickle.dumps(state, protocol=4))
    elif how in ("truncated-bin", "garbage-bin"):
        torch.save(load_file(str(weights)), dst / "pytorch_model.bin")
        weights.unlink()
        data = (dst / "pytorch_model.bin").read_bytes()
        (dst / "pytorch_model.bin").write_bytes(data[: len(data) // 2] if how == "truncated-bin" else b"not a zip")
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"model\.safetensors is truncated or not a safetensors file \(.+\); download or save it again"),
        ("garbage", r"model\.safetensors is truncated or not a safetensors file"),
        ("empty", r"model\.safetensors is truncated or not a safetensors file"),
        (
            "pickle",
            r"its pytorch_model\.bin pickles objects besides tensors \(argparse\.Namespace\), which torch's safe "
            r"loading \(weights_only\) refuses.*re-save it as safetensors",
        ),
        (
            "malicious",
            r"its pytorch_model\.bin pickles objects besides tensors \(posix\.system\), which torch's safe loading "
            r"\(weights_only\) refuses, as they could run code",
        ),
        ("malicious-raw", r"its pytorch_model\.bin pickles instructions besides tensors, which torch's safe loading"),
        ("truncated-bin", r"its pytorch_model\.bin is truncated or not a torch checkpoint; download or save it again"),
        ("garbage-bin", r"its pytorch_model\.bin is truncated or not a torch checkpoint"),
    ],
)
def test_broken_weights_are_one_line_errors(how, message, tiny_dirs, tmp_path):
    path = _broken_copy(tiny_dirs("llava"), tmp_path / how, how)
    with pytest.raises(InputError, match=rf"^cannot load the weights of '.+': {message}") as info:
        CausalMM.from_pretrained(str(path))
    assert "\n" not in str(info.value)


def test_cli_truncated_weights_exit_2(tiny_dirs, image_file, causalmm_cli, tmp_path):
    path = _broken_copy(tiny_dirs("llava"), tmp_path / "trunc", "truncated")
    proc = causalmm_cli("generate", "--model", path, "--image", image_file, "--prompt", PROMPT, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors is truncated" in lines[0], proc.stderr


# -- the KV cache's name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generation_raises_no_deprecation_warning(family, tiny_dirs, images):
    """Every deprecation warning turned into an error, whoever raises it: a generation through every branch
    (vision, language, the shared prefill and layer sharing, the plausible head) passes."""
    cm = CausalMM.from_pretrained(str(tiny_dirs(family)), CausalMMConfig(mode="multimodal", language_layers="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = cm.generate([images[0], images[0]], [PROMPT, "Describe the image."], max_new_tokens=3)
    assert all(o.token_ids for o in out)


def test_the_cache_goes_under_the_name_the_forward_takes(tiny_dirs):
    """Where the forward takes ``cache`` (transformers >= 5.24) the old name warns, which the test configuration
    turns into a failure: passing it would fail every generation test. Both versions: the name we pass is silent."""
    cm = CausalMM.from_pretrained(str(tiny_dirs("llava")))
    model = cm.model
    ids = torch.tensor([[1, 5, 6]])
    (name,) = cache_kwargs(model, None)
    assert name in inspect.signature(type(model).forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=ids, **cache_kwargs(model, DynamicCache(config=model.config.get_text_config())))
        if name == "cache":
            with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
                model(input_ids=ids, past_key_values=DynamicCache(config=model.config.get_text_config()))
