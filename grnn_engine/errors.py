"""The errors a user can cause. Command lines print their one sentence and exit 2; anything else is a bug."""

from __future__ import annotations


class GrnnError(Exception):
    """Base of every error the project raises on purpose for a user's mistake."""


class ConfigError(GrnnError, ValueError):
    """A setting is invalid: an unknown name, a value out of range, a wrong type."""


class DataError(GrnnError):
    """Data cannot be found or read where the settings say it is."""
