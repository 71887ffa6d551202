"""Errors a user can act on.

Anything raised as a :class:`UserError` reaches the terminal as one line (what is wrong and how to
fix it) and a non-zero exit status, never as a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, files or settings; the message says how to fix it."""

    exit_code = 2


class ModelLoadError(UserError):
    """A model file is missing, unreadable, or does not fit the model being built."""


class ConfigError(UserError):
    """A setting is out of range or inconsistent with the model."""
