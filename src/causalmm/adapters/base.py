"""The generic adapter: what the engine needs to know about a ``transformers`` vision-language model.

It finds the vision tower and the LLM's attention modules and tags them as intervention sites (``sites.py``),
turns an (image, prompt) pair into model inputs with the model's own processor and chat template, computes image
features (the vision tower runs here, once per image and branch kind, and the LLM receives them through the
forward's ``mm_encoder_outputs``), and gives explicit position ids so left padding changes nothing. A prompt
that leaves no room for the answer in the LLM's positions is refused (``context.py``).

What it assumes of a family is only what ``transformers`` itself exposes: the features go back to the LLM in
the container ``get_image_features`` returned them in (a tuple per image, one tensor, plus any further
per-image fields such as Qwen3-VL's deepstack features); positions are numbered by the model's own
generation helpers (so M-RoPE and PaliGemma's 1-based positions come out as ``generate`` makes them); and
an image whose vision tower is intervened on runs through the tower alone, so it does not matter how the
tower lays images out (rows, crops, tiles, sub-images, one packed sequence).

Family files subclass it only where a family is known better: how many vision-tower "units" an image
occupies (LLaVA: one row; LLaVA-NeXT: one row per crop; Qwen2-VL: a run of tokens of one packed sequence),
so interventions run batched; which vision layer feeds the LLM; the original release's feature gate.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import InputError, UnsupportedModelError
from ..sites import Intervention, intervene
from ..sites.find import check_base, find_sites, route_attention
from .context import ContextLimit

__all__ = ["Adapter", "ImageBatch", "ImageFeatures"]

#: Processor outputs laid out one value per token: never image inputs (``labels``, which PaliGemma's processor
#: returns, is dropped; the others are left-padded with the sequence and passed at prefill only).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")
#: Fields of a vision output the LLM does not read from ``mm_encoder_outputs`` (it reads ``pooler_output``).
_STANDARD_OUTPUTS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


@dataclasses.dataclass
class ImageFeatures:
    """One image's features where the model's image output holds more than ``pooler_output`` for the LLM
    (Qwen3-VL's deepstack features): ``extra`` maps each further field to this image's share of it."""

    pooled: torch.Tensor
    extra: dict[str, Any]


class ImageBatch(dict):
    """Collated image inputs (``key -> tensor``) that remember the per-image inputs (``parts``) they came from."""

    parts: list[dict[str, torch.Tensor]]


class Adapter(ContextLimit):
    """Generic adapter; works for any model that routes both towers through ``AttentionInterface``.

    Args:
        model: a ``*ForConditionalGeneration`` vision-language model.
        processor: its processor (tokenizer + image processor + chat template).
        base: ``sdpa`` (fast) or ``eager`` attention underneath the hook for non-intervened calls.
    """

    family = "generic"
    #: whether :meth:`gated_image_features` (the original release's feature gate) exists for this family
    supports_gate = False
    #: whether the engine may prefill a prompt prefix shared by several rows once and fork its KV cache
    #: (proven token-identical to the full prefill by tests/test_prefix_reuse.py for the families that set it)
    supports_prefix_reuse = False
    #: whether :meth:`vision_units` knows how the tower lays images out (batch rows, or tokens of a packed
    #: sequence), so a vision intervention can address images inside one batched tower call. The generic
    #: adapter cannot know (crops, tiles, sub-images, one sequence for all images as in Pixtral), so it counts
    #: one unit per image and runs each intervened image through the tower on its own.
    batched_vision_interventions = False
    #: whether the engine may run the LLM layers below the first intervened one once for a language-branch
    #: row and its factual row (``causalmm.sharing``; proven token-identical by tests/test_layer_sharing.py
    #: for the families that set it). Off by default: a family may act on per-row inputs between decoder
    #: layers (Qwen3-VL adds its deepstack features there).
    supports_layer_sharing = False
    #: whether the model's logits are exactly ``get_output_embeddings()`` applied to the last hidden states
    #: (no soft-capping or scaling after the head), so the engine may compute a counterfactual row's logits
    #: itself on the plausible tokens only (``causalmm.head``). Off by default: Gemma-style families cap them.
    plain_lm_head = False

    def __init__(self, model: torch.nn.Module, processor: Any, *, base: str = "sdpa") -> None:
        check_base(base)
        self.model = model
        self.processor = processor
        sites = find_sites(model)
        self.tower, self.lm, self.packed = sites.tower, sites.lm, sites.packed
        self.vision_attn, self.lm_attn = sites.vision_attn, sites.lm_attn
        #: the decoder layer holding each of :attr:`lm_attn`, in the same order
        self.lm_layers = sites.lm_layers
        #: every module the engine may act at (:class:`~causalmm.sites.find.Sites`)
        self.sites = sites
        route_attention(model, sites, base)

    # -- model facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    @property
    def n_vision_layers(self) -> int:
        """Vision layers whose output can reach the LLM (later ones are computed but never read)."""
        return len(self.vision_attn)

    @property
    def n_language_layers(self) -> int:
        return len(self.lm_attn)

    def default_vision_layers(self) -> list[int]:
        """The last vision layer that feeds the LLM (the penultimate CLIP layer for LLaVA-1.5)."""
        return [self.n_vision_layers - 1]

    # -- inputs ------------------------------------------------------------------------------------
    def format_prompt(self, prompt: str, *, system: str | None = None, image: bool = True) -> str:
        """The prompt wrapped in the model's chat template with one image (``image=False``: none), after a system
        message ``system`` if given (in the template's own place for it)."""
        content = [{"type": "image"}] if image else []
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        template = getattr(self.processor, "chat_template", None)
        if template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # No template (PaliGemma's pt/mix checkpoints): the image placeholder, then the prompt as it is; the
        # processor expands the placeholder (and PaliGemma's adds its bos and "\n").
        image_token = getattr(self.processor, "image_token", None)
        if isinstance(image_token, str) and image_token:
            if system is not None:
                raise UnsupportedModelError(
                    f"the processor of {type(self.model).__name__} has no chat template, so no place for a system "
                    "instruction; set processor.chat_template"
                )
            return image_token + prompt if image else prompt
        raise UnsupportedModelError(
            f"the processor of {type(self.model).__name__} has neither a chat template nor an image token; "
            "set processor.chat_template"
        )

    def encode(
        self, image: Image.Image, prompt: str, *, system: str | None = None, answer: str = ""
    ) -> dict[str, torch.Tensor]:
        """Processor outputs for one (image, prompt) pair, batch dimension 1 on token keys; ``system``: a system
        instruction (ICD's disturbance instruction), in the template's place for one; ``answer``: text after the
        template's generation prompt, as the assistant's answer so far (VTI's fit reads captions so).

        A template that writes the bos token itself (Gemma, Mistral) must not get a second one from the
        tokenizer: as in ``processor.apply_chat_template(tokenize=True)``, special tokens are then not added.

        Raises:
            InputError: the processor refuses the image (Qwen2-VL: an aspect ratio over 200), or the prompt with
                the positions :meth:`reserving` keeps for the answer exceeds the LLM's (:func:`max_positions`).
        """
        text = self.format_prompt(prompt, system=system) + answer
        try:
            out = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt", **self._special(text))
        except ValueError as err:  # the processor's own limits on images (size, aspect ratio)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"the image ({image.width}x{image.height} pixels) is refused by {type(self.processor).__name__}: "
                f"{reason}; resize, crop or pad the image to fit"
            ) from err
        enc = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        self._check_length(enc)
        return enc

    def encode_text(self, prompt: str, image: Image.Image | None = None) -> dict[str, torch.Tensor]:
        """Token inputs of the prompt without its image (the text-only branch of M3ID and PAI): the same chat
        template with the image left out; for a model without a template (PaliGemma), the prompt's own tokens with
        the image tokens taken out (``image`` needed), as PAI's ``model_loader.py`` builds it.

        Raises:
            UnsupportedModelError: the family's processor cannot encode text without an image.
        """
        tok = getattr(self.processor, "tokenizer", None)
        if not getattr(self.processor, "chat_template", None) and image is not None:
            enc = self.encode(image, prompt)
            keep = ~torch.isin(enc["input_ids"][0], self.image_token_ids)
            return {k: v[:, keep] for k, v in enc.items() if k in TOKEN_KEYS and k != "labels"}
        if tok is None:
            raise UnsupportedModelError(
                f"{type(self.processor).__name__} has no tokenizer to encode a prompt without its image"
            )
        text = self.format_prompt(prompt, image=False)
        out = tok([text], return_tensors="pt", **self._special(text))
        enc = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k in TOKEN_KEYS}
        self._check_length(enc)
        return enc

    @property
    def image_token_ids(self) -> torch.Tensor:
        """The token ids that mark image (and video) positions in a prompt."""
        cfg = self.model.config
        ids = ("image_token_id", "image_token_index", "video_token_id")
        return torch.tensor(sorted({v for a in ids if isinstance(v := getattr(cfg, a, None), int)}), dtype=torch.long)

    def _special(self, text: str) -> dict[str, bool]:
        bos = getattr(getattr(self.processor, "tokenizer", None), "bos_token", None)
        return {"add_special_tokens": False} if bos and text.startswith(bos) else {}

    def image_inputs(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in enc.items() if k not in TOKEN_KEYS}

    def collate_images(self, items: list[dict[str, torch.Tensor]]) -> ImageBatch:
        """Concatenate per-image inputs along dim 0, zero-padding other dims (LLaVA-NeXT crop counts differ).

        The result remembers ``items`` (:class:`ImageBatch`), so the generic adapter can run images one by one.
        """
        out = ImageBatch()
        out.parts = list(items)
        for key in items[0]:
            ts = [it[key] for it in items]
            shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
            padded = []
            for t in ts:
                pad = []
                for d in reversed(range(1, t.dim())):
                    pad += [0, shape[d - 1] - t.shape[d]]
                padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
            out[key] = torch.cat(padded, dim=0)
        return out

    def vision_units(self, images: dict[str, torch.Tensor]) -> list[int]:
        """How many vision-tower units (batch rows, or packed tokens) each image occupies.

        Without :attr:`batched_vision_interventions` a unit is an image (see :meth:`image_features`).
        """
        if not self.batched_vision_interventions and isinstance(images, ImageBatch):
            return [1] * len(images.parts)
        if self.packed:
            return images["image_grid_thw"].prod(-1).tolist()
        n = images["pixel_values"].shape[0]
        return [1] * n

    # -- vision ------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: dict[str, torch.Tensor], state: Intervention | None = None) -> list[Any]:
        """Projected image features, one item per image (a tensor, or :class:`ImageFeatures` where the model's
        image output carries more than ``pooler_output``), optionally under a vision intervention.

        ``state.vision_targets`` address :meth:`vision_units`. Without :attr:`batched_vision_interventions`
        those are images: each targeted image runs through the tower alone with every call of that run
        intervened, and the other images come from one plain batched call, so they are exactly the
        features an intervention-free call gives.
        """
        if (
            state is not None
            and state.vision_targets
            and not self.batched_vision_interventions
            and isinstance(images, ImageBatch)
        ):
            return self._one_by_one(images, state)
        return self._batched_features(images, state)

    def _one_by_one(self, images: ImageBatch, state: Intervention) -> list[Any]:
        n = len(images.parts)
        gens: dict[int, torch.Generator | None] = {}
        for lo, hi, gen in state.vision_targets:
            gens.update({i: gen for i in range(max(lo, 0), min(hi, n))})
        out: list[Any] = [None] * n
        if len(gens) < n:
            plain = self._batched_features(images, None)
            out = [None if i in gens else f for i, f in enumerate(plain)]
        for i, gen in sorted(gens.items()):
            one = dataclasses.replace(state, vision_targets=[(0, sys.maxsize, gen)], _offsets={})
            out[i] = self._batched_features(self.collate_images([images.parts[i]]), one)[0]
        return out

    def _batched_features(self, images: dict[str, torch.Tensor], state: Intervention | None) -> list[Any]:
        inner = getattr(self.model, "model", self.model)
        kwargs = {k: v.to(self.device) for k, v in images.items()}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(self.dtype)
        if state is None:
            state = Intervention()
        with intervene(state):
            out = inner.get_image_features(**kwargs, return_dict=True)
        feats = out.pooler_output if isinstance(out, BaseModelOutputWithPooling) else out
        per_image = self._split_pooled(feats, images)
        extra = {}
        if isinstance(out, BaseModelOutputWithPooling):
            extra = {k: v for k, v in out.items() if k not in _STANDARD_OUTPUTS and v is not None}
        if not extra:
            return per_image
        # Further per-image fields the LLM reads (Qwen3-VL's deepstack features: per layer, a tuple with one
        # tensor per image): each image keeps its share, and features_input rebuilds the same structure.
        self._output_cls = type(out)
        shares = {k: _per_image(v, len(per_image)) for k, v in extra.items()}
        bad = [k for k, v in shares.items() if v is None]
        if bad:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: its image features carry {', '.join(bad)} besides pooler_output, "
                "not laid out per image (a tuple with one tensor per image, or a list of such tuples), so the "
                "generic adapter cannot hand them to the LLM; the family needs an adapter of its own"
            )
        return [ImageFeatures(f, {k: v[i] for k, v in shares.items()}) for i, f in enumerate(per_image)]

    def _split_pooled(self, feats: Any, images: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(feats, (list, tuple)):
            self._stacked = False
            return list(feats)
        # One tensor for the whole batch (Gemma 3, PaliGemma...): give each image its slice, leading dim kept,
        # and hand the LLM their concatenation.
        self._stacked = True
        parts = getattr(images, "parts", None)
        rows = [int(p["pixel_values"].shape[0]) for p in parts] if parts else self.vision_units(images)
        if feats.shape[0] == sum(rows):  # one row per image, or per crop/tile
            return list(feats.split(rows))
        if parts and feats.shape[0] == len(parts):
            return list(feats.split(1))
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: cannot split its image features of shape {tuple(feats.shape)} per image "
            f"(inputs of {len(rows)} images with {sum(rows)} pixel rows); the family needs an adapter of its own"
        )

    def features_input(self, feats: list[Any]) -> dict[str, Any]:
        """Forward kwargs that hand precomputed image features to the LLM, in the container the model's own
        ``get_image_features`` returns (a tuple of per-image tensors, or one tensor, plus any further
        per-image fields)."""
        if not feats:  # text-only rows
            return {}
        pooled_items = [f.pooled if isinstance(f, ImageFeatures) else f for f in feats]
        pooled = torch.cat(pooled_items, dim=0) if getattr(self, "_stacked", False) else tuple(pooled_items)
        if not feats or not isinstance(feats[0], ImageFeatures):
            return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}
        extra = {}
        for key, first in feats[0].extra.items():
            if isinstance(first, torch.Tensor):
                extra[key] = tuple(f.extra[key] for f in feats)
            else:
                extra[key] = [tuple(f.extra[key][j] for f in feats) for j in range(len(first))]
        return {"mm_encoder_outputs": {"image": self._output_cls(pooler_output=pooled, **extra)}}

    # -- positions ---------------------------------------------------------------------------------
    def prefill_positions(self, batch: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of the prompt as ``generate`` numbers them, so left padding changes nothing.

        That is the model's own ``_prepare_position_ids_for_generation`` (counted from each row's first real
        token; multi-axis ids for M-RoPE models), passed through its ``prepare_inputs_for_generation``, where a
        family may shift them (PaliGemma counts from 1).
        """
        mask = batch["attention_mask"]
        ids = batch["input_ids"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        own = getattr(self.model, "_prepare_position_ids_for_generation", None)
        if own is not None:
            try:
                pos = own(ids, {**images, **batch})
            except (TypeError, ValueError, KeyError):  # pragma: no cover - an override wanting other inputs
                pass
        try:
            probe = self.model.prepare_inputs_for_generation(
                ids, attention_mask=mask, position_ids=pos, use_cache=True, is_first_iteration=True
            )
        except (TypeError, ValueError, KeyError):  # pragma: no cover - an override wanting other inputs
            return pos
        shifted = probe.get("position_ids") if isinstance(probe, dict) else None
        return shifted if isinstance(shifted, torch.Tensor) and shifted.shape == pos.shape else pos

    def next_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the next token for each row: one past the last."""
        return position_ids[..., -1:] + 1


def _per_image(value: Any, n: int) -> list[Any] | None:
    """``value`` cut per image: a tuple of ``n`` tensors gives its items; a list of such tuples gives, per
    image, the list of its tensors. ``None`` for anything else."""
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(t, torch.Tensor) for t in v) for v in value
    ):
        return [[v[i] for v in value] for i in range(n)]
    return None
