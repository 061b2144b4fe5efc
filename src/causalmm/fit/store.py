"""The file a fit writes: tensors in safetensors, with the model they were fitted on and how, so that a method
never applies one model's directions to another.

A model is named by a fingerprint of what makes its hidden states its own: its class, the shapes of its LLM and
tower, and its first input-embedding rows (rounded to bfloat16, so a model loaded in float32, float16 or bfloat16
has one fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError

__all__ = ["Fitted", "fingerprint", "load_fitted", "save_fitted"]

#: what a fit file says it is, in its metadata
FORMAT = "causalmm-fit/1"


def fingerprint(model: torch.nn.Module) -> str:
    """A short digest that names ``model``'s weights and shapes (see the module's docstring)."""
    h = hashlib.blake2b(digest_size=12)
    config = model.config
    text = config.get_text_config()
    shapes = {k: getattr(text, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    h.update(f"{type(model).__name__}{json.dumps(shapes, sort_keys=True)}".encode())
    emb = model.get_input_embeddings().weight
    h.update(emb[:8].detach().to("cpu", torch.bfloat16).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Fitted:
    """A fit: ``tensors`` by name, and ``meta`` (strings) naming the method, the model and the fit's settings."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def check_model(self, model: torch.nn.Module, path: str | Path, method: str) -> None:
        """Refuse a fit made for another method or another model, naming both and the fix."""
        if self.meta.get("method") != method:
            raise ConfigError(
                f"{path} holds a fit for {self.meta.get('method')!r}, not {method!r}; fit with `causalmm fit {method}`"
            )
        mine = fingerprint(model)
        if self.meta.get("fingerprint") != mine:
            raise ConfigError(
                f"{path} was fitted on the model {self.meta.get('model')!r} (fingerprint {self.meta.get('fingerprint')}"
                f"), not on this one ({type(model).__name__}, fingerprint {mine}): directions belong to the model they "
                f"were fitted on; refit with `causalmm fit {method} --model ...` on this model"
            )


def save_fitted(fit: Fitted, path: str | Path) -> Path:
    """Write ``fit`` to ``path`` (safetensors, contiguous float32 tensors, metadata beside them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in fit.tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, **fit.meta})
    return path


def load_fitted(path: str | Path) -> Fitted:
    """Read a fit file, or a ``ConfigError`` naming what is wrong with it (missing, not a fit, unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"fit file {path} does not exist; write it with `causalmm fit` (e.g. `causalmm fit vti`)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        why = f"fit file {path} cannot be read as safetensors ({err})"
        raise ConfigError(f"{why}; write it with `causalmm fit`") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a causalmm fit (format {meta.get('format')!r}); write it with `causalmm fit`")
    return Fitted(tensors, meta)
