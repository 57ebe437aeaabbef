"""rankwise.compress: replace dense linear layers by low-rank ones, calibrated on text.

One call: :func:`compress` (calibrate → decompose every layer → allocate ranks to a
parameter or size budget → factorise → evaluate → save). The pieces are public too:
:func:`calibrate`, the method registry (:func:`get_method`, :func:`method_names`), the
allocators (:func:`allocate_ranks`), :class:`LowRankLinear`, and
:func:`save_compressed` / :func:`load_compressed`. See ``base.py`` for how to add a method.
"""

from __future__ import annotations

from rankwise.compress.allocate import STRATEGIES, allocate_ranks
from rankwise.compress.api import CompressionResult, compress
from rankwise.compress.base import (
    METHODS,
    CompressionJob,
    CompressionMethod,
    Decomposition,
    LowRankLinear,
    get_method,
    method_names,
    register_method,
)
from rankwise.compress.calibrate import Calibration, LayerStats, calibrate, linear_layers
from rankwise.compress.checkpoint import COMPRESSED_MARKER, load_compressed, save_compressed
from rankwise.compress.report import LayerReport

__all__ = [
    "compress",
    "CompressionResult",
    "LayerReport",
    "COMPRESSED_MARKER",
    "STRATEGIES",
    "allocate_ranks",
    "load_compressed",
    "save_compressed",
    "METHODS",
    "CompressionMethod",
    "CompressionJob",
    "Decomposition",
    "LowRankLinear",
    "get_method",
    "method_names",
    "register_method",
    "Calibration",
    "LayerStats",
    "calibrate",
    "linear_layers",
]
