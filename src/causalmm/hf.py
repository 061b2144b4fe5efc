"""CausalMM inside ``model.generate``: a ``custom_generate`` function for ``transformers`` 5.

A user who already has a model and its processor keeps the ``generate`` call they know::

    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, custom_generate=causalmm.hf.generate, causalmm=CausalMMConfig(mode="language"),
                         causalmm_pixels=inputs, max_new_tokens=64)

and gets the token ids :meth:`causalmm.CausalMM.generate` gives for the same prompts, config and seeds.

Why ``causalmm_pixels``: ``generate`` runs the vision tower itself before it calls a custom function and hands
it the encoded features, not the pixels; the counterfactual branches need the pixels (the vision branch runs the
tower under counterfactual attention, VCD noises the image). So the image inputs come once more, explicitly.

The decoding is the engine's (:meth:`causalmm.decoding.Engine.generate_encoded`): ``generate`` only prepares the
inputs and the generation config. Beam search (``num_beams``, ``length_penalty``, ``early_stopping``,
``no_repeat_ngram_size``) is the engine's too: ``generate`` hands the function each prompt repeated once per beam,
and the function takes one copy of each, so every method beams with its branch rows as in
:meth:`CausalMM.generate`. What the engine does not do is refused, each with one message: several sequences per
prompt, streamers, assistant models, logits processors or stopping criteria it does not know. So are image inputs
the answer would not be about: ``causalmm_pixels`` other than the tensors ``generate`` was given, and prompts whose
image tokens do not fit their one image (checked before decoding, where the model would fail deep inside or pair
a prompt with another's image).

:func:`generate_from_inputs` is the same for the Hub form (``custom_generate="owner/repo"``, the folder
``integrations/custom_generate``), which ``transformers`` calls before any input preparation.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .adapters import get_adapter
from .adapters.base import TOKEN_KEYS
from .config import CausalMMConfig, ConfigError
from .decoding import Engine, GenerationOptions, Switches
from .inputs import InputError
from .sites import BASES

__all__ = ["generate", "generate_from_inputs", "split_inputs"]

#: logits processors ``generate`` builds from the options the engine applies itself (greedy or sampling with
#: temperature, top-k, top-p, repetition penalty); any other is refused
_KNOWN_PROCESSORS = frozenset(
    {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "RepetitionPenaltyLogitsProcessor",
     "NoRepeatNGramLogitsProcessor"}
)  # fmt: skip
#: stopping criteria the engine applies itself (the length, the end-of-sequence tokens)
_KNOWN_CRITERIA = frozenset({"MaxLengthCriteria", "EosTokenCriteria"})
#: per-token or generation-state inputs that are never image inputs (the Hub form sorts its kwargs with it)
_NOT_IMAGE = frozenset(TOKEN_KEYS) | {"position_ids", "cache_position", "past_key_values", "inputs_embeds", "cache"}
#: ``generate`` options whose output the function does not produce
_OUTPUT_FLAGS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _refuse(message: str) -> InputError:
    return InputError(f"causalmm.hf.generate: {message}")


def _caller_arguments() -> dict[str, Any]:
    """The ``streamer``, ``assistant_model`` and raw keyword arguments (``call``) of the ``generate`` call that
    called us.

    ``generate`` drops the first two before it calls a custom function (it feeds a streamer the prompt and nothing
    more), so they are read from its frame, to refuse them instead of silently ignoring them. ``call`` holds the
    tensors it was given (its pixels before it encoded them), to check ``causalmm_pixels`` against; ``None`` where
    the frame is not ``generate``'s or holds no ``kwargs`` (a caller other than ``transformers``)."""
    frame = sys._getframe(2)
    if frame.f_code.co_name != "generate":
        return {}
    given = frame.f_locals.get("kwargs")
    call = {k: v for k, v in given.items() if isinstance(v, torch.Tensor)} if isinstance(given, dict) else None
    return {**{k: frame.f_locals.get(k) for k in ("streamer", "assistant_model")}, "call": call}


def _base_of(model: torch.nn.Module) -> str:
    """The base attention under the hook: the model's own (``sdpa`` or ``eager``), so untouched calls are stock."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "sdpa").removeprefix("causalmm_")
    return impl if impl in BASES else "sdpa"


def _implementations(config: Any) -> str | dict[str, Any]:
    """The attention implementation of a config and each sub-config, in ``set_attn_implementation``'s format."""
    own = getattr(config, "_attn_implementation", None)
    subs = {name: _implementations(getattr(config, name)) for name in getattr(config, "sub_configs", {}) or {}}
    subs = {k: v for k, v in subs.items() if v is not None}
    return own if not subs else {"": own, **subs}


