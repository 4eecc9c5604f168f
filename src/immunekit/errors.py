"""Exception hierarchy: every library error names the bad value and the fix."""

from __future__ import annotations


class ImmunekitError(Exception):
    """Base class of every error raised on purpose by immunekit."""


class ConfigError(ImmunekitError, ValueError):
    """A configuration value or key is invalid (unknown key, wrong type, out of range)."""


class DataError(ImmunekitError, ValueError):
    """Input data is unusable: wrong shape, NaN/Inf, missing columns, constant columns."""


class AssetError(ImmunekitError, RuntimeError):
    """A data or model asset is missing, could not be fetched, or failed its sha256 check."""


class NumericalError(ImmunekitError, ArithmeticError):
    """A numerical precondition failed (e.g. a singular matrix where an inverse is needed)."""


class JudgeError(ImmunekitError, RuntimeError):
    """A judge could not score a completion (endpoint down, refused, or unparsable replies)."""
