"""The sites beside attention: each MLP's output (LLM and tower) and each LLM decoder layer's output.

:func:`causalmm.sites.find.find_sites` hooks every tagged MLP and decoder layer once per model. A hook does nothing
unless the active :class:`~causalmm.sites.state.Intervention` holds an edit for it (``mlp``: called with the MLP's
input and output; ``layers``: called with the layer's output), so a model outside an intervention computes exactly
its own numbers. The edits here act per batch row, each row with its own state:

- :class:`MemoryRead` (MemVR): after each layer of a window, the early-exit entropy of each row's newest position;
  the first layer above the threshold makes the next layer's FFN read the row's image memory, that row only, in the
  same forward;
- :class:`Steer` (VISTA): every LLM layer's MLP output of a row steered by that row's vector for the layer;
- :class:`Shift` (VTI): every MLP output of the LLM's rows and of the tower's shifted along fixed directions fitted
  offline (one per LLM layer, one per tower layer and token);
- :class:`LastStates` (a reader): each layer's output at each row's newest position, for a method's probe;
- :class:`TowerStates` (a reader): each tower layer's output, every token, summed over rows (VTI's fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..interventions import memory_read, shift, steer, top_entropy
from .state import active
from .tags import SITE_ATTR, Site

__all__ = ["LastStates", "MemoryRead", "Shift", "Steer", "TowerStates", "layer_hook", "mlp_hook"]


def mlp_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a tagged MLP: the active ``mlp`` edit's output, or ``None`` (the MLP's own)."""
    state = active()
    if state is None or state.mlp is None:
        return None
    return state.mlp(getattr(module, SITE_ATTR), args[0], output)


def layer_hook(module: torch.nn.Module, args: tuple, output) -> None:
    """Forward hook of a tagged layer (an LLM decoder layer, or a tower layer): hands its output hidden states to the
    active ``layers`` reader, which reads the site's ``kind``."""
    state = active()
    if state is None or state.layers is None:
        return
    hidden = output[0] if isinstance(output, tuple) else output
    state.layers(getattr(module, SITE_ATTR), hidden)


