"""Exception and warning types raised by cepe (all subclass the builtin a user would catch)."""

from __future__ import annotations


class ConfigError(ValueError):
    """config.json is missing a key, has a bad value, or asks for something unsupported."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, or does not fit the config."""


class LongInputWarning(UserWarning):
    """A call's tokens run past the model's window (Model.window)."""