def split_inputs(
    input_ids: torch.Tensor, tokens: Mapping[str, Any], pixels: Mapping[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """A batch of processor outputs cut into one encoding per prompt, as :meth:`Adapter.encode` gives them.

    Each prompt keeps its real tokens (the attention mask's ones: left or right padding both go); each gets its
    image's share of the image inputs: one row per prompt of every image tensor, or, for packed towers
    (``image_grid_thw``: Qwen2-VL), its run of patches. Anything else cannot be cut per prompt and is refused.
    """
    n = int(input_ids.shape[0])
    mask = tokens.get("attention_mask")
    images = {k: v for k, v in pixels.items() if isinstance(v, torch.Tensor) and k not in _NOT_IMAGE}
    if not images:
        raise _refuse("causalmm_pixels holds no image inputs; pass the processor's output (with pixel_values)")
    for key in ("image_grid_thw", "image_sizes"):  # one row per image where a processor says how many there are
        if key in images and images[key].shape[0] != n:
            raise _refuse(f"{images[key].shape[0]} images for {n} prompt(s) ({key}); give one image per prompt")
    grid, pixels = images.get("image_grid_thw"), images.get("pixel_values")
    if grid is not None and pixels is not None and int(grid.prod(-1).sum()) != int(pixels.shape[0]):
        raise _refuse(
            f"image_grid_thw gives {int(grid.prod(-1).sum())} patches, pixel_values holds {pixels.shape[0]}: they come "
            "from different processor calls; pass the image inputs of one processor output"
        )
    shares: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    if n == 1:
        shares[0] = dict(images)
    else:
        counts = grid.prod(-1).tolist() if grid is not None else None
        for key, value in images.items():
            if value.dim() and value.shape[0] == n:
                parts = list(value.split(1))
            elif counts is not None and value.dim() and value.shape[0] == sum(counts):
                parts = list(value.split([int(c) for c in counts]))
            else:
                raise _refuse(
                    f"cannot tell which part of {key} (shape {tuple(value.shape)}) belongs to which of the {n} "
                    "prompts (one image per prompt); call generate with one prompt at a time"
                )
            for share, part in zip(shares, parts, strict=True):
                share[key] = part
    encs = []
    for r in range(n):
        keep = mask[r].bool() if isinstance(mask, torch.Tensor) else torch.ones_like(input_ids[r], dtype=torch.bool)
        enc = {"input_ids": input_ids[r][keep][None], "attention_mask": torch.ones_like(input_ids[r][keep])[None]}
        for key in TOKEN_KEYS:
            value = tokens.get(key)
            if key not in ("input_ids", "attention_mask", "labels") and isinstance(value, torch.Tensor):
                enc[key] = value[r][keep][None]
        encs.append({**enc, **shares[r]})
    return encs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape and values, on any device; float tensors of two precisions (one of them passed through
    ``.to(torch.float16)``) are compared at the lower one."""
    if a.shape != b.shape or a.is_floating_point() != b.is_floating_point():
        return False
    b = b.to(a.device)
    if a.is_floating_point() and a.dtype != b.dtype:
        low = min(a.dtype, b.dtype, key=lambda d: torch.finfo(d).bits)
        return torch.equal(a.to(low), b.to(low))
    return torch.equal(a, b.to(a.dtype))


def _matching_pixels(
    pixels: Any, call: Mapping[str, torch.Tensor] | None, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``causalmm_pixels`` checked against the inputs ``generate`` was given, completed by the image inputs of the
    call it lacks.

    The engine answers about ``causalmm_pixels`` while ``generate`` prepared ``input_ids`` (and encoded the pixels
    of its own arguments): pixels of another image, processor call or batch order would be answered about without
    a word. So every tensor both hold must be the same (shape and values), ``input_ids`` included, which a
    processor output carries. ``call``: the raw tensors of the ``generate`` call, ``None`` where unreadable (then
    only the ids are compared)."""
    if not isinstance(pixels, Mapping):
        raise _refuse(f"causalmm_pixels takes the processor output (a mapping of tensors), not {type(pixels).__name__}")
    ours = {k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)}
    given = {**(call or {}), "input_ids": input_ids}
    for key in sorted(ours.keys() & given.keys(), key=lambda k: (k != "input_ids", k not in _NOT_IMAGE, k)):
        if _same(ours[key], given[key]):
            continue
        a, b = tuple(ours[key].shape), tuple(given[key].shape)
        how = f"shape {a} vs {b}" if a != b else "same shape, other values"
        why = (
            "causalmm_pixels comes from another processor call than the prompts (other text, images or batch order)"
            if key in _NOT_IMAGE
            else "it holds other images (or another batch order) than generate was given, and the answer would be "
            "about them"
        )
        raise _refuse(
            f"causalmm_pixels['{key}'] is not the {key} given to generate ({how}): {why}; pass causalmm_pixels=inputs, "
            "the same processor output as **inputs"
        )
    extra = {k: v for k, v in (call or {}).items() if k not in _NOT_IMAGE and k not in ours}
    return {**extra, **ours}


def _image_token_id(model: torch.nn.Module) -> int | None:
    """The id of the image placeholder token in the model's prompts (``None`` where the config names none)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _feature_sizes(
    model: torch.nn.Module, mm_outputs: Any, grid: torch.Tensor | None, beams: int
) -> tuple[list[int], bool] | None:
    """How many image tokens each encoded image (or tile) fills, and whether the entries are whole images.

    From the features ``generate`` encoded (``mm_encoder_outputs``: per image a tensor as long as its tokens, or
    one stacked tensor whose rows may be tiles), the count ``transformers`` itself splits features by; without
    them, from a packed tower's grid (``t*h*w / merge**2`` tokens per image). ``None`` where neither is there."""
    image = mm_outputs.get("image") if isinstance(mm_outputs, Mapping) else None
    pooled = getattr(image, "pooler_output", None)
    if pooled is not None:
        return [len(p) for p in pooled], isinstance(pooled, (list, tuple))
    merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None)
    if grid is None or not isinstance(merge, int):
        return None
    return [int(c) // merge**2 for c in grid.prod(-1).tolist() for _ in range(beams)], True


def _check_image_tokens(
    model: torch.nn.Module, input_ids: torch.Tensor, mm_outputs: Any, grid: torch.Tensor | None, beams: int
) -> None:
    """Each prompt holds one image's placeholder tokens, as many as its image fills: refused here in one line,
    where the engine would fail deep inside the model or, with counts that add up over the batch, pair a prompt
    with features of another prompt's image. ``input_ids``: the rows ``generate`` handed over (``beams`` per
    prompt), which its ``mm_encoder_outputs`` follow."""
    token = _image_token_id(model)
    if token is None:
        return
    tokens = (input_ids == token).sum(-1).tolist()
    empty = [r // beams for r, t in enumerate(tokens) if t == 0]
    if empty:
        raise _refuse(
            f"prompt {empty[0]} holds no image token: each prompt needs the placeholder of its one image (the chat "
            "template's image entry, expanded by processor(text=..., images=...))"
        )
    found = _feature_sizes(model, mm_outputs, grid, beams)
    if found is None:
        return
    sizes, per_image = found
    fix = "give each prompt one image placeholder and pass input_ids and the pixels of one processor output"
    if per_image and len(sizes) != len(tokens):
        raise _refuse(f"{len(sizes) // beams} images for {len(tokens) // beams} prompt(s): {fix}")
    if per_image:
        for r, (t, s) in enumerate(zip(tokens, sizes, strict=True)):
            if t != s:
                raise _refuse(f"prompt {r // beams} holds {t} image tokens where its image fills {s}: {fix}")
    elif sum(sizes) != sum(tokens) or not set(itertools.accumulate(tokens)) <= set(itertools.accumulate(sizes)):
        raise _refuse(f"the prompts hold {sum(tokens)} image tokens where their images fill {sum(sizes)}: {fix}")


def _options(generation_config: Any, prompt_length: int) -> GenerationOptions:
    """The engine's token-selection options from ``generate``'s prepared generation config."""
    g = generation_config
    max_new = int(g.max_length) - prompt_length if g.max_length is not None else g.max_new_tokens
    sample = bool(g.do_sample)
    top_p = g.top_p if sample and g.top_p is not None and g.top_p < 1.0 else None
    beams = int(g.num_beams or 1)
    # a checkpoint's generation config may carry beam settings (early_stopping=True) that transformers applies to
    # beam search only: they are passed on only where there is one, or a greedy call would be refused for them
    return GenerationOptions(
        max_new_tokens=int(max_new) if max_new is not None else 0,
        do_sample=sample,
        temperature=float(g.temperature) if sample and g.temperature else 1.0,
        top_k=int(g.top_k) if sample and g.top_k else None,
        top_p=float(top_p) if top_p is not None else None,
        repetition_penalty=float(g.repetition_penalty) if g.repetition_penalty else 1.0,
        num_beams=beams,
        length_penalty=float(g.length_penalty) if beams > 1 and g.length_penalty is not None else 1.0,
        early_stopping=g.early_stopping if beams > 1 and g.early_stopping is not None else False,
        no_repeat_ngram_size=int(g.no_repeat_ngram_size or 0),
    )


def _check_call(generation_config: Any, logits_processor: Any, stopping_criteria: Any) -> None:
    g = generation_config
    if (g.num_return_sequences or 1) > 1:
        raise _refuse(
            f"num_return_sequences={g.num_return_sequences}: one sequence per prompt; repeat the prompt with other "
            "seeds (causalmm_seeds=) for several samples"
        )
    asked = [f for f in _OUTPUT_FLAGS if getattr(g, f, False)]
    if asked:
        raise _refuse(f"{', '.join(asked)} not available; it returns the sequences (CausalMM.generate with "
                      "return_branch_logits=True gives each branch's scores)")  # fmt: skip
    unknown = [type(p).__name__ for p in logits_processor or () if type(p).__name__ not in _KNOWN_PROCESSORS]
    unknown += [type(c).__name__ for c in stopping_criteria or () if type(c).__name__ not in _KNOWN_CRITERIA]
    if unknown:
        raise _refuse(
            f"{', '.join(unknown)} not applied by the contrastive decoding (it applies greedy or sampling with "
            "temperature, top_k, top_p, repetition_penalty, max_new_tokens and eos); drop that option"
        )


def generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    causalmm: CausalMMConfig | Mapping[str, Any] | None = None,
    causalmm_pixels: Mapping[str, Any] | None = None,
    causalmm_seeds: list[int] | None = None,
    causalmm_image_seeds: list[int] | None = None,
    **model_kwargs: Any,
) -> Any:
    """The ``custom_generate`` function: CausalMM decoding of the prepared batch.

    Args:
        model: the vision-language model ``generate`` was called on.
        input_ids: the prompts' ids (left- or right-padded, one image per prompt).
        causalmm: the decoding config (a :class:`CausalMMConfig` or its dict); default ``CausalMMConfig()``.
        causalmm_pixels: the image inputs, e.g. the processor output itself (required: see the module notes).
        causalmm_seeds / causalmm_image_seeds: per-prompt seeds, as in :meth:`CausalMM.generate` (default:
            the config's seed for every prompt).
        model_kwargs: what ``generate`` prepared (attention mask, token type ids; its cache and encoded image
            features are not used: the engine lays out its own rows).

    Returns:
        The prompts followed by the generated ids, finished rows padded with the pad token, like ``generate``;
        a ``GenerateDecoderOnlyOutput`` with ``sequences`` when ``return_dict_in_generate=True``.

    Raises:
        InputError: an option the engine does not apply; ``causalmm_pixels`` that are not the inputs ``generate``
            was given (another image, processor call or batch order); prompts whose image tokens do not fit one
            image each (none, two placeholders, a count its image does not fill); a grid that is not the pixels'.
    """
    caller = _caller_arguments()
    if caller.get("streamer") is not None:
        raise _refuse("streamers are not supported (the engine decides every branch's token before any is final)")
    if caller.get("assistant_model") is not None:
        raise _refuse("assisted generation (assistant_model=) is not supported")
    if generation_config is None:
        raise _refuse("call it through model.generate(..., custom_generate=causalmm.hf.generate)")
    _check_call(generation_config, logits_processor, stopping_criteria)
    if causalmm_pixels is None:
        raise _refuse(
            "pass the image inputs as causalmm_pixels=inputs (the processor output): generate hands custom "
            "functions encoded image features, and the counterfactual branches need the pixels"
        )
    try:
        config = CausalMMConfig.from_dict(dict(causalmm)) if isinstance(causalmm, Mapping) else causalmm
        config = config or CausalMMConfig()
        options = _options(generation_config, int(input_ids.shape[1]))
    except ConfigError as err:
        raise _refuse(str(err)) from None
    if not isinstance(config, CausalMMConfig):
        raise _refuse(f"causalmm= takes a CausalMMConfig or a dict of its fields, not {type(causalmm).__name__}")
    beams = int(generation_config.num_beams or 1)
    rows = input_ids
    if beams > 1:  # generate repeated each prompt once per beam (repeat_interleave): one copy of each
        input_ids, model_kwargs = _one_per_prompt(input_ids, model_kwargs, beams)
    pixels = _matching_pixels(causalmm_pixels, caller.get("call"), input_ids)
    grid = pixels.get("image_grid_thw")
    _check_image_tokens(model, rows, model_kwargs.get("mm_encoder_outputs"), grid, beams)
    encs = split_inputs(input_ids, model_kwargs, pixels)
    before = _implementations(model.config)
    try:
        engine = Engine(get_adapter(model, None, base=_base_of(model)), config, Switches())
        eos = getattr(generation_config, "_eos_token_tensor", None)
        if eos is not None:
            engine.eos = {int(t) for t in eos.flatten().tolist()}
        results = engine.generate_encoded(encs, options, seeds=causalmm_seeds, image_seeds=causalmm_image_seeds)
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad_id = int(pad) if pad is not None else (min(engine.eos) if engine.eos else 0)
    longest = max(len(r.token_ids) for r in results)
    new = torch.full((len(results), longest), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for i, r in enumerate(results):
        new[i, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new], dim=1)
    if getattr(generation_config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

        return (GenerateBeamDecoderOnlyOutput if beams > 1 else GenerateDecoderOnlyOutput)(sequences=sequences)
    return sequences


def _one_per_prompt(input_ids: torch.Tensor, tokens: dict[str, Any], beams: int) -> tuple[torch.Tensor, dict]:
    """Undo ``generate``'s expansion of each prompt into ``beams`` consecutive copies: the ids and every per-token
    input (the attention mask, token type ids) keep one row per prompt; the rest is not read per row."""
    rows = int(input_ids.shape[0])
    if rows % beams:
        raise _refuse(f"{rows} rows for num_beams={beams}: expected each prompt repeated once per beam")
    first = input_ids[::beams]
    if not torch.equal(first.repeat_interleave(beams, 0), input_ids):
        raise _refuse(f"the {rows} rows are not each prompt repeated num_beams={beams} times; call generate directly")
    out = {
        k: v[::beams] if isinstance(v, torch.Tensor) and k in TOKEN_KEYS and v.dim() and v.shape[0] == rows else v
        for k, v in tokens.items()
    }
    return first, out


#: ``generate``'s own arguments, which the Hub form passes on as they are
_GENERATE_ARGS = (
    "inputs",
    "generation_config",
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
)


def generate_from_inputs(model: torch.nn.Module, **kwargs: Any) -> Any:
    """The Hub form: ``model.generate(**inputs, custom_generate="owner/repo", trust_remote_code=True, ...)`` calls
    the repository's ``generate(model, **kwargs)`` with ``generate``'s raw arguments, pixels included, before any
    preparation. This takes the image inputs from them and runs ``generate`` with :func:`generate`, so both forms
    decode alike; ``causalmm_pixels`` is then not needed."""
    if kwargs.get("streamer") is not None:
        raise _refuse("streamers are not supported (the engine decides every branch's token before any is final)")
    if kwargs.get("assistant_model") is not None:
        raise _refuse("assisted generation (assistant_model=) is not supported")
    for name in ("prefix_allowed_tokens_fn", "negative_prompt_ids"):
        if kwargs.get(name) is not None:
            raise _refuse(f"{name}= is not applied by the contrastive decoding; drop it")
    passed = {k: kwargs.pop(k) for k in _GENERATE_ARGS if k in kwargs}
    for name in ("streamer", "assistant_model", "custom_generate", "trust_remote_code"):
        kwargs.pop(name, None)
    if kwargs.get("causalmm_pixels") is None:
        kwargs["causalmm_pixels"] = {
            k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _NOT_IMAGE
        }
    # the class's generate: a model loaded with this repository's custom_generate has its instance's replaced
    return type(model).generate(model, **passed, custom_generate=generate, **kwargs)
