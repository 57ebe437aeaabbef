"""Saving structured layers: the registry of savable layer types, and their JSON descriptions.

``@register_layer`` makes a class savable. A registered class implements ``spec() -> dict``
(JSON: everything needed to rebuild an empty module of the right shapes),
``from_spec(spec, dtype)`` (classmethod) and ``storage_bits()`` (the exact bits its weights
take, codes and indices included; the bias is not counted). ``rankwise.compress``'s
checkpoints write ``{"type": name, **spec}`` for every registered module (:func:`module_spec`)
and rebuild them on load (:func:`install_module`); the ``type`` names are the class names, so
they must never change. :func:`rankwise.models.count_parameters` counts every module with a
``storage_bits()`` as that storage, in parameters of the model's dtype.

``LowRankLinear`` and plain ``nn.Linear`` are described here too (types ``"LowRankLinear"``,
``"Linear"``) without being registered: checkpoints store them by their parameters alone.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.errors import CheckpointError, ConfigError, ModelError, ShapeError
from rankwise.layers.lowrank import LowRankLinear
from rankwise.modules import replace_module
from rankwise.registry import Registry

LAYER_TYPES: Registry[type[nn.Module]] = Registry("saved layer type", plugins=("rankwise.layers",))


def register_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` savable in compressed checkpoints under its class name."""
    for attr in ("spec", "from_spec", "storage_bits"):
        if not hasattr(cls, attr):
            raise ConfigError(f"{cls.__name__} needs a {attr!r} method to be a registered layer")
    return LAYER_TYPES.register(cls.__name__, cls)


def is_registered(module: nn.Module) -> bool:
    """Whether ``module``'s class is a registered (savable) layer type."""
    name = type(module).__name__
    return name in LAYER_TYPES and LAYER_TYPES[name] is type(module)


def tensor_bits(t: torch.Tensor | None) -> int:
    """The bits ``t`` takes in memory (0 for ``None``)."""
    return 0 if t is None else t.numel() * t.element_size() * 8


def module_spec(module: nn.Module) -> dict:
    """``{"type": ..., **spec}`` for a registered layer, a :class:`LowRankLinear` or an ``nn.Linear``."""
    if is_registered(module):
        return {"type": type(module).__name__, **module.spec()}
    if isinstance(module, LowRankLinear):
        return {
            "type": "LowRankLinear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "rank": module.rank,
            "bias": module.bias is not None,
        }
    if type(module) is nn.Linear:
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    raise CheckpointError(f"{type(module).__name__} is not a registered layer type")


def build_module(spec: dict, dtype: torch.dtype) -> nn.Module:
    """An empty module of the type and shapes ``spec`` describes (the inverse of :func:`module_spec`)."""
    kind = spec.get("type")
    try:
        if kind == "LowRankLinear":
            return LowRankLinear(
                spec["in_features"],
                spec["out_features"],
                int(spec["rank"]),
                bias=bool(spec["bias"]),
                dtype=dtype,
            )
        if kind == "Linear":
            return nn.Linear(
                spec["in_features"], spec["out_features"], bias=bool(spec["bias"]), dtype=dtype
            )
        if kind in LAYER_TYPES:
            return LAYER_TYPES[kind].from_spec(spec, dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint's description of a {kind} layer is invalid: {e!r}"
        ) from e
    raise CheckpointError(
        f"layer type {kind!r} is unknown to this rankwise; known: "
        f"{', '.join(sorted(['Linear', 'LowRankLinear', *LAYER_TYPES.names()]))}"
    )


def registered_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules of registered types in ``model``, by qualified name."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_registered(m) and not any(name.startswith(o + ".") for o in found):
            found[name] = m
    return found


def install_module(model: nn.Module, name: str, spec: dict, dtype: torch.dtype) -> None:
    """Replace the ``nn.Linear`` ``name`` of a freshly built base model by an empty ``spec``
    module; a :class:`~rankwise.errors.CheckpointError` if the base has no such linear layer,
    or (for ``LowRankLinear``/``Linear`` specs) one of another shape."""
    new = build_module(spec, dtype)
    try:
        old = replace_module(model, name, new, expect=nn.Linear)
    except ModelError as e:
        raise CheckpointError(f"the checkpoint does not fit the base architecture: {e}") from None
    if spec.get("type") in ("LowRankLinear", "Linear") and (old.out_features, old.in_features) != (
        new.out_features,
        new.in_features,
    ):
        raise CheckpointError(
            f"module {name!r} is a {old.out_features}x{old.in_features} linear layer in the base "
            f"architecture, but the checkpoint describes a {new.out_features}x{new.in_features} one"
        )


def module_storage_bits(module: nn.Module) -> int:
    """Weight bits of a linear-like module (bias excluded): exact for registered types."""
    if is_registered(module):
        return module.storage_bits()
    if isinstance(module, LowRankLinear):
        return tensor_bits(module.U) + tensor_bits(module.V)
    if isinstance(module, nn.Linear):
        return tensor_bits(module.weight)
    raise ShapeError(f"cannot count the storage of a {type(module).__name__}")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight a linear-like module applies, detached float32 (error measurements)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if not callable(getattr(module, "dense_weight", None)):
        raise ShapeError(f"a {type(module).__name__} has no dense weight")
    return module.dense_weight().detach().float()


__all__ = [
    "LAYER_TYPES",
    "build_module",
    "dense_weight",
    "install_module",
    "is_registered",
    "module_spec",
    "module_storage_bits",
    "register_layer",
    "registered_modules",
    "tensor_bits",
]