@dataclass
class MemoryRead:
    """MemVR (github.com/1zhou-Wang/MemVR, ``memvr.py``), one forward's state.

    After LLM layer ``l`` with ``start < l < end``, each row in ``memory`` not yet triggered in this forward scores
    its newest position with the early-exit head (``head(norm(h))``) and takes the entropy of the top-10
    probabilities over ``log 10``; the first layer where it exceeds ``threshold`` triggers a read in the FFN of
    layer ``l + 1``, for that row only, at every position of the forward (the whole prompt at the prefill):
    ``(1 - ratio) FFN(x) + ratio * (mean|FFN(x)| / mean|x M^T M|) x M^T M``, ``M`` the row's image memory (its
    image features as the LLM receives them) and ``x`` the FFN's input. Means are over the row's own real positions
    (the official code, at batch size 1 and without padding, takes them over its one row).
    """

    ratio: float
    threshold: float
    start: int
    end: int
    #: batch row -> its image memory ``(tokens, hidden)``
    memory: dict[int, torch.Tensor]
    norm: torch.nn.Module
    head: torch.nn.Module
    #: the model's final-logit soft cap (``None``: none)
    cap: float | None = None
    #: batch row -> how many of the forward's last positions are its real tokens (a left-padded prefill: the read
    #: and its means take those only); ``None``: every position
    real: dict[int, int] | None = None
    #: batch row -> the layer whose FFN reads its memory (filled during the forward)
    read_at: dict[int, int] = field(default_factory=dict)

    def __call__(self, site: Site, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The MLP edit: the triggered rows' FFN output at this layer mixed with their memory read."""
        if site.kind != "language":
            return None
        rows = [r for r, layer in self.read_at.items() if layer == site.layer and r < out.shape[0]]
        if not rows:
            return None
        out = out.clone()
        for r in rows:
            n = out.shape[1] if self.real is None else min(self.real[r], out.shape[1])
            m = self.memory[r].to(x.device, x.dtype)
            out[r, -n:] = memory_read(x[r, -n:], out[r, -n:], m, self.ratio)
        return out

    def layers(self, site: Site, hidden: torch.Tensor) -> None:
        """The layer reader: the rows whose early-exit entropy after this layer triggers a read in the next."""
        if site.kind != "language" or not self.start < site.layer < self.end:
            return
        rows = [r for r in self.memory if r not in self.read_at and r < hidden.shape[0]]
        if not rows:
            return
        idx = torch.tensor(rows, device=hidden.device)
        logits = self.head(self.norm(hidden[idx, -1])).float()
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        for r, h in zip(rows, top_entropy(logits, 10).tolist(), strict=True):
            if h > self.threshold:
                self.read_at[r] = site.layer + 1


@dataclass
class Steer:
    """VISTA (github.com/LzVv123456/VISTA, ``llm_layers.py``, ``VSVLayer``): at every LLM layer ``l`` (``layers``:
    all by default, ``--layers None`` there), the MLP output of each row in ``vectors`` is steered by the row's
    vector ``vectors[row][l]`` at every position of the forward, prefill and decode
    (:func:`~causalmm.interventions.steer`)."""

    lam: float
    #: batch row -> its vectors ``(LLM layers, hidden)``
    vectors: dict[int, torch.Tensor]
    layers: frozenset[int] | None = None

    def __call__(self, site: Site, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if site.kind != "language" or (self.layers is not None and site.layer not in self.layers):
            return None
        rows = [r for r in sorted(self.vectors) if r < out.shape[0]]
        if not rows:
            return None
        v = torch.stack([self.vectors[r][site.layer] for r in rows]).to(out.device)  # (rows, hidden)
        out = out.clone()
        if rows == list(range(rows[0], rows[0] + len(rows))):
            out[rows[0] : rows[0] + len(rows)] = steer(out[rows[0] : rows[0] + len(rows)], v[:, None, :], self.lam)
        else:
            idx = torch.tensor(rows, device=out.device)
            out[idx] = steer(out[idx], v[:, None, :], self.lam)
        return out


@dataclass
class Shift:
    """VTI (github.com/shengliu66/VTI, ``vti_utils/llm_layers.py``, ``VTILayer``): the MLP output of every LLM layer
    ``l``, at every position of the rows ``rows`` (``None``: every row), shifted along ``text[l]``, and the MLP output
    of every tower layer ``l`` along ``vision[l]``, token by token (:func:`~causalmm.interventions.shift`). The
    official wrapper hard-codes the factor 0.1: the strengths here are ``0.1 * alpha``."""

    #: ``(LLM layers, hidden)`` (``None``: the LLM is left as it is)
    text: torch.Tensor | None
    #: ``(tower layers, tokens, hidden)`` (``None``: the tower is left as it is)
    vision: torch.Tensor | None
    text_strength: float
    vision_strength: float
    rows: frozenset[int] | None = None

    def __call__(self, site: Site, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if site.kind == "vision":
            if self.vision is None or self.vision_strength == 0 or site.layer >= self.vision.shape[0]:
                return None
            d = self.vision[site.layer]
            if out.dim() != 3 or out.shape[1] != d.shape[0] or out.shape[2] != d.shape[1]:
                raise ConfigError(
                    f"vti: the tower's layer {site.layer} gives {tuple(out.shape)} outputs, and the vision directions "
                    f"were fitted for {d.shape[0]} tokens of {d.shape[1]} features: the image is encoded to another "
                    "number of tokens than the fit's images (fit the directions on images of this size), or give "
                    "--param alpha_image=0"
                )
            return shift(out, d.to(out.device), self.vision_strength)
        if self.text is None or self.text_strength == 0:
            return None
        d = self.text[site.layer].to(out.device)
        if self.rows is None:
            return shift(out, d, self.text_strength)
        rows = [r for r in sorted(self.rows) if r < out.shape[0]]
        if not rows:
            return None
        out = out.clone()
        idx = torch.tensor(rows, device=out.device)
        out[idx] = shift(out[idx], d, self.text_strength)
        return out


@dataclass
class TowerStates:
    """A reader of every tower layer's output: ``total[layer]`` sums it over the rows of every forward seen
    ``(tokens, hidden)``, in float32, and ``rows[layer]`` counts them, so that a mean over many images needs no more
    memory than one. A packed tower (Qwen2-VL: every image's tokens in one sequence) has no rows to sum."""

    total: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)

    def __call__(self, site: Site, hidden: torch.Tensor) -> None:
        if site.kind != "vision":
            return
        if site.packed or hidden.dim() != 3:
            raise ConfigError(
                "the tower packs every image's tokens into one sequence, so it has no per-token states to average "
                "over images"
            )
        s = hidden.float().sum(0)
        self.total[site.layer] = self.total[site.layer] + s if site.layer in self.total else s
        self.rows[site.layer] = self.rows.get(site.layer, 0) + hidden.shape[0]

    def mean(self) -> torch.Tensor:
        """The mean output of every tower layer seen, ``(layers, tokens, hidden)``."""
        return torch.stack([self.total[i] / self.rows[i] for i in sorted(self.total)])


@dataclass
class LastStates:
    """A reader of each LLM layer's output at the newest position of every row: ``seen[layer]`` is ``(rows,
    hidden)`` in float32 (the forward's rows end at their newest token: a left-padded prefill)."""

    seen: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, site: Site, hidden: torch.Tensor) -> None:
        if site.kind == "language":
            self.seen[site.layer] = hidden[:, -1].float()
