"""The exceptions rankwise raises.

Every error a user can cause is a :class:`RankwiseError`. Messages name the argument or
module, the value seen, and what would be valid. The subclasses that describe bad values
also derive from :class:`ValueError`, so code written against the standard library keeps
working.
"""

from __future__ import annotations


class RankwiseError(Exception):
    """Base class of every error rankwise raises on purpose."""


class ConfigError(RankwiseError, ValueError):
    """An option or argument has an invalid value (rank <= 0, unknown method, ...)."""


class ShapeError(RankwiseError, ValueError):
    """A tensor has the wrong shape, dtype, or contains NaN/Inf."""


class CheckpointError(RankwiseError):
    """A file on disk is missing, corrupt, or does not match the model it is loaded into."""


class ModelError(RankwiseError, LookupError):
    """A model name or path cannot be resolved, or the model lacks what an operation needs."""


class DataError(RankwiseError, ValueError):
    """A text corpus is missing, empty, or too short for the requested operation."""


__all__ = [
    "RankwiseError",
    "ConfigError",
    "ShapeError",
    "CheckpointError",
    "ModelError",
    "DataError",
]
