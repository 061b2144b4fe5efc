"""The lmms-eval plugin's model_args, generation options, sample ids and image digests: no lmms-eval needed."""

import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from causalmm import CausalMMConfig, Switches
from causalmm.lmms.args import (
    ModelArgsError,
    generation_options,
    merge_command_line,
    parse_model_args,
    valid_keys,
)
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
    # a method's own parameters go by their names (next test), not as one `params` key
    assert {f.name for f in dataclasses.fields(CausalMMConfig)} - {"params"} <= keys
    assert {f.name for f in dataclasses.fields(Switches)} <= keys
    for name in METHODS:
        assert parse_model_args({"pretrained": "m", "method": name}).config["method"] == name


def test_a_methods_own_parameters_are_keys_of_that_method_only():
    for name, method in METHODS.items():
        for p in method.own_params():
            args = parse_model_args({"pretrained": "m", "method": name, p.field: p.default})
            assert CausalMMConfig(**args.config).param(p.field) == p.default
            others = [m for m in METHODS if p.field not in {q.field for q in METHODS[m].own_params()}]
            if others:
                with pytest.raises(ModelArgsError, match=f"unknown model_args key.*{p.field}"):
                    parse_model_args({"pretrained": "m", "method": others[0], p.field: p.default})


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


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
#: a bad value (as lmms-eval hands it) for every model_args key the parsing can check
BAD_VALUES = {
    "pretrained": "none", "method": 3, "mode": "both", "vision_cf": 3, "language_cf": True, "vision_layers": "a-b",
    "language_layers": True, "vision_heads": "x", "language_heads": True, "gamma": "abc", "epsilon": "x",
    "num_cf_samples": 0, "seed": 1.5, "legacy": 2, "vision_style": "foo", "renormalize": "yes", "noise_step": "abc",
    "noise_schedule": "foo", "reuse_prefix": "maybe", "share_layers": 2, "plausible_head": "x",
    "preallocate_cache": "no", "dtype": "float8", "attn_implementation": "flash_attention_2", "batch_size": "auto",
    "max_batch_size": 0, "max_new_tokens": 0,
}  # fmt: skip
#: keys whose values only the model or the data can judge: a device or revision when the model loads (one
#: InputError line: tests/test_lmms_eval.py), a sample-id field when the first request names its doc
CHECKED_LATER = {"device", "device_map", "revision", "sample_id"}


def test_every_documented_key_is_accepted_and_every_key_documented():
    """docs/integrations.md's model_args table and valid_keys() name the same keys."""
    text = DOCS.read_text()
    table = text[text.index("### `--model_args`") : text.index("### What a request gets")]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    in_key_column = {k for row in rows for k in re.findall(r"`(\w+)`", row[0])} - {"CausalMMConfig"}
    anywhere = set(re.findall(r"`(\w+)`", table))
    assert in_key_column <= set(valid_keys())
    assert set(valid_keys()) <= anywhere, f"undocumented: {set(valid_keys()) - anywhere}"


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_bad_value_of_every_key_is_one_error_naming_it(key):
    assert set(BAD_VALUES) | CHECKED_LATER == set(valid_keys()), "a new key needs a bad value here"
    args = {"pretrained": "m", key: BAD_VALUES[key]}
    with pytest.raises(ModelArgsError) as info:
        parse_model_args(args)
    message = str(info.value)
    assert ("pretrained" if key == "pretrained" else key) in message and "\n" not in message


def test_a_methods_text_parameters_read_back_from_lmms_eval_values():
    """lmms-eval turns `layers=2` into a number and model_args cannot hold commas: text parameters take both."""
    dola = parse_model_args(_split("pretrained=m,method=dola,layers=0;2;4-6"))
    assert CausalMMConfig(**dola.config).param("layers") == "0,2,4-6"
    assert CausalMMConfig(**parse_model_args(_split("pretrained=m,method=deco,layers=3")).config).param("layers") == "3"
    assert CausalMMConfig(**parse_model_args(_split("pretrained=m,method=icd,prefix=3")).config).param("prefix") == "3"
    with pytest.raises(ModelArgsError, match="parameter edit_prefill='x' must be bool"):
        parse_model_args(_split("pretrained=m,method=pai,edit_prefill=x"))


