"""rankwise.compress: replace dense linear layers by low-rank ones, calibrated on text.

One call: :func:`compress` (calibrate → decompose every layer → allocate ranks to a
parameter or size budget → factorise → evaluate → save). The pieces are public too:
:func:`calibrate` and :func:`closed_loop_calibration` (block by block, on the outputs of
the blocks already compressed), the method registry (:func:`get_method`, :func:`method_names`), the
allocators (:func:`allocate_ranks`), :class:`LowRankLinear`, and
:func:`save_compressed` / :func:`load_compressed` / :func:`map_weights`. See ``base.py`` for how to add a method.
"""

from __future__ import annotations

from rankwise.compress.allocate import STRATEGIES, allocate_ranks
from rankwise.compress.api import CompressionResult, compress
from rankwise.compress.base import (
    METHODS,
    CompressionJob,
    CompressionMethod,
    Decomposition,
    get_method,
    method_names,
    register_method,
)
from rankwise.compress.calibrate import (
    Calibration,
    ClosedLoopStats,
    LayerStats,
    calibrate,
    closed_loop_calibration,
    linear_layers,
)
from rankwise.compress.checkpoint import (
    COMPRESSED_MARKER,
    load_compressed,
    map_weights,
    save_compressed,
)
from rankwise.compress.report import LayerReport
from rankwise.layers import LowRankLinear

__all__ = [
    "compress",
    "CompressionResult",
    "LayerReport",
    "COMPRESSED_MARKER",
    "STRATEGIES",
    "allocate_ranks",
    "load_compressed",
    "save_compressed",
    "map_weights",
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
    "closed_loop_calibration",
    "ClosedLoopStats",
    "linear_layers",
]
