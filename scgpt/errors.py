"""Project exception types for errors a user can cause.

Each message names the file or config key at fault and says how to fix it. The command-line entry
points catch :class:`ScgptError`, print its message as one line and exit with code 2.
"""

from __future__ import annotations


class ScgptError(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 2


class ConfigError(ScgptError):
    """An inconsistent or invalid configuration value (names the key)."""


class DataError(ScgptError):
    """A bad input file or dataset (names the file)."""


class CheckpointError(ScgptError):
    """A checkpoint or export that cannot be loaded into this model (names the file)."""
