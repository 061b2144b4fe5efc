"""Bad input to the API and the config fails with one clear error of the project's types, never a deep traceback
or a silently different output."""

import math

import numpy as np
import pytest
from PIL import Image

from causalmm import CausalMM, CausalMMConfig, ConfigError, InputError
from causalmm.adapters import UnsupportedModelError, get_adapter, max_positions

# -- images and prompts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images_arg", "prompts_arg", "needle"),
    [
        ("IMG", [], "no prompts given"),
        ("IMG", None, "prompts must be a string or a list"),
        ("IMG", ["ok", 3], "prompt 1 is a int, not a string"),
        ("IMG", ["ok", " "], "prompt 1 is empty"),
        ([], "hi", "no images given"),
        (None, "hi", "the image is None"),
        ([None, "IMG"], ["a", "b"], "image 0: the image is None"),
        (["IMG", "IMG"], "hi", "2 images for one prompt"),
        (["IMG", "IMG"], ["a", "b", "c"], "2 images for 3 prompts"),
        ({"image": 1}, "hi", "one image or a list of images"),
    ],
)
def test_images_and_prompts_that_do_not_pair_up(images_arg, prompts_arg, needle, loaded, images):
    def real(x):
        return images[0] if x == "IMG" else [real(i) for i in x] if isinstance(x, list) else x

    with pytest.raises(InputError, match=needle):
        loaded("llava").generate(real(images_arg), prompts_arg, max_new_tokens=2)


def test_one_image_in_a_list_serves_a_single_prompt_and_every_prompt(loaded, images):
    cm = loaded("llava")
    ref = cm.generate(images[0], "Describe it.", max_new_tokens=3)
    assert cm.generate([images[0]], "Describe it.", max_new_tokens=3).token_ids == ref.token_ids
    both = cm.generate((images[0],), ["Describe it.", "Describe it."], max_new_tokens=3)
    assert [r.token_ids for r in both] == [ref.token_ids] * 2


# -- seeds and generation options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seeds": [1.0]}, "seeds must hold integers; 1.0 is a float"),
        ({"seeds": ["1"]}, "'1' is a str"),
        ({"seeds": [True]}, "True is a bool"),
        ({"seeds": [1, 2]}, "seeds has 2 values for 1 prompts"),
        ({"seeds": 3}, r"for one prompt: seeds=\[3\]"),
        ({"seeds": "12"}, "must be a list of integers"),
        ({"image_seeds": [0.5]}, "image_seeds must hold integers"),
    ],
)
def test_bad_seeds(kwargs, needle, loaded, images):
    with pytest.raises(InputError, match=needle):
        loaded("llava").generate(images[0], "hi", max_new_tokens=2, **kwargs)


def test_numpy_integer_seeds_are_integers(loaded, images):
    cm = loaded("llava").with_config(CausalMMConfig(mode="language", language_layers="all"))
    ref = cm.generate(images[0], "hi", max_new_tokens=3, seeds=[7]).token_ids
    assert cm.generate(images[0], "hi", max_new_tokens=3, seeds=np.array([7])).token_ids == ref
    assert cm.generate(images[0], "hi", max_new_tokens=3, seeds=[np.int64(7)]).token_ids == ref


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_new_tokens": True}, "max_new_tokens=True must be an integer"),
        ({"max_new_tokens": 2.0}, "max_new_tokens=2.0 must be an integer"),
        ({"do_sample": True, "temperature": "0.7"}, "temperature='0.7' must be a finite number"),
        ({"do_sample": True, "top_p": math.nan}, "top_p=nan must be a finite number"),
        ({"do_sample": "yes"}, "do_sample='yes' must be True or False"),
        ({"stop_strings": 5}, "stop_strings=5"),
    ],
)
def test_bad_generation_options(kwargs, needle, loaded, images):
    with pytest.raises(ConfigError, match=needle):
        loaded("llava").generate(images[0], "hi", **kwargs)


