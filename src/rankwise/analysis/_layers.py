"""Reading a model's linear weights for analysis: which layers, in which orientation.

Every analysis works on the same set: each ``nn.Linear`` and transformers ``Conv1D`` (stored
transposed), read as an ``(out_features, in_features)`` float32 matrix, except an output head
that is tied to (or is) an input embedding — that matrix is the embedding table, not a layer.
A layer wrapped by a rankwise adapter (:class:`~rankwise.adapters.AdaptedLayer`) is read
either as its frozen base weight or as the merged weight ``W + ΔW`` of its active adapters
(computed on a copy of the layer: the model is never modified).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from rankwise.errors import ConfigError, ModelError, ShapeError


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_adapted(module: nn.Module) -> bool:
    from rankwise.adapters import AdaptedLayer

    return isinstance(module, AdaptedLayer)


def _plain_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return (w.T if _is_conv1d(module) else w).float()


@torch.no_grad()
def _adapted_weight(layer: nn.Module, merged: bool) -> torch.Tensor:
    """Base or merged weight of an adapted layer, without touching ``layer``."""
    if not merged:
        if layer.merged:  # the stored weight already includes the adapters: take a copy back out
            clone = copy.deepcopy(layer)
            from rankwise.adapters import unmerge

            unmerge(clone)
            return _plain_weight(clone.base_layer)
        return _plain_weight(layer.base_layer)
    if layer.merged or layer.disabled or not layer.active:
        return _plain_weight(layer.base_layer)
    from rankwise.adapters import merge

    clone = copy.deepcopy(layer)
    merge(clone)
    return _plain_weight(clone.base_layer)


def _tied_head(model: nn.Module) -> nn.Module | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return head if id(head.weight) in embedding_weights else None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the layers analyses read (see the module docstring), in model order.

    Raises :class:`~rankwise.errors.ModelError` when there are none.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    head = _tied_head(model)
    found: dict[str, nn.Module] = {}
    inside_adapted: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside_adapted):
            continue  # the base layer inside an adapted layer is read through the wrapper
        if _is_adapted(module):
            inside_adapted.append(path)
            base = module.base_layer
            if isinstance(base, nn.Linear) or _is_conv1d(base):
                found[path] = module
        elif (isinstance(module, nn.Linear) or _is_conv1d(module)) and module is not head:
            found[path] = module
    if not found:
        raise ModelError(
            f"model {type(model).__name__} has no linear layers to analyse "
            "(analyses read nn.Linear and transformers Conv1D weights)"
        )
    return found


def layer_kind(name: str) -> str:
    """The layer's role: the last path component without indices (``...mlp.up_proj`` -> ``up_proj``)."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def block_of(name: str) -> int | None:
    """The first integer in a layer path (``model.layers.12.mlp.up_proj`` -> 12), or None."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None


def select(names: Sequence[str], layers: str | Sequence[str] | None) -> list[str]:
    """The names matching any glob pattern in ``layers`` (full path or kind; None: all).

    A pattern that matches nothing is a :class:`~rankwise.errors.ConfigError` that lists the
    layer kinds, so a typo never silently analyses fewer layers.
    """
    if layers is None:
        return list(names)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ConfigError("layers=[] selects nothing; pass None for every linear layer")
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(layer_kind(n), pattern)]
        if not hits:
            kinds = sorted({layer_kind(n) for n in names})
            raise ConfigError(
                f"layers pattern {pattern!r} matched no linear layer; layer kinds are {kinds} "
                f"(patterns match a full path like {names[0]!r} or a kind)"
            )
        chosen.extend(hits)
    return [n for n in names if n in set(chosen)]


def linear_weights(
    model: nn.Module, layers: str | Sequence[str] | None = None, *, merged: bool = True
) -> dict[str, torch.Tensor]:
    """``{path: (out, in) float32 weight}`` for the selected linear layers of ``model``.

    ``merged`` chooses, for adapted layers, the weight with the active adapters folded in
    (True) or the frozen base weight (False). Weights must be finite.
    """
    modules = linear_modules(model)
    out = {}
    for name in select(list(modules), layers):
        module = modules[name]
        w = _adapted_weight(module, merged) if _is_adapted(module) else _plain_weight(module)
        if w.is_meta:
            raise ShapeError(f"layer {name!r}: weight is on the meta device (not loaded); load the model's weights first")
        if not bool(torch.isfinite(w).all()):
            raise ShapeError(f"layer {name!r}: weight holds NaN or Inf values")
        out[name] = w
    return out


def matched_weights(
    base: nn.Module, tuned: nn.Module, layers: str | Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base weights of ``base`` and merged weights of ``tuned``, checked to line up.

    ``base`` and ``tuned`` may be one model with an adapter attached (base view vs merged
    view) or two models of the same architecture. Raises :class:`~rankwise.errors.ShapeError`
    naming the first layer that is missing from one model or differs in shape.
    """
    left, right = linear_modules(base), linear_modules(tuned)
    for (a, ma), (b, mb) in zip(left.items(), right.items(), strict=False):
        if a != b:
            raise ShapeError(
                f"the models differ in architecture: layer {a!r} of the base model is {b!r} in the "
                "tuned model; compare checkpoints of the same architecture"
            )
        sa, sb = tuple(_plain_shape(ma)), tuple(_plain_shape(mb))
        if sa != sb:
            raise ShapeError(
                f"the models differ in shape at layer {a!r}: base {sa[0]}x{sa[1]}, tuned {sb[0]}x{sb[1]}; "
                "compare checkpoints of the same architecture"
            )
    if len(left) != len(right):
        longer, which = (left, "base") if len(left) > len(right) else (right, "tuned")
        extra = list(longer)[min(len(left), len(right))]
        raise ShapeError(
            f"the models differ in architecture: layer {extra!r} exists only in the {which} model "
            f"({len(left)} vs {len(right)} linear layers)"
        )
    return linear_weights(base, layers, merged=False), linear_weights(tuned, layers, merged=True)


def _plain_shape(module: nn.Module) -> torch.Size:
    inner = module.base_layer if _is_adapted(module) else module
    w = inner.weight
    return w.T.shape if _is_conv1d(inner) else w.shape


__all__ = ["block_of", "layer_kind", "linear_modules", "linear_weights", "matched_weights", "select"]
