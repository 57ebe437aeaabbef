"""rankwise.layers: structured replacements for ``nn.Linear``, shared by compression and training.

One file per layer type. Trainable types (registered by name, built by :func:`convert` from
an existing ``nn.Linear``): :class:`LowRankLinear` (``"lowrank"``). Types that compression
writes and checkpoints save (registered by class name in :data:`LAYER_TYPES`):
:class:`QuantizedLinear`, :class:`CompensatedLinear`, :class:`QuantizedLowRankLinear`,
:class:`SparseDictLinear`, :class:`ScatterLinear`, :class:`GatherLinear`,
:class:`ResizedLinear` (and :class:`LowRankLinear`, saved by its parameters).
See docs/layers.md.
"""

from __future__ import annotations

from rankwise.layers.base import TRAINABLE, StructuredLinear, names, register_trainable
from rankwise.layers.compensated import CompensatedLinear, QuantizedLowRankLinear
from rankwise.layers.convert import convert, linear_targets
from rankwise.layers.lowrank import LowRankLinear
from rankwise.layers.quantized import QuantizedLinear
from rankwise.layers.resized import ResizedLinear
from rankwise.layers.sparse_dict import SparseDictLinear
from rankwise.layers.spec import (
    LAYER_TYPES,
    build_module,
    dense_weight,
    install_module,
    is_registered,
    module_spec,
    module_storage_bits,
    register_layer,
    registered_modules,
)
from rankwise.layers.subset import GatherLinear, ScatterLinear

__all__ = [
    "TRAINABLE",
    "LAYER_TYPES",
    "StructuredLinear",
    "convert",
    "names",
    "linear_targets",
    "register_trainable",
    "register_layer",
    "LowRankLinear",
    "QuantizedLinear",
    "CompensatedLinear",
    "QuantizedLowRankLinear",
    "SparseDictLinear",
    "ScatterLinear",
    "GatherLinear",
    "ResizedLinear",
    "build_module",
    "dense_weight",
    "install_module",
    "is_registered",
    "module_spec",
    "module_storage_bits",
    "registered_modules",
]