# -- the config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gamma": True}, "gamma=True must be a finite number"),
        ({"gamma": "1.5"}, "gamma='1.5' must be a finite number"),
        ({"gamma": math.nan}, "gamma=nan must be a finite number"),
        ({"gamma": math.inf}, "gamma=inf must be a finite number"),
        ({"epsilon": False}, "epsilon=False must be a finite number"),
        ({"epsilon": -math.inf}, "epsilon=-inf"),
        ({"num_cf_samples": True}, "num_cf_samples=True must be an integer"),
        ({"num_cf_samples": 2.0}, "num_cf_samples=2.0 must be an integer"),
        ({"seed": 1.5}, "seed=1.5 must be an integer"),
        ({"seed": "0"}, "seed='0' must be an integer"),
        ({"noise_step": False}, "noise_step=False must be an integer"),
        ({"legacy": "no"}, "legacy='no' must be True or False"),
        ({"renormalize": 0}, "renormalize=0 must be True or False"),
        ({"language_layers": True}, "cannot read language_layers True"),
        ({"language_layers": [1.5]}, "1.5 is not an integer layer index"),
        ({"language_layers": 2.0}, "cannot read language_layers 2.0"),
        ({"vision_heads": "a,b"}, "comma-separated head indices"),
        ({"vision_heads": [0.5]}, "integer head indices"),
        ({"vision_heads": True}, "integer head indices"),
        ({"mode": ["vision"]}, "mode=\\['vision'\\] is not valid"),
    ],
)
def test_config_refuses_wrong_types(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        CausalMMConfig(**kwargs)


def test_config_takes_numpy_numbers_as_python_ones():
    cfg = CausalMMConfig(gamma=np.float32(0.5), seed=np.int64(3), num_cf_samples=np.int32(2), vision_heads=[np.int8(1)])
    assert (cfg.gamma, cfg.seed, cfg.num_cf_samples, cfg.vision_heads) == (0.5, 3, 2, (1,))
    assert type(cfg.seed) is int and type(cfg.gamma) is float
    assert CausalMMConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_base_attention_fails_before_loading(tmp_path, model_dirs, loaded):
    # the model path does not exist: the error is about the base, so nothing was loaded
    with pytest.raises(ConfigError, match="base attention 'foo' is not valid; choose one of: sdpa, eager"):
        CausalMM.from_pretrained(str(tmp_path / "no-model"), base="foo")
    cm = loaded("llava")
    with pytest.raises(ConfigError, match="base attention 'flash'"):
        get_adapter(cm.model, cm.processor, base="flash")
    assert not isinstance(ConfigError("x"), UnsupportedModelError)


# -- what the processor and the model's positions allow ------------------------------------------------------------


def test_aspect_ratio_the_processor_refuses_is_one_error(loaded):
    cm = loaded("qwen2_vl")
    with pytest.raises(InputError, match=r"\(1x500 pixels\) is refused by .*aspect ratio must be smaller than 200"):
        cm.generate(Image.new("RGB", (1, 500), (90, 90, 90)), "hi", max_new_tokens=2)


def _encoded(cm: CausalMM, image: Image.Image, prompt: str) -> dict:
    """The processor's encoding, as the adapter makes it, without its length check."""
    text = cm.adapter.format_prompt(prompt)
    return dict(cm.processor(text=[text], images=[image], return_tensors="pt"))


def _prompt_of(cm: CausalMM, image: Image.Image, n_tokens: int) -> str:
    """A prompt whose encoding with ``image`` has exactly ``n_tokens`` tokens."""
    base = _encoded(cm, image, "cat")["input_ids"].shape[-1]
    prompt = "cat" + " cat" * (n_tokens - base)
    assert _encoded(cm, image, prompt)["input_ids"].shape[-1] == n_tokens
    return prompt


def test_prompt_and_answer_must_fit_the_models_positions(loaded, images):
    cm = loaded("llava")
    limit = max_positions(cm.model.config)
    assert limit == cm.model.config.text_config.max_position_embeddings == 1024
    prompt = _prompt_of(cm, images[0], limit - 3)
    assert len(cm.generate(images[0], prompt, max_new_tokens=3).token_ids) <= 3  # exactly fits
    with pytest.raises(InputError, match=r"1021 positions .* max_new_tokens=4 needs 4 more, 1025 in all, but the LLM "
                       r"has 1024 .*lower max_new_tokens to 3 or less"):
        cm.generate(images[0], prompt, max_new_tokens=4)
    long = _prompt_of(cm, images[0], limit + 5)
    with pytest.raises(InputError, match=r"1029 positions \(1029 tokens.*shorten the prompt"):
        cm.generate(images[0], long, max_new_tokens=1)
    with pytest.raises(InputError, match=r"1029 positions.*but the LLM has 1024"):  # one forward, no answer
        from causalmm.visualize import attention_maps

        attention_maps(cm, images[0], long)


def test_mrope_positions_not_tokens_are_counted(loaded):
    cm = loaded("qwen2_vl")
    image = Image.new("RGB", (500, 400), (90, 90, 90))
    prompt = _prompt_of(cm, image, 1024)  # 1024 tokens, but the image's grid numbers fewer positions
    enc = _encoded(cm, image, prompt)
    tokens = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    pos = cm.adapter.prefill_positions(tokens, cm.adapter.image_inputs(enc))
    used = int(pos.max()) + 1
    assert used < 1024 - 2
    assert len(cm.generate(image, prompt, max_new_tokens=2).token_ids) <= 2
    with pytest.raises(InputError, match=f"{used} positions \\(1024 tokens"):
        cm.generate(image, prompt, max_new_tokens=1024 - used + 1)


def test_max_positions_reads_what_the_config_says():
    from transformers import LlamaConfig, Qwen2Config

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    assert max_positions(Qwen2Config(max_position_embeddings=32768, rope_parameters=yarn)) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "rope_theta": 5e5,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # fmt: skip
    assert max_positions(LlamaConfig(max_position_embeddings=131072, rope_parameters=llama3)) == 131072
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}  # states no extended length
    assert max_positions(LlamaConfig(max_position_embeddings=4096, rope_parameters=linear)) == 4096

    class NoLimit:  # a config that names no limit: nothing is refused
        pass

    assert max_positions(NoLimit()) is None
