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
    _assert_same(out.sequences, inputs, ref, _pad(base.model))


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


def _gen(base, inputs, **kwargs):
    kwargs = {"causalmm": CausalMMConfig(method="causalmm", mode="multimodal"), "max_new_tokens": 3, **kwargs}
    return base.model.generate(**inputs, custom_generate=causalmm.hf.generate, **kwargs)


def _one_line(info) -> str:
    message = str(info.value)
    assert message.startswith("causalmm.hf.generate: ") and "\n" not in message
    return message


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("case", ["another image", "another batch order", "another call's pixels in generate"])
def test_pixels_that_are_not_the_prompts_are_refused(loaded, images, family, case):
    """causalmm_pixels must be the inputs generate was given: the engine decodes from causalmm_pixels, so pixels of
    another image, processor call or batch order were answered about without a word (LLaVA: the same ids for any
    image), or failed deep inside the model (Qwen2-VL: other token counts)."""
    base = loaded(family)
    one = _inputs(base, images[:1], PROMPTS[:1])
    if case == "another image":
        call, pixels = one, _inputs(base, images[1:2], PROMPTS[:1])
    elif case == "another batch order":
        call, pixels = _inputs(base, images[:2], PROMPTS), _inputs(base, images[1::-1], PROMPTS)
    else:  # the user swaps another image's pixels into the generate call and passes the processor output
        if family != "llava":
            pytest.skip("other pixels of another size fail in generate's own encoding, before any custom function")
        call, pixels = {**one, "pixel_values": _inputs(base, images[1:2], PROMPTS[:1])["pixel_values"]}, one
    with pytest.raises(InputError, match=r"causalmm_pixels\['(input_ids|pixel_values)'\] is not the") as info:
        _gen(base, call, causalmm_pixels=pixels)
    assert _one_line(info).endswith("pass causalmm_pixels=inputs, the same processor output as **inputs")


def test_image_inputs_causalmm_pixels_lacks_come_from_the_call(loaded, images):
    """A dict of some image tensors (pixels in half precision, no grid) is checked and completed from the call."""
    base = loaded("qwen2_vl")
    inputs = _inputs(base, images[:2], PROMPTS)
    full = _gen(base, inputs, causalmm_pixels=inputs)
    part = _gen(base, inputs, causalmm_pixels={"pixel_values": inputs["pixel_values"].half()})
    assert torch.equal(full, part)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("beams", [1, 2])
def test_image_tokens_that_do_not_fit_the_images_are_refused_up_front(loaded, images, family, beams):
    """Prompts whose image placeholders do not fit their images: refused before decoding in one line, where the
    engine failed deep inside the model or (two images in one prompt, none in the next) paired prompts and images
    silently."""
    base = loaded(family)
    token = base.processor.image_token
    one, bare = base.adapter.format_prompt(PROMPTS[0]), base.adapter.format_prompt(PROMPTS[1], image=False)
    two = one.replace(token, token + "\n" + token, 1)
    if family != "qwen2_vl":  # Qwen's placeholders sit inside vision start/end marks: generate's own positions fail
        inputs = base.processor(text=[two], images=images[:2], return_tensors="pt")
        with pytest.raises(InputError, match="2 images for 1 prompt"):
            _gen(base, inputs, causalmm_pixels=inputs, num_beams=beams)
        base.processor.tokenizer.padding_side = "left"
        inputs = base.processor(text=[two, bare], images=images[:2], return_tensors="pt", padding=True)
        with pytest.raises(InputError, match="prompt 1 holds no image token"):
            _gen(base, inputs, causalmm_pixels=inputs, num_beams=beams)
    text = dict(base.processor(text=[bare], return_tensors="pt"))
    pixels = _inputs(base, images[:1], PROMPTS[:1])
    image = {k: v for k, v in pixels.items() if k not in text}
    with pytest.raises(InputError, match="prompt 0 holds no image token") as info:
        _gen(base, {**text, **image}, causalmm_pixels=image, num_beams=beams)
    _one_line(info)
    if family == "qwen2_vl":  # no pixels in the call: the grid gives the count
        other = {k: v for k, v in _inputs(base, images[1:2], PROMPTS[:1]).items() if k not in text}
        tokens = {k: v for k, v in pixels.items() if k in text}
        with pytest.raises(InputError, match="prompt 0 holds 12 image tokens where its image fills 10"):
            _gen(base, tokens, causalmm_pixels=other, num_beams=beams)


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
    with pytest.raises(InputError, match="image_grid_thw gives 48 patches, pixel_values holds 40"):
        grid = torch.tensor([[1, 6, 8]])
        causalmm.hf.split_inputs(ids[:1], {}, {"pixel_values": torch.zeros(40, 1176), "image_grid_thw": grid})


def test_reachable_after_a_bare_import():
    """`import causalmm` then `custom_generate=causalmm.hf.generate`, as the docs write it."""
    import subprocess
    import sys

    code = "import causalmm; print(causalmm.hf.generate.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "causalmm.hf", out.stderr


def test_a_checkpoints_beam_settings_do_not_refuse_a_greedy_call(loaded, images):
    """A generation config that carries beam settings (``early_stopping=True``, a length penalty) decodes greedily
    as transformers does, ignoring them, instead of being refused as beam options without a beam search."""
    base = loaded("llava")
    inputs = _inputs(base, images[:1], PROMPTS[:1])
    cfg = CausalMMConfig(method="regular")
    gc = base.model.generation_config
    before = (gc.early_stopping, gc.length_penalty)
    gc.early_stopping, gc.length_penalty = True, 2.0
    try:
        out = base.model.generate(
            **inputs, custom_generate=causalmm.hf.generate, causalmm=cfg, causalmm_pixels=inputs, max_new_tokens=4
        )
    finally:
        gc.early_stopping, gc.length_penalty = before
    ref = base.with_config(cfg).generate(images[:1], PROMPTS[:1], max_new_tokens=4)
    _assert_same(out, inputs, ref, _pad(base.model))
