"""The lmms-eval plugin's model_args, generation options, sample ids and image digests: no lmms-eval needed."""

import dataclasses
import io
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from causalmm import CausalMMConfig, Switches
from causalmm.lmms.args import ModelArgsError, generation_options, parse_model_args, valid_keys
from causalmm.lmms.requests import ImageDigests, SampleIds
from causalmm.methods import METHODS
from causalmm.seeds import file_digest, pixel_digest


def _split(arg_string: str) -> dict:
    """model_args as lmms-eval reads them (``utils.simple_parse_args_string``: commas, true/false, numbers)."""

    def value(v: str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        if v.isnumeric():
            return int(v)
        try:
            return float(v)
        except ValueError:
            return v

    return {k: value(v) for k, v in (a.split("=", 1) for a in arg_string.split(","))}


def test_every_config_field_switch_and_method_is_a_key():
    keys = set(valid_keys())
    assert {f.name for f in dataclasses.fields(CausalMMConfig)} <= keys
    assert {f.name for f in dataclasses.fields(Switches)} <= keys
    for name in METHODS:
        assert parse_model_args({"pretrained": "m", "method": name}).config["method"] == name


def test_lmms_eval_style_values():
    args = parse_model_args(_split(
        "pretrained=some/model,method=causalmm,mode=multimodal,gamma=1,epsilon=0.05,vision_layers=-1,"
        "language_layers=0-3,vision_heads=0;1,language_heads=2,num_cf_samples=2,seed=7,legacy=false,"
        "renormalize=true,vision_cf=uniform,language_cf=shuffle,reuse_prefix=false,dtype=float32,"
        "attn_implementation=eager,batch_size=4,max_new_tokens=32,sample_id=doc_id,device=cpu"
    ))  # fmt: skip
    cfg = CausalMMConfig(**args.config)
    assert (cfg.gamma, cfg.epsilon, cfg.vision_layers, cfg.language_layers) == (1.0, 0.05, -1, "0-3")
    assert (cfg.vision_heads, cfg.language_heads, cfg.num_cf_samples, cfg.seed) == ((0, 1), (2,), 2, 7)
    assert (cfg.vision_cf, cfg.language_cf, cfg.legacy, cfg.renormalize) == ("uniform", "shuffle", False, True)
    assert args.switches == {"reuse_prefix": False}
    assert args.load == {"dtype": "float32", "device": "cpu"} and args.base == "eager"
    assert (args.batch_size, args.max_new_tokens, args.sample_id) == (4, 32, "doc_id")
    lists = parse_model_args(_split("pretrained=m,language_layers=0;2;5-7,vision_layers=none"))
    assert lists.config == {"language_layers": "0,2,5-7", "vision_layers": None}


@pytest.mark.parametrize(
    ("arg_string", "message"),
    [
        ("pretrained=m,gama=1", "unknown model_args key(s) gama for --model causalmm; valid keys: attn_implementation"),
        ("method=causalmm", "needs pretrained="),
        ("pretrained=m,method=beam", "method='beam' is not valid; choose one of: regular"),
        ("pretrained=m,mode=both", "mode='both' is not valid"),
        ("pretrained=m,language_layers=a-b", "cannot read language_layers"),
        ("pretrained=m,vision_heads=x", "vision_heads='x': give head indices separated by ';'"),
        ("pretrained=m,batch_size=auto", "batch_size=auto is not supported"),
        ("pretrained=m,dtype=float8", "dtype='float8': choose auto"),
        ("pretrained=m,attn_implementation=flash_attention_2", "choose one"),
        ("pretrained=m,legacy=2", "legacy=2: give true or false"),
    ],
)
def test_bad_model_args_name_the_problem(arg_string, message):
    with pytest.raises(ModelArgsError) as info:
        parse_model_args(_split(arg_string))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_generation_options_follow_lmms_eval_conventions():
    pope = {"max_new_tokens": 128, "temperature": 0, "top_p": 0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}
    assert generation_options(pope, 64) == ({"max_new_tokens": 128, "stop_strings": ("\n\n",)}, [])
    opts, ignored = generation_options({"temperature": 0.7, "top_p": 0.9, "until": "END", "image_aspect_ratio": 1}, 16)
    assert opts == {"max_new_tokens": 16, "stop_strings": ("END",), "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert ignored == ["image_aspect_ratio"]
    assert "do_sample" not in generation_options({"temperature": 0.7, "do_sample": False}, 8)[0]
    with pytest.raises(ModelArgsError, match="num_beams=4: causalmm decodes one sequence"):
        generation_options({"num_beams": 4}, 8)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_digest_is_the_encoded_bytes_when_they_are_the_image():
    """The digest `causalmm eval` seeds a parquet image by (its bytes), when the task hands over that image."""
    blobs = [_png((255, 0, 0)), _png((0, 0, 255))]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in blobs], "question_id": ["1", "2"]},
        features=datasets.Features({"image": datasets.Image(), "question_id": datasets.Value("string")}),
    )
    digests = ImageDigests()
    assert digests(ds, 1, ds[1]["image"].convert("RGB")) == file_digest(blobs[1])
    cropped = ds[0]["image"].crop((0, 0, 4, 4))
    assert digests(ds, 0, cropped) == pixel_digest(cropped)  # not the data set's image: its pixels
    assert digests.counts == {"bytes": 1, "pixels": 1}
    plain = [Image.new("RGB", (4, 4))]
    assert ImageDigests()([{"image": plain[0]}], 0, plain[0]) == pixel_digest(plain[0])


def test_sample_ids_follow_causalmm_eval_pope():
    one = datasets.Dataset.from_dict({"question_id": ["5", "6"], "category": ["random", "random"]})
    two = datasets.Dataset.from_dict({"question_id": ["5", "5"], "category": ["random", "popular"]})
    ids = SampleIds()
    assert ids(one, one[0], 0, "pope") == "5"
    assert ids(two, two[1], 1, "pope") == "popular/5"
    assert ids(one, {"x": 1}, 3, "t") == "3"
    assert SampleIds("doc_id")(one, one[1], 1, "pope") == "1"
    with pytest.raises(ModelArgsError, match="sample_id=qid: the docs of task pope have no such field"):
        SampleIds("qid")(one, one[0], 0, "pope")


def test_manifest_module_imports_without_torch():
    code = "import sys, causalmm.lmms.manifest as m; assert 'torch' not in sys.modules; print(m.MODEL_CLASS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "causalmm.lmms.model.CausalMMLmms"