def test_the_command_lines_batch_size_and_device_merge_with_model_args():
    """lmms-eval hands every model --batch_size (default 1), --max_batch_size and --device beside model_args."""
    cli = {"batch_size": 1, "max_batch_size": None, "device": None}
    assert merge_command_line({"pretrained": "m", "batch_size": 4}, cli) == {"pretrained": "m", "batch_size": 4}
    assert merge_command_line({"pretrained": "m"}, {**cli, "batch_size": "8", "device": "cpu"}) == {
        "pretrained": "m", "batch_size": "8", "device": "cpu"
    }  # fmt: skip
    assert merge_command_line({"batch_size": 8}, {**cli, "batch_size": "8"}) == {"batch_size": 8}
    with pytest.raises(ModelArgsError, match="batch_size is given twice, batch_size=4 in --model_args and --batch_"):
        merge_command_line({"batch_size": 4}, {**cli, "batch_size": "8"})
    with pytest.raises(ModelArgsError, match="device is given twice, device=cpu in --model_args and --device cuda"):
        merge_command_line({"device": "cpu"}, {**cli, "device": "cuda"})
    assert parse_model_args(merge_command_line({"pretrained": "m", "batch_size": 4}, cli)).batch_size == 4


def test_generation_options_follow_lmms_eval_conventions():
    pope = {"max_new_tokens": 128, "temperature": 0, "top_p": 0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}
    assert generation_options(pope, 64) == ({"max_new_tokens": 128, "stop_strings": ("\n\n",)}, [])
    opts, ignored = generation_options({"temperature": 0.7, "top_p": 0.9, "until": "END", "image_aspect_ratio": 1}, 16)
    assert opts == {"max_new_tokens": 16, "stop_strings": ("END",), "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert ignored == ["image_aspect_ratio"]
    assert "do_sample" not in generation_options({"temperature": 0.7, "do_sample": False}, 8)[0]
    assert generation_options({"num_beams": 4}, 8)[0] == {"max_new_tokens": 8, "stop_strings": (), "num_beams": 4}
    with pytest.raises(ModelArgsError, match="num_beams=4 with temperature=0.7: causalmm's beam search is determ"):
        generation_options({"num_beams": 4, "temperature": 0.7}, 8)
    with pytest.raises(ModelArgsError, match="num_beams=-2"):
        generation_options({"num_beams": -2}, 8)


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


def _sample_line(doc_id, qid, answer, target, question, doc=None):
    """One line of lmms-eval's logged samples, as lmms-eval 0.7 writes POPE's (docs logged or not)."""
    entry = {"question_id": qid, "score": float(answer.lower().strip() == target), "prediction": answer.lower(),
             "ground_truth": target}  # fmt: skip
    line = {"doc_id": doc_id, "target": target, "filtered_resps": answer, "pope_accuracy": entry,
            "input": question + " Please answer this question with one word."}  # fmt: skip
    if doc is not None:
        line["doc"] = doc
    return json.dumps(line)


def test_score_pope_reads_lmms_eval_samples(tmp_path):
    from causalmm.benchmarks import BenchmarkError
    from causalmm.benchmarks.score import score_predictions

    questions = [("1", "Is there a cat in the image?", "yes"), ("2", "Is there a dog in the image?", "no")]
    samples = tmp_path / "20260101_samples_pope.jsonl"
    # "Yes." is right under the official parser, wrong under lmms-eval's exact match
    samples.write_text(_sample_line(0, "1", "Yes.", "yes", questions[0][1]) + "\n"
                       + _sample_line(1, "2", "yes", "no", questions[1][1]) + "\n")  # fmt: skip
    m = score_predictions("pope", samples, n_boot=0)["metrics"]
    assert (m["accuracy"], m["yes_ratio"], m["n"]) == (50.0, 100.0, 2.0)
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps({"question_id": int(q), "image": "x.png", "text": t, "label": lab}) + "\n"
                            for q, t, lab in questions))  # fmt: skip
    assert score_predictions("pope", samples, data=data, n_boot=0)["metrics"] == m
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("cat", "kite"))
    with pytest.raises(BenchmarkError, match="sample 1 asked .* but .* has 'Is there a kite in the image\\?'"):
        score_predictions("pope", samples, data=other, n_boot=0)
    # docs logged, several categories with repeating question ids: ids carry the category
    both = tmp_path / "both_samples_pope.jsonl"
    both.write_text("\n".join(
        _sample_line(i, "1", "no", "no", questions[0][1], {"question_id": "1", "category": cat, "answer": "no"})
        for i, cat in enumerate(("random", "popular"))
    ) + "\n")  # fmt: skip
    m2 = score_predictions("pope", both, n_boot=0)["metrics"]
    assert (m2["accuracy"], m2["n"], m2["random/accuracy"]) == (100.0, 2.0, 100.0)
