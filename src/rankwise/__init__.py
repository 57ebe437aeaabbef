"""rankwise: low-rank structure in neural networks.

Fast randomized linear algebra (:mod:`rankwise.linalg`), parameter-efficient adapters
(:mod:`rankwise.adapters`), compression of pretrained models (:mod:`rankwise.compress`),
and the models and text they run on (:mod:`rankwise.models`, :mod:`rankwise.data`).
"""

from __future__ import annotations

from rankwise.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    RankwiseError,
    ShapeError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (transformers) stay lazy so `import rankwise` and `rankwise --help` are fast.
    if name in ("load_model",):
        from rankwise import models

        return getattr(models, name)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")


__all__ = [
    "__version__",
    "load_model",
    "RankwiseError",
    "ConfigError",
    "ShapeError",
    "CheckpointError",
    "ModelError",
    "DataError",
]
