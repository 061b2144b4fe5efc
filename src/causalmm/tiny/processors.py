"""The processor classes the tiny builders instantiate, by the real class name each checkpoint is saved under.

Without torchvision some real classes cannot be built as they stand: the processors of Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision and InternVL take a video processor, and every video processor in ``transformers`` 5
needs torchvision; Mistral 3's ``PixtralProcessor`` module imports a helper from the torchvision image
processor's module.  :func:`register_processors` resolves their stand-ins once, explicitly (importing
:mod:`causalmm.tiny` resolves nothing): the image-only variant of the real class
(:func:`causalmm.loading.image_only_processor`) and :func:`causalmm.loading.pixtral_processor_class`.  Both keep
the real class name, so a tiny checkpoint names ``Qwen2VLProcessor`` as a hub one does (minus the video
processor config), and :func:`causalmm.loading.load_processor` loads it back without importing this package.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import transformers
from transformers import ProcessorMixin

from ..loading import image_only_processor, pixtral_processor_class

__all__ = ["processor_class", "register_processors"]

#: Real processor classes of the tiny families that take a video processor: built image-only.
_IMAGE_ONLY: tuple[str, ...] = (
    "Qwen2VLProcessor",
    "Qwen2_5_VLProcessor",
    "Qwen3VLProcessor",
    "LlavaOnevisionProcessor",
    "InternVLProcessor",
)


@functools.cache
def register_processors() -> Mapping[str, type[ProcessorMixin]]:
    """The stand-ins for the real processor classes the tiny families cannot build as they stand, by real
    class name (resolved on the first call; later calls return the same mapping)."""
    classes: dict[str, type[ProcessorMixin]] = {
        name: image_only_processor(getattr(transformers, name)) for name in _IMAGE_ONLY
    }
    classes["PixtralProcessor"] = pixtral_processor_class()
    return MappingProxyType(classes)


def processor_class(name: str) -> type[ProcessorMixin]:
    """The class a tiny builder instantiates for the real processor class ``name``: its registered stand-in,
    else the ``transformers`` class itself."""
    registered = register_processors()
    return registered[name] if name in registered else getattr(transformers, name)
