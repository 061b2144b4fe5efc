"""The lmms-eval model plugin: ``lmms-eval --model causalmm --model_args pretrained=...,method=causalmm ...``.

``manifest`` is what lmms-eval's entry point loads (``lmms_eval.models`` group): it imports nothing heavy, since
lmms-eval skips every plugin when one fails to load. ``args`` reads ``--model_args``; ``model`` is the model
class, imported only when lmms-eval resolves ``--model causalmm``. Nothing is imported here.
"""
