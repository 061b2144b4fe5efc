"""The ``lmms_eval.models`` entry point: the manifest that names the plugin's model class.

Kept to one import of lmms-eval's own registry module (already loaded when lmms-eval reads its entry points):
no torch, no causalmm engine. lmms-eval imports :mod:`causalmm.lmms.model` only when ``--model causalmm`` is
asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_CLASS", "MODEL_ID", "manifests"]

#: the name for ``lmms-eval --model``
MODEL_ID = "causalmm"
#: the model class, a simple (``is_simple = True``) lmms model
MODEL_CLASS = "causalmm.lmms.model.CausalMMLmms"


def manifests() -> list[Any]:
    """The plugin's ``ModelManifest`` (lmms-eval calls this when it builds its model registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]
