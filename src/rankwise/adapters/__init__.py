"""rankwise.adapters: trainable low-rank weight deltas (LoRA, DoRA, ...) on frozen models.

    from rankwise.adapters import attach, merge, save_adapter
    attach(model, "lora", targets=["q_proj", "v_proj"], rank=8, alpha=16)

See ``base.py`` for how to add a method and ``docs/adapters.md`` for the guide.
"""

from rankwise.adapters.base import (
    Adapter,
    AdapterConfig,
    LayerView,
    get_method,
    initialiser_names,
    method_names,
    register_initialiser,
    register_method,
)
from rankwise.adapters.inject import (
    AdaptedLayer,
    AttachPlan,
    TrainableReport,
    active_adapters,
    adapted_layers,
    adapter_names,
    attach,
    delete,
    disable,
    merge,
    resolve_targets,
    set_active,
    trainable_parameters,
    unmerge,
)
from rankwise.adapters.io import load_adapter, read_adapter_config, save_adapter

__all__ = [
    "Adapter",
    "AdapterConfig",
    "LayerView",
    "get_method",
    "initialiser_names",
    "method_names",
    "register_initialiser",
    "register_method",
    "AdaptedLayer",
    "AttachPlan",
    "TrainableReport",
    "active_adapters",
    "adapted_layers",
    "adapter_names",
    "attach",
    "delete",
    "disable",
    "merge",
    "resolve_targets",
    "set_active",
    "trainable_parameters",
    "unmerge",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
]
