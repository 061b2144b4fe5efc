"""The errors whose message is for the user, in one module that imports nothing of causalmm's, so that every layer
may raise them without importing the layer that defines what it checks.

Each message names the value, what was wrong with it and what would work. The CLI, the app and the lmms-eval plugin
show these as one line (:data:`USER_ERRORS`); any other exception is a bug.
"""

from __future__ import annotations

__all__ = ["USER_ERRORS", "ConfigError", "InputError", "UnsupportedModelError"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and how to fix it."""


class InputError(ValueError):
    """Bad user input (image, prompt, model path); the message says what and how to fix it."""


class UnsupportedModelError(ValueError):
    """The model lacks something the engine needs; the message names it."""


#: the errors whose message is for the user (bad input, a bad setting, a model the engine cannot run)
USER_ERRORS: tuple[type[Exception], ...] = (InputError, ConfigError, UnsupportedModelError)
