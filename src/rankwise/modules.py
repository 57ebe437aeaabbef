"""Finding and replacing submodules by dotted path: the one place rankwise swaps a layer.

Adapters wrap layers, compression replaces them by factorised ones, checkpoints rebuild
them; all of them go through :func:`replace_module`, so a bad path gives the same error
everywhere and the parent lookup is written once.
"""

from __future__ import annotations

from torch import nn

from rankwise.errors import ModelError


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule at ``path`` (``"a.b.c"``)."""
    parent_path, _, child = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        raise ModelError(f"module {path!r} does not exist in {type(model).__name__}") from None
    if not child or not isinstance(getattr(parent, child, None), nn.Module):
        raise ModelError(f"module {path!r} does not exist in {type(model).__name__}")
    return parent, child


def replace_module(
    model: nn.Module, path: str, new: nn.Module, *, expect: type | tuple[type, ...] | None = None
) -> nn.Module:
    """Put ``new`` at ``path`` inside ``model``; returns the module it replaced.

    ``expect``: the type(s) the old module must have; anything else raises
    :class:`~rankwise.errors.ModelError` and changes nothing.
    """
    parent, child = parent_of(model, path)
    old = getattr(parent, child)
    if expect is not None and not isinstance(old, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise ModelError(f"module {path!r} is a {type(old).__name__}, expected {names}")
    setattr(parent, child, new)
    return old


__all__ = ["parent_of", "replace_module"]
