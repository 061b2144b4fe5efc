"""``model.generate(..., custom_generate=causalmm.hf.generate)`` and the Hub folder give what CausalMM.generate
gives, on every family the tests build; what the engine cannot do is refused with one message."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

import causalmm.hf
from causalmm import CausalMMConfig, InputError
from causalmm.tiny import FAMILIES, load_processor

HUB_FOLDER = Path(__file__).resolve().parents[1] / "integrations" / "custom_generate"
PROMPTS = ["Describe the image.", "Is there a cup in the image?"]


def _inputs(cm, images, prompts, side="left"):
    """The processor's batch for ``prompts`` (the chat template the engine applies), padded on ``side``."""
    cm.processor.tokenizer.padding_side = side
    texts = [cm.adapter.format_prompt(p) for p in prompts]
    return cm.processor(text=texts, images=list(images), return_tensors="pt", padding=True)


def _pad(model) -> int:
    gc = model.generation_config
    eos = gc.eos_token_id
    return gc.pad_token_id if gc.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])


def _assert_same(out, inputs, ref, pad):
    """``generate``'s rows are the prompt, then each result's ids, then padding up to the longest."""
    n = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n], inputs["input_ids"])
    rows = out[:, n:].tolist()
    assert [row[: len(r.token_ids)] for row, r in zip(rows, ref, strict=True)] == [r.token_ids for r in ref]
    assert all(t == pad for row, r in zip(rows, ref, strict=True) for t in row[len(r.token_ids) :])


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_generate_matches_causalmm_generate(loaded, images, family):
    base = loaded(family)
    ims = images[:2]
    inputs = _inputs(base, ims, PROMPTS)
    differs = False
    for cfg, seeds in (
        (CausalMMConfig(method="causalmm", mode="multimodal", seed=3), None),
        (CausalMMConfig(method="causalmm", mode="language", language_layers="all", gamma=2.0), [5, 6]),
        (CausalMMConfig(method="vcd", seed=1), None),
    ):
        cm = base.with_config(cfg)
        ref = cm.generate(ims, PROMPTS, seeds=seeds, max_new_tokens=6)
        out = base.model.generate(
            **inputs, custom_generate=causalmm.hf.generate, causalmm=cfg, causalmm_pixels=inputs,
            causalmm_seeds=seeds, max_new_tokens=6,
        )  # fmt: skip
        _assert_same(out, inputs, ref, _pad(base.model))
        plain = base.with_config(cfg.replace(method="regular")).generate(ims, PROMPTS, max_new_tokens=6)
        differs |= [r.token_ids for r in ref] != [r.token_ids for r in plain]
    assert differs, "the contrast changed no token: the test would not see a regular-decoding fallback"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_right_padding_sampling_and_dict_output(loaded, images, family):
    base = loaded(family)
    cfg = CausalMMConfig(method="causalmm", mode="vision", seed=2)
    ims = images[:2]
    inputs = _inputs(base, ims, PROMPTS, side="right")
    ref = base.with_config(cfg).generate(ims, PROMPTS, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20)
    out = base.model.generate(
        **inputs, custom_generate=causalmm.hf.generate, causalmm=cfg.to_dict(), causalmm_pixels=inputs,
        max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=1.0, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences[:, inputs["input_ids"].shape[1] :].tolist() == [r.token_ids for r in ref]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_beam_search_through_generate(loaded, images, family):
    """``num_beams`` through ``model.generate``: regular decoding gives the stock beam search token for token, and
    every method gives what CausalMM.generate gives with the same beams (length penalty, n-gram ban included)."""
    base = loaded(family)
    ims = images[:2]
    inputs = _inputs(base, ims, PROMPTS)
    beams = {"num_beams": 3, "max_new_tokens": 6, "length_penalty": 0.5, "no_repeat_ngram_size": 2}
    stock = base.model.generate(**inputs, **beams, do_sample=False)
    out = base.model.generate(**inputs, custom_generate=causalmm.hf.generate, causalmm=CausalMMConfig(method="regular"),
                              causalmm_pixels=inputs, **beams)  # fmt: skip
    assert torch.equal(out, stock)
    differs = False
    for cfg in (CausalMMConfig(method="causalmm", mode="multimodal", seed=3), CausalMMConfig(method="vcd", seed=1)):
        ref = base.with_config(cfg).generate(ims, PROMPTS, **beams)
        got = base.model.generate(**inputs, custom_generate=causalmm.hf.generate, causalmm=cfg, causalmm_pixels=inputs,
                                  return_dict_in_generate=True, **beams)  # fmt: skip
        assert type(got).__name__ == "GenerateBeamDecoderOnlyOutput"
        _assert_same(got.sequences, inputs, ref, _pad(base.model))
        differs |= got.sequences.tolist() != stock.tolist()
    assert differs, "no method changed the beams: the test would not see a regular-decoding fallback"


def test_fresh_model_keeps_its_attention_and_matches(model_dirs, loaded, images):
    """A model loaded by the user (sdpa) decodes as CausalMM on sdpa does, and keeps its implementation after."""
    model = AutoModelForImageTextToText.from_pretrained(str(model_dirs["llava"]))
    cfg = CausalMMConfig(method="causalmm", mode="multimodal", seed=4)
    cm = loaded("llava", "sdpa").with_config(cfg)
    inputs = _inputs(cm, images[:1], PROMPTS[:1])
    out = model.generate(**inputs, custom_generate=causalmm.hf.generate, causalmm=cfg, causalmm_pixels=inputs,
                         max_new_tokens=6)  # fmt: skip
    ref = cm.generate(images[0], PROMPTS[0], max_new_tokens=6)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == ref.token_ids
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_hub_folder_matches(model_dirs, loaded, images):
    """The folder a user pushes to the Hub, loaded from disk (trust_remote_code is the caller's choice)."""
    model = AutoModelForImageTextToText.from_pretrained(str(model_dirs["qwen2_vl"]))
    processor = load_processor(model_dirs["qwen2_vl"])
    cfg = CausalMMConfig(method="causalmm", mode="multimodal", seed=7)
    cm = loaded("qwen2_vl", "sdpa").with_config(cfg)
    processor.tokenizer.padding_side = "left"
    texts = [cm.adapter.format_prompt(p) for p in PROMPTS]
    inputs = processor(text=texts, images=images[:2], return_tensors="pt", padding=True)
    out = model.generate(**inputs, custom_generate=str(HUB_FOLDER), trust_remote_code=True, causalmm=cfg,
                         max_new_tokens=6)  # fmt: skip
    ref = cm.generate(images[:2], PROMPTS, max_new_tokens=6)
    _assert_same(out, inputs, ref, _pad(model))
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(**inputs, custom_generate=str(HUB_FOLDER), causalmm=cfg, max_new_tokens=2)


class _Recorder(BaseStreamer):
    def put(self, value):
        pass

    def end(self):
        pass


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"do_sample": True, "num_return_sequences": 2}, "num_return_sequences=2"),
        ({"num_beams": 2, "num_return_sequences": 2}, "num_return_sequences=2"),
        ({"streamer": _Recorder()}, "streamers are not supported"),
        ({"bad_words_ids": [[5]]}, "NoBadWordsLogitsProcessor"),
        ({"output_scores": True, "return_dict_in_generate": True}, "output_scores not available"),
        ({"causalmm_pixels": None}, "causalmm_pixels=inputs"),
        ({"causalmm": {"gama": 1}}, "unknown config field"),
    ],
)
def test_refusals(loaded, images, extra, message):
    base = loaded("llava")
    inputs = _inputs(base, images[:1], PROMPTS[:1])
    kwargs = {"causalmm": CausalMMConfig(), "causalmm_pixels": inputs, "max_new_tokens": 3, **extra}
    with pytest.raises(InputError, match=message) as info:
        base.model.generate(**inputs, custom_generate=causalmm.hf.generate, **kwargs)
    assert str(info.value).startswith("causalmm.hf.generate: ") and "\n" not in str(info.value)


def test_hub_form_refuses_streamer(loaded, images):
    base = loaded("llava")
    inputs = _inputs(base, images[:1], PROMPTS[:1])
    with pytest.raises(InputError, match="streamers are not supported"):
        causalmm.hf.generate_from_inputs(base.model, **inputs, streamer=_Recorder(), max_new_tokens=2)


def test_split_inputs_refuses_what_it_cannot_cut():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match="one prompt at a time"):
        causalmm.hf.split_inputs(ids, {}, {"pixel_values": torch.zeros(3, 3, 8, 8)})
    with pytest.raises(InputError, match="2 images for 1 prompt"):
        two = {"pixel_values": torch.zeros(2, 3, 8, 8), "image_sizes": torch.ones(2, 2)}
        causalmm.hf.split_inputs(ids[:1], {}, two)
    with pytest.raises(InputError, match="no image inputs"):
        causalmm.hf.split_inputs(ids, {}, {"input_ids": ids})


def test_reachable_after_a_bare_import():
    """`import causalmm` then `custom_generate=causalmm.hf.generate`, as the docs write it."""
    import subprocess
    import sys

    code = "import causalmm; print(causalmm.hf.generate.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "causalmm.hf", out.stderr
