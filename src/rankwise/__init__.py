"""rankwise: low-rank structure in neural networks.

Fast randomized linear algebra (:mod:`rankwise.linalg`), parameter-efficient adapters
(:mod:`rankwise.adapters`), compression of pretrained models (:mod:`rankwise.compress`),
and the models and text they run on (:mod:`rankwise.models`, :mod:`rankwise.data`).

:func:`load_model` here is the one to use: it loads everything
:func:`rankwise.models.load_model` loads, and also the folders that packages above
``models`` write (a ``rankwise compress`` folder). ``models`` is the lowest layer and must
not import them; those packages register their folder format when imported
(:func:`rankwise.models.register_folder_format`). This module sits above every layer, so
it is the one place that knows which package provides which marker file
(:data:`_FOLDER_FORMAT_PROVIDERS`) and imports that package, lazily and only when a folder
holding the marker is loaded; ``import rankwise`` itself stays fast.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from rankwise.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    RankwiseError,
    ShapeError,
)

__version__ = "0.1.0"

# Marker file -> the module that writes such folders; importing it registers their loader.
_FOLDER_FORMAT_PROVIDERS = {
    "rankwise_compressed.json": "rankwise.compress.checkpoint",
}


def _register_folder_formats(folder: Path) -> None:
    """Import the providers of the marker files ``folder`` holds, so their loaders are registered."""
    for marker, module_name in _FOLDER_FORMAT_PROVIDERS.items():
        if (folder / marker).is_file():
            importlib.import_module(module_name)


def load_model(name_or_path: str | os.PathLike | None = None, **options):
    """Load ``(model, tokenizer)``: :func:`rankwise.models.load_model` (same ``options``:
    ``dtype``, ``device``, ``use_cache``), plus the folders rankwise writes (compressed models).

    ``None`` means the default model (SmolLM2).
    """
    from rankwise import models

    name = models.DEFAULT_MODEL if name_or_path is None else name_or_path
    folder = Path(str(name)).expanduser()
    if folder.is_dir():
        _register_folder_formats(folder)
    return models.load_model(name, **options)


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
