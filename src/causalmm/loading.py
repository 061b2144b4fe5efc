"""Loading a model and its processor, with one-line errors for what a user can get wrong.

Why this is more than ``AutoProcessor.from_pretrained`` + ``AutoModelForImageTextToText.from_pretrained``:

* **No torchvision.** Every video processor of ``transformers`` 5 needs torchvision, and the processors of
  Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and InternVL take one, so a checkpoint saved with its video
  processor (all of them on the hub) fails to load without torchvision, with an ImportError traceback, although
  their image processors run on PIL. Mistral 3's ``PixtralProcessor`` takes no video processor, but its module
  imports a pure-Python helper from the torchvision image processor's module. Where the image side works
  without torchvision, :func:`load_processor` loads an image-only variant of the checkpoint's own processor
  class (:func:`image_only_processor`: the same class minus the video processor, so images and prompts are
  processed exactly as the real class does), says so once, and refuses video input. It does this only when the
  checkpoint needs it; any other checkpoint goes through ``AutoProcessor`` unchanged.
* **Errors.** A device this machine lacks, a checkpoint that is not there, truncated or garbage safetensors, a
  pickled ``pytorch_model.bin`` that torch's safe (``weights_only``) loading refuses: each is an
  :class:`~causalmm.inputs.InputError` whose one line names the problem and the fix, raised before the model is
  half-loaded where that is possible.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import pickle
import re
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .inputs import InputError

__all__ = ["check_device", "image_only_processor", "load_pretrained", "load_processor", "pixtral_processor_class"]

logger = logging.getLogger(__name__)

#: ``device_map`` values that are placement strategies (accelerate), not devices.
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Values a per-module ``device_map`` dict may hold besides devices (offloading).
_OFFLOAD = ("disk", "meta")
#: The processor classes warned about already (the fallback is announced once per class and process).
_announced: set[str] = set()


def load_pretrained(name_or_path: str, **hf_kwargs: Any) -> tuple[Any, Any]:
    """The model (``AutoModelForImageTextToText``) and processor of a local directory or hub id.

    ``hf_kwargs`` go to the model's ``from_pretrained`` (``device_map``, ``dtype``...). A ``device_map`` naming a
    device this machine lacks is refused first, before anything is read.
    """
    from transformers import AutoModelForImageTextToText

    check_device(hf_kwargs.get("device_map"))
    local = Path(name_or_path).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(
            f"model {name_or_path!r} is not a local directory and HF_HUB_OFFLINE=1 forbids the hub; "
            "pass the path of a downloaded model, or unset HF_HUB_OFFLINE"
        )
    where = "the local directory" if local else "the Hugging Face hub (is the network reachable?)"
    try:
        processor = load_processor(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **hf_kwargs)
    except InputError:
        raise
    except OSError as err:
        raise InputError(f"cannot load model {name_or_path!r} from {where}: {_first_line(err)}") from err
    except ValueError as err:
        raise InputError(f"cannot load {name_or_path!r} as a vision-language model: {_first_line(err)}") from err
    except Exception as err:
        weights = _weights_error(name_or_path, err)
        if weights is None:
            raise
        raise weights from err
    return model, processor


# -- the device ------------------------------------------------------------------------------------------


def check_device(device_map: Any) -> None:
    """Refuse a ``device_map`` that names a device this machine lacks (or no device at all).

    Without this check ``--device cuda`` on a CPU-only torch fails deep in torch's lazy CUDA initialisation,
    after the checkpoint was read, with "Torch not compiled with CUDA enabled" and a traceback.
    """
    if device_map is None:
        return
    values: Iterable[Any] = device_map.values() if isinstance(device_map, dict) else [device_map]
    for value in values:
        if isinstance(value, str) and value in _STRATEGIES + _OFFLOAD:
            continue
        _check_one_device(value)


def _check_one_device(value: Any) -> None:
    try:
        # accelerate reads a bare int as the index of an accelerator; CUDA is the one this check knows
        is_index = isinstance(value, int) and not isinstance(value, bool)
        device = torch.device("cuda", value) if is_index else torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"device {value!r} is not a device torch knows; use cpu, cuda, cuda:N, mps or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is a CPU-only build"
                if torch.version.cuda is None
                else f"no CUDA GPU is visible to torch {torch.__version__}"
            )
            raise InputError(
                f"device {value!r} needs CUDA, but {why}; run on the CPU (--device cpu, device_map='cpu') "
                "or install a CUDA build of torch that matches your driver"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(
                f"device {value!r}: there is no CUDA GPU {device.index}, this machine has {count} "
                f"(cuda:0 to cuda:{count - 1}); pick one of those or use --device auto"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {value!r}: Apple's MPS is not available here; use --device cpu")


# -- the weights -----------------------------------------------------------------------------------------


def _safetensor_error() -> type[BaseException]:
    """safetensors' error class (raised as is through ``from_pretrained`` for a truncated or garbage file)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors: the class lives in the Rust extension only
        from safetensors._safetensors_rust import SafetensorError
    return SafetensorError


