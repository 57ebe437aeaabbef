"""The contract of a structured layer that replaces one ``nn.Linear``, and the registry of
the types :func:`rankwise.layers.convert` can build by name.

A :class:`StructuredLinear` computes ``y = W x + b`` with ``W (out, in)`` held in a cheaper
form (``U V``, ``B A + S``, ...). Every type provides

- ``from_linear(linear, *, rank, **options)`` (classmethod): the layer that replaces
  ``linear``, initialised the way its paper says (from the pretrained weight, or randomly
  when the paper trains from scratch). Its keyword-only parameters after ``rank`` are the
  type's options: :func:`~rankwise.layers.convert` checks given options against them;
- ``dense_weight()``: the equivalent dense ``W (out, in)`` (tests, export, analysis);
- ``in_features`` / ``out_features`` like ``nn.Linear``.

How to add a trainable type: one file in ``rankwise/layers/`` with a subclass decorated
``@register_trainable("name")``, validated with :meth:`StructuredLinear.check_rank` /
:func:`check_fraction`, imported in ``rankwise/layers/__init__.py``, a test in
``tests/layers/`` and a row in ``docs/layers.md``.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.registry import Registry

TRAINABLE: Registry[type[StructuredLinear]] = Registry("layer type", plugins=("rankwise.layers",))

L = TypeVar("L", bound="type[StructuredLinear]")


class StructuredLinear(nn.Module, abc.ABC):
    """Base class of layers built from an ``nn.Linear(in_features, out_features)``."""

    #: the name the type is registered under in :data:`TRAINABLE` (``""``: not registered)
    method: ClassVar[str] = ""
    in_features: int
    out_features: int

    @classmethod
    @abc.abstractmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, **options: object) -> StructuredLinear:
        """The layer replacing ``linear`` (same dtype and device; ``linear`` is not modified)."""

    @classmethod
    def shaped_like(cls, linear: nn.Linear, *args: object, **options: object) -> StructuredLinear:
        """``cls(in, out, *args, bias=..., dtype=..., device=..., **options)`` with ``linear``'s
        shape, bias presence, dtype and device, and ``linear``'s bias copied in: the part of
        ``from_linear`` every type shares (it then sets its own weights)."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, *args,
            bias=linear.bias is not None, dtype=w.dtype, device=w.device, **options,
        )  # fmt: skip
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    @abc.abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``(out, in)`` this layer applies (bias excluded)."""

    @classmethod
    def option_names(cls) -> list[str]:
        """The options ``from_linear`` takes besides ``rank`` (what ``convert`` accepts)."""
        params = inspect.signature(cls.from_linear).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "rank"]

    @classmethod
    def check_rank(cls, rank: object, in_features: int, out_features: int, *, maximum: int | None = None) -> int:
        """``rank`` if it is an integer in ``[1, maximum]`` (default ``min(in, out)``), else a
        :class:`~rankwise.errors.ConfigError` naming the layer and the valid range."""
        high = min(in_features, out_features) if maximum is None else maximum
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= high:
            raise ConfigError(
                f"{cls.__name__}: rank must be in [1, {high}] for a {out_features}x{in_features} "
                f"layer; got {rank!r}"
            )
        return rank

    def penalty(self) -> torch.Tensor | None:
        """The regulariser a training loop adds to this layer's loss, already weighted
        (Maestro's group lasso, TRP's nuclear norm; through :func:`penalty`); ``None`` for
        layers without one or with a zero weight."""
        return None

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called by a training loop after optimizer step ``step`` (counted from 0), through
        :func:`after_optimizer_step`: layers with periodic work (SST's re-SVD, TRP's
        projection) override it; most layers have none."""

    def extra_repr(self) -> str:
        rank = getattr(self, "rank", None)
        shown = "" if rank is None else f", rank={rank}"
        return f"in_features={self.in_features}, out_features={self.out_features}{shown}"


def check_fraction(layer: str, option: str, value: object, *, low_open: bool = True) -> float:
    """``value`` as a float in ``(0, 1]`` (``[0, 1]`` with ``low_open=False``), else a
    :class:`~rankwise.errors.ConfigError` naming ``layer``, ``option`` and the valid range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        valid = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{layer}: {option} must be a number in {valid}; got {value!r}")
    return float(value)


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    """A detached copy of ``linear``'s bias, or ``None``."""
    return None if linear.bias is None else linear.bias.detach().clone()


def register_trainable(name: str) -> Callable[[L], L]:
    """Class decorator: make a :class:`StructuredLinear` buildable as ``convert(model, name)``."""

    def register(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, StructuredLinear)):
            raise ConfigError(f"{cls!r} must subclass StructuredLinear to be a registered layer type")
        cls.method = name
        return TRAINABLE.register(name, cls)

    return register


def after_optimizer_step(
    model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Call :meth:`StructuredLinear.after_optimizer_step` on every structured layer of
    ``model`` (a training loop calls this once after each ``optimizer.step()``); returns how
    many layers were called."""
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    for layer in layers:
        layer.after_optimizer_step(step, optimizer)
    return len(layers)


def penalty(model: nn.Module) -> torch.Tensor | None:
    """The sum of :meth:`StructuredLinear.penalty` over the structured layers of ``model``,
    for a training loop to add to its loss; ``None`` when no layer has one."""
    terms = [
        t for m in model.modules() if isinstance(m, StructuredLinear) and (t := m.penalty()) is not None
    ]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


def check_weight(layer: str, option: str, value: object) -> float:
    """``value`` as a float ``>= 0`` (a regulariser's weight), else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{layer}: {option} must be a number >= 0; got {value!r}")
    return float(value)


def names() -> list[str]:
    """Every layer type :func:`~rankwise.layers.convert` can build."""
    return TRAINABLE.names()


__all__ = [
    "TRAINABLE", "StructuredLinear", "after_optimizer_step", "check_fraction", "check_weight",
    "linear_bias", "names", "penalty", "register_trainable",
]  # fmt: skip
