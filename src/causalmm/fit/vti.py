"""VTI's directions, fitted offline from demos: what the method (``causalmm.methods.vti``) shifts the tower's and
the LLM's MLP outputs along.

Liu et al., ICLR 2025; official code github.com/shengliu66/VTI, ``vti_utils/utils.py`` (``get_demos``,
``mask_patches``, ``obtain_visual_vti``, ``obtain_textual_vti``) and ``experiments/eval/run_mmhal_vti.py`` (the
order and the settings of the README's command: 70 demos, 50 trials, 99% of the patches masked, seed 42). A demo is
an image, a question, and a caption of it with and without hallucinated objects (the official
``hallucination_vti_demos.jsonl``: ``image``, ``question``, ``value``, ``h_value``).

- **Vision** (one direction per tower layer and token): each demo's image is encoded 50 times with 99% of its
  patches (the tower's patch size) set to the image's per-channel mean; the direction of layer ``l`` and token ``t``
  is the mean over demos of (the mean over trials of the masked images' output of layer ``l`` at ``t``) minus the
  clean image's. The official adds a rank-1 PCA axis (a unit vector over groups of 577 x 25 x 1024 values that its
  reshape forms) to that mean; it is left out here, which moves each layer's unit direction by at most
  ``asin(1 / |d|)`` (written to the file as ``pca_bound``).
- **Text** (one direction per LLM layer), fitted after the vision direction with the tower already shifted (as the
  official script does): for each demo, the last token's hidden states (the model's ``hidden_states``: the
  embeddings, then each layer's output, the last after the final norm) of the prompt followed by the caption minus
  those followed by the hallucinated caption; the direction is their mean over demos plus the top principal axis of
  the centred differences over all layers at once (``obtain_textual_vti``'s ``PCA(n_components=1)``, the sign as its
  ``svd_flip``), the embeddings' entry then dropped.

The official code runs one image at a time; here the trials run in batches, which gives the same means.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..adapters import Adapter
from ..errors import ConfigError, InputError, UnsupportedModelError
from ..images import load_image
from ..sites import Intervention, intervene
from ..sites.mlp import Shift, TowerStates
from .store import Fitted, fingerprint

__all__ = ["DEFAULTS", "Demo", "fit_vti", "mask_patches", "pca_direction", "read_demos"]

#: the official README command's settings (``run_mmhal_vti.py``): demos, trials, masked share, alpha_image, seed
DEFAULTS = {"demos": 70, "trials": 50, "mask_ratio": 0.99, "alpha_image": 0.9, "seed": 42}
#: the question of every official demo
QUESTION = "Describe this image in detail."


@dataclass(frozen=True)
class Demo:
    """One demo: an image, a question about it, its caption (``value``) and the caption with hallucinated objects
    (``h_value``)."""

    image: Path
    question: str
    value: str
    h_value: str


def read_demos(path: str | Path, images: str | Path | None = None) -> list[Demo]:
    """The demos of a JSON-lines file in the official format (``image``, ``value``, ``h_value``, ``question``
    optional), each image found under ``images`` (default: beside the file).

    Raises:
        InputError: the file is missing or empty, a line is not a JSON object with those fields, or an image is not
            there; the message names the line and the fix.
    """
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    if not path.is_file():
        raise InputError(f"demo file {path} does not exist; give a JSON-lines file of image, value, h_value")
    demos = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{n} is not JSON ({err.msg}); write one JSON object per line") from None
        missing = [k for k in ("image", "value", "h_value") if not isinstance(item, dict) or k not in item]
        if missing:
            raise InputError(f"{path}:{n} has no {', '.join(missing)}; each demo needs image, value and h_value")
        if not all(isinstance(item.get(k, ""), str) for k in ("image", "value", "h_value", "question")):
            raise InputError(f"{path}:{n}: image, value, h_value and question must be text")
        image = root / item["image"]
        if not image.is_file():
            raise InputError(f"{path}:{n}: image {image} does not exist; give the folder of the demo images (--images)")
        demos.append(Demo(image, item.get("question") or QUESTION, item["value"], item["h_value"]))
    if not demos:
        raise InputError(f"{path} holds no demos; write one JSON object per line")
    return demos


def mask_patches(pixels: torch.Tensor, patch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """``pixels`` ``(..., channels, height, width)`` with ``int(ratio * n)`` of its ``n`` whole ``patch`` squares,
    drawn at random for each leading index (each crop its own), set to that image's per-channel mean (the official
    ``mask_patches``; the pixels beyond the last whole patch are never masked).

    >>> x = torch.arange(16.0).reshape(1, 4, 4)
    >>> mask_patches(x, 2, 0.75, torch.Generator().manual_seed(0))[0]  # 3 of the 4 squares set to the mean 7.5
    tensor([[ 7.5000,  7.5000,  7.5000,  7.5000],
            [ 7.5000,  7.5000,  7.5000,  7.5000],
            [ 8.0000,  9.0000,  7.5000,  7.5000],
            [12.0000, 13.0000,  7.5000,  7.5000]])
    """
    *lead, c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    n, k = rows * cols, int(ratio * rows * cols)
    flat = pixels.reshape(-1, c, h, w)
    out = flat.clone()
    mean = flat.mean(dim=(2, 3), keepdim=True)
    for i in range(flat.shape[0]):
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=gen)[:k]] = True
        grid = chosen.reshape(rows, cols).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        where = torch.zeros(h, w, dtype=torch.bool)
        where[: rows * patch, : cols * patch] = grid
        out[i] = torch.where(where, mean[i].to(out.dtype), out[i])
    return out.reshape(*lead, c, h, w)


def pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """The official rank-1 ``PCA`` direction of ``diffs`` ``(demos, features)``: their mean plus the unit top
    principal axis of the centred rows, signed so that the row scoring highest on it in magnitude scores positive
    (``svd_flip``). One demo has no axis: its difference alone.

    >>> pca_direction(torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]))  # mean (2, 0); the last row scores most
    tensor([3., 0.])
    """
    mean = diffs.float().mean(0)
    if diffs.shape[0] < 2:
        return mean
    u, _, vh = torch.linalg.svd(diffs.float() - mean, full_matrices=False)
    sign = torch.sign(u[u[:, 0].abs().argmax(), 0])
    return mean + (sign if sign != 0 else 1.0) * vh[0]


def _image_inputs(adapter: Adapter, demo: Demo) -> dict[str, torch.Tensor]:
    return adapter.image_inputs(adapter.encode(load_image(demo.image), demo.question))


def _tower_mean(adapter: Adapter, items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """Every tower layer's output ``(layers, tokens, hidden)``, averaged over the rows of ``items``' images, and
    the number of rows."""
    reader = TowerStates()
    adapter.image_features(adapter.collate_images(items), Intervention(layers=reader))
    if not reader.total:
        raise UnsupportedModelError(f"{type(adapter.model).__name__}: no tower layer was found to read")
    return reader.mean(), reader.rows[min(reader.rows)]


def _check_rows(adapter: Adapter, clean: dict[str, torch.Tensor]) -> None:
    """Refuse a tower that puts several images in one row (Pixtral's: one sequence per batch): its tokens are no
    fixed grid a per-token direction could follow."""
    name = type(adapter.model).__name__
    if clean["pixel_values"].dim() < 4:
        raise UnsupportedModelError(
            f"{name}: its pixel inputs are not images of square patches, so it has no per-token vision directions; "
            "fit the text direction alone (--no-vision, then --param alpha_image=0)"
        )
    one, two = _tower_mean(adapter, [clean])[1], _tower_mean(adapter, [clean, clean])[1]
    if two != 2 * one:
        raise UnsupportedModelError(
            f"{name}: its tower packs a batch's images into one sequence, so it has no per-token vision "
            "directions; fit the text direction alone (--no-vision, then --param alpha_image=0)"
        )


def _last_states(adapter: Adapter, enc: dict[str, torch.Tensor], state: Intervention) -> torch.Tensor:
    """The last token's hidden states ``(layers + 1, hidden)`` of one encoded prompt, under ``state``."""
    inputs = {k: v.to(adapter.device) for k, v in enc.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(adapter.dtype)
    with intervene(state):
        out = adapter.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    return torch.stack([h[0, -1].float() for h in out.hidden_states])


@torch.no_grad()
def fit_vti(
    adapter: Adapter,
    demos: list[Demo],
    *,
    n_demos: int = DEFAULTS["demos"],
    trials: int = DEFAULTS["trials"],
    mask_ratio: float = DEFAULTS["mask_ratio"],
    alpha_image: float = DEFAULTS["alpha_image"],
    seed: int = DEFAULTS["seed"],
    vision: bool = True,
    batch_size: int = 16,
    model_name: str = "",
    log: Callable[[str], None] | None = None,
) -> Fitted:
    """VTI's directions for ``adapter``'s model from ``n_demos`` of ``demos`` (drawn with ``seed``; all if fewer):
    ``vision`` ``(tower layers, tokens, hidden)`` (unless ``vision=False``) and ``text`` ``(LLM layers, hidden)``,
    the text fitted with the tower shifted by ``alpha_image`` (0: unshifted), as the official script does.

    Raises:
        ConfigError: a setting out of range.
        UnsupportedModelError: ``vision`` on a tower that packs every image into one sequence, or encodes images to
            other shapes than a grid of square patches (fit with ``vision=False``).
    """
    log = log or (lambda _: None)
    if not 0 < mask_ratio < 1:
        raise ConfigError(f"mask_ratio={mask_ratio} must be between 0 and 1 (the share of patches masked)")
    if trials < 1 or n_demos < 1 or batch_size < 1:
        raise ConfigError("trials, the number of demos and batch_size must be at least 1")
    if not 0 <= alpha_image <= 10:
        raise ConfigError(f"alpha_image={alpha_image} must be within 0..10 (0: fit the text with the tower as it is)")
    chosen = random.Random(seed).sample(demos, min(n_demos, len(demos)))
    gen = torch.Generator().manual_seed(seed)
    name = type(adapter.model).__name__
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "method": "vti", "model": model_name or name, "fingerprint": fingerprint(adapter.model),
        "demos": str(len(chosen)), "trials": str(trials), "mask_ratio": str(mask_ratio), "seed": str(seed),
        "alpha_image_at_fit": str(alpha_image if vision else 0.0),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }  # fmt: skip
    shift = Intervention()
    if vision:
        patch = getattr(getattr(adapter.model.config, "vision_config", None), "patch_size", None)
        if isinstance(patch, (list, tuple)) and len(set(patch)) == 1:
            patch = patch[0]  # InternVL's (14, 14)
        if adapter.packed or not isinstance(patch, int):
            why = "packs every image's tokens into one sequence" if adapter.packed else "has no square patch size"
            raise UnsupportedModelError(
                f"{name}: its tower {why}, so it has no per-token vision directions; fit the text direction alone "
                "(--no-vision, then --param alpha_image=0)"
            )
        total = None
        for i, demo in enumerate(chosen):
            clean = _image_inputs(adapter, demo)
            if i == 0:
                _check_rows(adapter, clean)
            base = _tower_mean(adapter, [clean])[0]
            masked = torch.zeros_like(base)
            for lo in range(0, trials, batch_size):
                items = [
                    {**clean, "pixel_values": mask_patches(clean["pixel_values"], patch, mask_ratio, gen)}
                    for _ in range(lo, min(trials, lo + batch_size))
                ]
                masked += _tower_mean(adapter, items)[0] * len(items)
            d = masked / trials - base
            total = d if total is None else total + d
            log(f"vision: demo {i + 1}/{len(chosen)}")
        direction = total / len(chosen)
        tensors["vision"] = direction
        norms = direction.norm(dim=-1)
        meta["pca_bound"] = str(float(torch.asin(torch.clamp(1.0 / norms.clamp_min(1e-12), max=1.0)).max()))
        meta["tokens"] = str(direction.shape[1])
        if alpha_image > 0:
            shift = Intervention(mlp=Shift(None, direction, 0.0, 0.1 * alpha_image))
    diffs = []
    for i, demo in enumerate(chosen):
        image = load_image(demo.image)
        pos = _last_states(adapter, adapter.encode(image, demo.question, answer=demo.value), shift)
        neg = _last_states(adapter, adapter.encode(image, demo.question, answer=demo.h_value), shift)
        diffs.append((pos - neg).flatten())
        log(f"text: demo {i + 1}/{len(chosen)}")
    layers = pos.shape[0]
    tensors["text"] = pca_direction(torch.stack(diffs)).view(layers, -1)[1:]
    if not all(math.isfinite(float(t.abs().max())) for t in tensors.values()):
        raise ConfigError("the fitted directions hold values that are not finite: the model's states overflow")
    return Fitted(tensors, meta)