def _weights_error(name_or_path: str, err: Exception) -> InputError | None:
    """One line for a weights file torch or safetensors cannot read; ``None`` for an unrelated error."""
    text = str(err)
    if isinstance(err, _safetensor_error()):
        bad = _unreadable_safetensors(name_or_path)
        which = f"{bad.name} " if bad is not None else "its .safetensors weights "
        return InputError(
            f"cannot load the weights of {name_or_path!r}: {which}is truncated or not a safetensors file "
            f"({_first_line(err)}); download or save it again"
        )
    # torch names a refused global two ways ("Unsupported global: GLOBAL x", "unsupported GLOBAL x whose module
    # ... is blocked", for os.system and the like); a bare pickle (no torch zip) gets "Unsupported operand", as
    # does a file of garbage: told apart by the pickle protocol mark a real pickle starts with
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text and (found or _starts_as_pickle(name_or_path)):
        what = f"objects besides tensors ({found.group(1)})" if found else "instructions besides tensors"
        return InputError(
            f"cannot load the weights of {name_or_path!r}: its pytorch_model.bin pickles {what}, which torch's safe "
            "loading (weights_only) refuses, as they could run code; re-save it as safetensors where you trust the "
            "file (model.save_pretrained(dir, safe_serialization=True)), or get safetensors weights from its source"
        )
    if isinstance(err, pickle.UnpicklingError) or "PytorchStreamReader" in text:
        return InputError(
            f"cannot load the weights of {name_or_path!r}: its pytorch_model.bin is truncated or not a torch "
            "checkpoint; download or save it again"
        )
    return None


