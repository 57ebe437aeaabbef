"""rankwise.layers: structured replacements for ``nn.Linear``, shared by compression and training.

One file per layer type. Trainable types (registered by name, built by :func:`convert` from
an existing ``nn.Linear``; :func:`names` lists them): :class:`LowRankLinear` (``"lowrank"``),
:class:`SLTrainLinear` (``"sltrain"``), :class:`LOSTLinear` (``"lost"``), :class:`PELALinear`
(``"pela"``, with :func:`feature_distillation_loss` / :func:`weight_perturbation_loss`). Types that compression
writes and checkpoints save (registered by class name in :data:`LAYER_TYPES`):
:class:`QuantizedLinear`, :class:`CompensatedLinear`, :class:`QuantizedLowRankLinear`,
:class:`SparseDictLinear`, :class:`ScatterLinear`, :class:`GatherLinear`,
:class:`ResizedLinear` (and :class:`LowRankLinear`, saved by its parameters).
See docs/layers.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from rankwise.layers.base import (
    TRAINABLE,
    StructuredLinear,
    after_optimizer_step,
    names,
    penalty,
    register_trainable,
)
from rankwise.layers.compensated import CompensatedLinear, QuantizedLowRankLinear
from rankwise.layers.convert import convert, linear_targets
from rankwise.layers.lost import LOSTLinear
from rankwise.layers.lowrank import LowRankLinear
from rankwise.layers.pela import PELALinear, feature_distillation_loss, weight_perturbation_loss
from rankwise.layers.quantized import QuantizedLinear
from rankwise.layers.resized import ResizedLinear
from rankwise.layers.sltrain import SLTrainLinear
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

# every layer file registers its types on import, listed above or not; each registered
# trainable type is then importable from here by its class name
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
_TRAINABLE_CLASSES = {cls.__name__: cls for _, cls in TRAINABLE.items()}
globals().update(_TRAINABLE_CLASSES)

__all__ = [
    "TRAINABLE",
    "LAYER_TYPES",
    "StructuredLinear",
    "convert",
    "after_optimizer_step",
    "penalty",
    "names",
    "linear_targets",
    "register_trainable",
    "register_layer",
    "LowRankLinear",
    "SLTrainLinear",
    "LOSTLinear",
    "PELALinear",
    "feature_distillation_loss",
    "weight_perturbation_loss",
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
__all__ += sorted(set(_TRAINABLE_CLASSES) - set(__all__))
