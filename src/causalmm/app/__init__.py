"""``causalmm app``: a local web page to try the methods on one image (needs the ``causalmm[app]`` extra).

:mod:`.session` is what the page does (model loaded once, settings read, answers, explanation, figure) and runs
without gradio; :mod:`.ui` is the gradio page over it.
"""

from .session import Answer, AppError, Session, default_settings, parse_settings

__all__ = ["AppError", "Answer", "Session", "default_settings", "parse_settings"]
