"""What a decoding method is: the branches it runs beside the factual one, the config fields it reads (with
their defaults and where those come from), and its combination rule.

The engine (``causalmm.decoding``) builds any :class:`Branch`, batches every row of every prompt into one
forward per step and hands each prompt's next-token logits to :meth:`Method.combine`. A method is therefore
one small class in its own file under ``causalmm/methods/``, registered with :func:`register`; it touches the
engine only if it needs a new kind of branch input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..settings import ANY_DEPTH, FIELD_RANGES, ConfigError, Range, Settings, is_int, is_real, resolve_layers, shown

__all__ = [
    "Branch", "Directions", "FactualEdit", "ImageMemory", "Method", "Param", "Range", "ScoreScale", "SideLogits",
    "Steering",
]  # fmt: skip


@dataclass(frozen=True)
class Branch:
    """One counterfactual branch: what is changed relative to the factual run.

    ``vision``: counterfactual attention in the vision encoder; ``language``: in the LLM decoder;
    ``noise``: the image replaced by its diffusion-noised version (VCD). ``prompt``: the prompt the branch's rows
    read: ``factual`` (the sample's), ``text`` (the question alone, no image: M3ID, PAI), or the name of a variant
    the method writes with :meth:`Method.branch_prompt` (ICD's disturbance instruction), about the same image.
    ``blind``: the image features of the tokens the factual prefill attends to least zeroed, the method choosing
    them (:meth:`Method.blind_tokens`, AvisC). ``prune``: from an early LLM layer on, the image keys hidden but the
    least-attended few (:meth:`Method.prune_at`, SID). ``transform``: another image the method makes from the
    sample's (:meth:`Method.branch_image`, RITUAL's random transform); the branch's rows read the prompt encoded
    with it (its ``prompt`` names that variant), since its image-token count may differ.
    """

    name: str
    vision: bool = False
    language: bool = False
    noise: bool = False
    prompt: str = "factual"
    blind: bool = False
    prune: bool = False
    transform: bool = False

    def __post_init__(self) -> None:
        if self.prompt == "text" and (self.vision or self.noise or self.blind or self.prune or self.transform):
            raise ValueError(f"branch {self.name!r}: a text-only branch has no image to intervene on")
        if sum((self.vision, self.noise, self.blind, self.transform)) > 1:
            raise ValueError(f"branch {self.name!r}: one image per branch (vision, noise, blind or transform)")
        if self.transform and self.prompt in ("factual", "text"):
            raise ValueError(f"branch {self.name!r}: a transformed image needs its own prompt variant")

    @property
    def image(self) -> str:
        """The image features the branch's rows need: ``vision`` (intervened tower), ``noise``, ``blind``,
        ``transform`` (the method's own image), ``factual``, or ``none`` (a text-only branch)."""
        if self.prompt == "text":
            return "none"
        if self.transform:
            return "transform"
        return "vision" if self.vision else "noise" if self.noise else "blind" if self.blind else "factual"


@dataclass(frozen=True)
class FactualEdit:
    """An edit of the factual rows' own LLM attention (PAI): in the LLM layers from ``start_layer`` on, the
    newest query's pre-softmax scores ``x`` on the image keys become ``x + alpha * |x|``; at the prefill too
    where ``prefill``."""

    alpha: float
    start_layer: int
    prefill: bool


@dataclass(frozen=True)
class ScoreScale:
    """An edit of the factual rows' own LLM attention (VAF): in the LLM layers ``layers`` names (a layer spec), the
    pre-softmax scores of every query after the image are multiplied by ``enhance`` on the image keys and by
    ``suppress`` on the keys before the image (the system prompt), prefill and decode."""

    enhance: float
    suppress: float
    layers: str


@dataclass(frozen=True)
class ImageMemory:
    """A read of each factual row's image memory inside its LLM (MemVR): after each layer ``l`` with
    ``start < l < end``, the early-exit entropy of the row's newest position; the first above ``threshold`` makes
    the FFN of layer ``l + 1`` mix in the memory read with weight ``ratio`` (:class:`causalmm.sites.mlp.MemoryRead`).
    """

    ratio: float
    threshold: float
    start: int
    end: int


@dataclass(frozen=True)
class SideLogits:
    """A second set of logits from each factual row's own forward (ONLY): LLM layer ``layer``'s attention for the
    newest query, recomputed on the side with its outliers and low text-to-visual entropy-ratio heads zeroed, taken
    through the last layer's MLP (:class:`causalmm.sites.edits.SideOutput`); the rule reads them as the exit
    ``"side"``."""

    layer: int


@dataclass(frozen=True)
class Steering:
    """A steering of each factual row's LLM (VISTA): every layer's MLP output, at every position, prefill and decode,
    steered with strength ``lam`` by the row's vector for the layer: the last prompt token's layer output with the
    image minus that without it (two probe prefills, unsteered; :class:`causalmm.sites.mlp.Steer`)."""

    lam: float


@dataclass(frozen=True)
class Directions:
    """A shift of the factual rows' LLM and of the tower (VTI): every MLP output moved along directions fitted
    offline (``causalmm fit vti``) and read from ``path``, with strength ``alpha_text`` in the LLM and
    ``alpha_image`` in the tower (0: that part left as it is; :class:`causalmm.sites.mlp.Shift`)."""

    path: str
    alpha_text: float
    alpha_image: float


def layer_spec_check(what: str, words: tuple[str, ...]) -> Callable[[str], str | None]:
    """A :class:`Param` check for a layer spec (``resolve_layers`` syntax, range unknown until the model is) or
    one of ``words``."""

    def check(value: str) -> str | None:
        if value in words:
            return None
        try:
            resolve_layers(value, ANY_DEPTH, what=what)
        except ValueError as err:
            return f"{err}; or {' / '.join(words)}"
        return None

    return check


@dataclass(frozen=True)
class Param:
    """A hyper-parameter a method reads, its default, and where that default comes from.

    A ``field`` of :class:`~causalmm.config.CausalMMConfig` (``gamma``, ``epsilon``, ``mode``...) is shared by the
    methods; for ``gamma`` and ``epsilon`` the method's ``default`` is what ``None`` there resolves to. Any other
    name is the method's own: it lives in ``CausalMMConfig.params`` (``--param name=value``), typed like its
    default, and ``check`` (if given) returns why a value is out of range, or ``None``: a
    :class:`~causalmm.config.Range` for a number, so that the range is shown where the parameter is listed
    (``causalmm methods``), or any callable with ``accepts`` saying in words what it takes. ``vocab_bound``: the
    value may not exceed the model's vocabulary (a count of tokens), checked when the engine sees the model.
    ``grid``: the values worth trying when the method is tuned (``causalmm tune``; the knobs its paper sweeps,
    around the official value); the tuner always adds ``default``, so every grid holds the official setting.
    Empty: the parameter is not tuned.
    """

    field: str
    default: object
    source: str
    check: Callable[[Any], str | None] | None = None
    accepts: str = ""
    vocab_bound: bool = False
    grid: tuple[Any, ...] = ()

    def accepted(self) -> str:
        """What the parameter takes, in words: its range, its choices or its type."""
        if self.field in FIELD_RANGES:
            return FIELD_RANGES[self.field]
        kinds = {bool: "true | false", int: "an integer", float: "a number", str: "text"}
        if self.accepts:
            text = self.accepts
        else:
            text = str(self.check) if isinstance(self.check, Range) else kinds[type(self.default)]
        return text + (", at most the vocabulary size" if self.vocab_bound else "")

    def coerce(self, value: Any) -> Any:
        """``value`` as this parameter's type (an ``int`` default takes whole numbers, a ``float`` one any real
        number, a ``str`` one text), or a ``ConfigError`` naming the parameter."""
        kind = type(self.default)
        if isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value) if kind is float else int(value)
            except ValueError:
                raise ConfigError(f"parameter {self.field}={value!r} must be {kind.__name__}") from None
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            ok = isinstance(value, bool)
        elif kind is int:
            ok = is_int(value)
        elif kind is float:
            ok = is_real(value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            default = f"(default {self.default!r})"
            raise ConfigError(f"parameter {self.field}={shown(value)} must be {kind.__name__} {default}")
        value = kind(value)
        why = self.check(value) if self.check is not None else None
        if why:
            raise ConfigError(f"parameter {self.field}={shown(value)}: {why}")
        return value


def _shared_fields() -> frozenset[str]:
    """The fields of :class:`~causalmm.config.CausalMMConfig`, which the methods share."""
    return frozenset(Settings.__dataclass_fields__)


class Method:
    """A decoding method. Subclasses set the class attributes and override :meth:`branches` / :meth:`combine`.

    Attributes:
        name: the registry key (``CausalMMConfig.method``, ``--method``).
        summary: one line for ``--help`` and the docs.
        reference: the paper and official code the method follows (repository and file).
        params: the config fields it reads.
        plausible_only: the rule reads counterfactual logits only where the factual plausibility cut keeps a
            token, so the engine may compute them there only (``causalmm.decoding.head``).
        exit_norm: early-exit logits (:meth:`exit_layers`) go through the LLM's final norm before the LM head
            (DeCo) or not (DoLa).
        search: the engine runs this method's own search instead of choosing a token per step by the rule
            (``"opera"``: :mod:`causalmm.decoding.opera`); ``None`` for a rule.
        random_transform: a ``transform`` branch's image depends on the sample's seed (RITUAL's random transform;
            AGLA's local image does not).
        variants: settings of this method that tables compare as rows of their own, by name (CausalMM's branches:
            the row ``causalmm/language`` fixes ``mode="language"``); none: the method is one row.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    plausible_only: ClassVar[bool] = False
    exit_norm: ClassVar[bool] = False
    search: ClassVar[str | None] = None
    random_transform: ClassVar[bool] = True
    variants: ClassVar[dict[str, dict[str, Any]]] = {}

    def branches(self, config: Settings) -> tuple[Branch, ...]:
        """The counterfactual branches run beside the factual one (none: plain decoding)."""
        return ()

    def exit_layers(self, config: Settings, n_layers: int, tied: bool) -> tuple[int, ...]:
        """The early layers whose next-token logits the rule reads (layer-contrast methods), as indices of
        ``transformers``' ``hidden_states``: 0 the embeddings, ``i`` the output of decoder layer ``i - 1``, for an
        LLM of ``n_layers`` layers (``tied``: its input and output embeddings are tied). The engine hands their
        logits to :meth:`combine` as ``exits={index: logits}``. None by default."""
        return ()

    def prune_at(self, config: Settings) -> tuple[int, int]:
        """For a ``prune`` branch: the LLM layer whose attention chooses the image keys kept (they are hidden from
        the next layer on) and how many are kept."""
        raise NotImplementedError(f"{self.name}: a prune branch needs prune_at")

    def blind_tokens(self, attention: dict[int, torch.Tensor], config: Settings) -> torch.Tensor:
        """For a ``blind`` branch: the image tokens whose features it zeroes, a boolean mask ``(image tokens,)``,
        from the factual prefill's last-query attention on the image tokens, ``{layer: (image tokens,)}``."""
        raise NotImplementedError(f"{self.name}: a blind branch needs blind_tokens")

    def factual_edit(
        self, config: Settings
    ) -> FactualEdit | ScoreScale | ImageMemory | Steering | Directions | SideLogits | None:
        """An edit of the factual rows' own forward: their attention scores (PAI's boost, VAF's scaling), their MLPs
        (MemVR's memory read, VISTA's steering, VTI's shift, which moves the tower's too), or a side computation
        (ONLY's second logits); none: the factual rows are the model's own run."""
        return None

    def branch_image(
        self, branch: Branch, image: Any, seed: int, config: Settings, prompt: str, adapter: Any = None
    ) -> Any:
        """For a ``transform`` branch: the PIL image its rows see, made from the sample's ``image`` (and its
        ``prompt``: AGLA's local image keeps what the prompt is about) with the sample's ``seed``; ``adapter``: the
        model's, for a method that reads the model or runs a helper on its device (AGLA's matcher)."""
        raise NotImplementedError(f"{self.name}: a transform branch needs branch_image")

    def prepare(self, config: Settings, device: Any) -> None:
        """Load what the method needs beside the model (AGLA's matcher) before any work, so that a missing part is
        refused when the engine is built; nothing by default."""

    def branch_prompt(self, branch: Branch, prompt: str, config: Settings) -> tuple[str, str | None]:
        """The prompt and system message (``None``: the template's own) of ``branch``'s rows for the sample prompt
        ``prompt``, for a branch whose ``prompt`` names a variant (not ``factual`` or ``text``)."""
        raise NotImplementedError(f"{self.name}: branch {branch.name!r} names prompt variant {branch.prompt!r}")

    def default(self, name: str, fallback: Any) -> Any:
        """This method's default for the shared config field ``name`` (``fallback`` where it declares none)."""
        return next((p.default for p in self.params if p.field == name), fallback)

    def own_params(self) -> tuple[Param, ...]:
        """The parameters that are this method's own (not fields of the config)."""
        shared = _shared_fields()
        return tuple(p for p in self.params if p.field not in shared)

    def reads(self, settings: Mapping[str, Any]) -> frozenset[str]:
        """The shared config fields this method reads under ``settings`` (the config's field values, by name):
        those its :attr:`params` declare. Any other is refused when set (``CausalMMConfig``), so that a run never
        records a setting as applied that was not; a method whose fields depend on another (CausalMM's on its
        mode) narrows this."""
        shared = _shared_fields()
        return frozenset(p.field for p in self.params if p.field in shared)

    def tunable(self, settings: Mapping[str, Any]) -> tuple[Param, ...]:
        """The parameters ``causalmm tune`` sweeps under ``settings`` (the config's values by name, the method's own
        under ``params``): those that declare a grid and that the method reads there (CausalMM's vision fields
        not in ``mode="language"``)."""
        shared, read = _shared_fields(), self.reads(settings)
        return tuple(p for p in self.params if p.grid and (p.field in read or p.field not in shared))

    def unread_reason(self, name: str, settings: Mapping[str, Any], spell: Callable[[str], str] = str) -> str:
        """Why the shared field ``name`` does not apply to this method under ``settings``, and what to do: the
        tail of a one-line error that starts with the setting. ``spell`` names a setting as the caller's user
        gives it (the command line's ``--gamma``, ``--param lamb=VALUE``)."""
        readers = [m.name for m in METHODS.values() if name in {p.field for p in m.params}]
        by = f" (it is read by {', '.join(readers)})" if readers else ""
        has = ", ".join(spell(p.field) for p in self.params) or "none"
        return f"does not apply to method {self.name!r}{by}; leave {spell(name)} unset (its settings: {has})"

    def check_params(self, given: Any) -> dict[str, Any]:
        """``given`` (name -> value) checked against :meth:`own_params`, every one filled in with its default.

        A shared field named here is answered with where it goes (``gamma=`` beside ``method=``), another
        method's parameter with that method's name."""
        if not isinstance(given, dict):
            raise ConfigError(f"params={given!r} must be a mapping of parameter names to values")
        own = {p.field: p for p in self.own_params()}
        shared = sorted(set(given) & _shared_fields())
        if shared:
            name = shared[0]
            if name in {p.field for p in self.params}:
                raise ConfigError(
                    f"{name} is a setting the methods share, not a parameter of method {self.name!r}'s own: give it "
                    f"beside method= (CausalMMConfig({name}=...)), not in params"
                )
            raise ConfigError(f"{name} (given in params) {self.unread_reason(name, {})}")
        unknown = sorted(set(given) - set(own))
        if unknown:
            has = f"its parameters: {', '.join(own)}" if own else "it has no parameters of its own"
            owners = [m.name for m in METHODS.values() if unknown[0] in {p.field for p in m.own_params()}]
            where = f" ({unknown[0]} is a parameter of {', '.join(owners)})" if owners else ""
            raise ConfigError(f"method {self.name!r} has no parameter {', '.join(unknown)}; {has}{where}")
        return {name: p.coerce(given[name]) if name in given else p.default for name, p in own.items()}

    def combine(
        self, factual: torch.Tensor, counterfactuals: dict[str, torch.Tensor], config: Settings, step: int
    ) -> torch.Tensor:
        """Next-token scores ``(vocab,)`` from the factual logits and each branch's (mean over its draws);
        ``step`` counts generated tokens from 0."""
        return factual


#: method name -> the registered method (filled by :func:`causalmm.methods.registry.register`); declared here, beside
#: the class it holds, so that a method's messages can name the others that read a setting
METHODS: dict[str, Method] = {}