def _starts_as_pickle(name_or_path: str) -> bool:
    """Whether a local ``pytorch_model.bin`` begins with pickle's protocol mark (``0x80``, protocol 2-5)."""
    try:
        with (Path(name_or_path) / "pytorch_model.bin").open("rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unreadable_safetensors(name_or_path: str) -> Path | None:
    """The first ``.safetensors`` file of a local directory whose header safetensors cannot read."""
    from safetensors import safe_open

    root = Path(name_or_path)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # any failure names the file; the caller holds the real error
            return path
    return None


# -- the processor ---------------------------------------------------------------------------------------


def load_processor(name_or_path: str) -> Any:
    """The checkpoint's processor: ``AutoProcessor``'s, or where that cannot work without torchvision (see the
    module docstring) the image-only variant of the same class, announced once per class."""
    from transformers import AutoProcessor

    cls = _fallback_class(name_or_path)
    try:
        if cls is None:
            return AutoProcessor.from_pretrained(name_or_path)
        return cls.from_pretrained(name_or_path)
    except ImportError as err:
        if "torchvision" in str(err).lower():
            reason, fix = (
                "it needs torchvision, which is not installed",
                "install the torchvision build made for your torch",
            )
        else:
            reason, fix = _first_line(err), "install the package it names"
        raise InputError(f"cannot load the processor of {name_or_path!r}: {reason}; {fix}") from err


def _fallback_class(name_or_path: str) -> type | None:
    """The processor class to load instead of ``AutoProcessor``'s choice, or ``None`` where that choice works."""
    import transformers
    from transformers.utils import is_torchvision_available

    name = _processor_class_name(name_or_path)
    if name is None:
        return None
    torchvision = is_torchvision_available()
    if name == "PixtralProcessor" and not torchvision:
        # transformers hands out a placeholder that raises an ImportError for this class without torchvision
        logger.info("PixtralProcessor imported without torchvision (its resize helper taken from the PIL module)")
        return pixtral_processor_class()
    cls = getattr(transformers, name, None)
    if getattr(cls, "_backends", None):
        return None  # a placeholder for a class whose backend is missing: AutoProcessor raises, turned into one line
    if not isinstance(cls, type) or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    has_video = _has_video_config(name_or_path)
    if torchvision and has_video:
        return None
    if not has_video:  # nothing is dropped (a checkpoint saved image-only, as the tiny test models are)
        logger.info("%s loaded image-only: the checkpoint has no video processor config", name)
    elif name not in _announced:
        _announced.add(name)
        logger.warning(
            "%s loaded image-only (its video processor needs torchvision, which is not installed): "
            "images work as with the full class, video input is refused",
            name,
        )
    return image_only_processor(cls)


def _config_file(name_or_path: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of the checkpoint (local directory or hub cache), or ``None`` where it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except (OSError, ValueError):  # not a repo id, no network...: AutoProcessor reports it in its own words
        return None
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoProcessor reports an unreadable file itself
    return data if isinstance(data, dict) else None


def _processor_class_name(name_or_path: str) -> str | None:
    """The processor class the checkpoint names, looked up where ``AutoProcessor`` looks, in the same order."""
    for filename in (
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "tokenizer_config.json",
    ):
        data = _config_file(name_or_path, filename)
        if data and isinstance(data.get("processor_class"), str):
            return data["processor_class"]
    config = _config_file(name_or_path, "config.json") or {}
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(config.get("model_type", ""))
    return name if isinstance(name, str) else None


def _has_video_config(name_or_path: str) -> bool:
    """Whether ``AutoVideoProcessor`` finds a config (a nested one, its own file, or the image processor's,
    from which it infers the video processor)."""
    if "video_processor" in (_config_file(name_or_path, "processor_config.json") or {}):
        return True
    return any(
        _config_file(name_or_path, f) is not None
        for f in ("video_preprocessor_config.json", "preprocessor_config.json")
    )


@functools.cache
def image_only_processor(base: type) -> type:
    """``base`` (a processor class taking a ``video_processor``) without its video processor.

    ``ProcessorMixin`` derives the sub-processors it loads and requires from the ``__init__`` signature, and
    ``from_args_and_dict`` takes the options it passes on from the code object of ``__init__``; so the subclass
    gets a real ``__init__`` with the parent's parameters minus ``video_processor`` (generated, as dataclasses
    generate theirs). Everything else (token expansion, chat template, ``mm_token_type_ids``...) is the parent's.
    The class keeps the parent's name, so a processor saved from it names the real class. Video input raises
    :class:`~causalmm.inputs.InputError`.
    """
    params = list(inspect.signature(base.__init__).parameters.values())[1:]
    kept = [p for p in params if p.name != "video_processor"]
    named = [p for p in kept if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    var_kw = [p for p in kept if p.kind is inspect.Parameter.VAR_KEYWORD]
    if len(named) + len(var_kw) != len(kept) or len(kept) == len(params):
        raise TypeError(f"{base.__name__}.__init__ does not take video_processor as a plain parameter")
    defaults = tuple(p.default for p in named)
    header = [p.name if p.default is p.empty else f"{p.name}=_defaults[{i}]" for i, p in enumerate(named)]
    passed = [f"{p.name}={p.name}" for p in named] + ["video_processor=None"]
    if var_kw:
        header.append(f"**{var_kw[0].name}")
        passed.append(f"**{var_kw[0].name}")
    source = f"def __init__(self, {', '.join(header)}):\n    _base_init(self, {', '.join(passed)})\n"
    namespace: dict[str, Any] = {"_base_init": base.__init__, "_defaults": defaults}
    exec(source, namespace)  # our own template; the names come from the parent's signature
    init = namespace["__init__"]
    init.__qualname__ = f"{base.__name__}.__init__"
    init.__doc__ = base.__init__.__doc__

    call_params = list(inspect.signature(base.__call__).parameters)
    video_at = call_params.index("videos") - 1 if "videos" in call_params else None

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("videos") if video_at is None or len(args) <= video_at else args[video_at]
        if given is not None:
            raise InputError(
                f"{base.__name__} was loaded image-only (without a video processor), so it cannot process video; "
                "give images (video needs torchvision, built for your torch, and the checkpoint's video config)"
            )
        return base.__call__(self, *args, **kwargs)

    __call__.__doc__ = base.__call__.__doc__
    doc = f"``{base.__name__}`` without its video processor (:func:`causalmm.loading.image_only_processor`)."
    return type(
        base.__name__, (base,), {"__init__": init, "__call__": __call__, "__doc__": doc, "__module__": __name__}
    )


@functools.cache
def pixtral_processor_class() -> type:
    """``PixtralProcessor`` (Mistral 3), importable without torchvision.

    Its module imports one pure-Python helper (``get_resize_output_image_size``) from the torchvision image
    processor's module; the PIL image processor's module defines the same function. Without torchvision that
    import is served, only while the processor module loads, by a stand-in module holding the PIL one; the
    stand-in is removed again, so nothing else can import it.
    """
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ImportError:
        from transformers.models.pixtral import image_processing_pil_pixtral

        name = "transformers.models.pixtral.image_processing_pixtral"
        stand_in = types.ModuleType(name)
        stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = stand_in
        try:
            from transformers.models.pixtral.processing_pixtral import PixtralProcessor
        finally:
            del sys.modules[name]
    return PixtralProcessor


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (ImportError messages start with a newline)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def save_quietly(model: torch.nn.Module, processor: Any, out: Path) -> None:
    """``save_pretrained`` model (safetensors) and processor without the per-shard tqdm bar in logs."""
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)
