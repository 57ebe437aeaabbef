"""``CompensatedLinear``: ``y = base(x) + B (A x)``, a rank-``r`` correction beside any other
linear-like layer (EoRA 2024), and ``QuantizedLowRankLinear``, its case over a
:class:`~rankwise.layers.QuantizedLinear` (LQ-LoRA 2023: ``W ≈ Q + L1 L2``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ShapeError
from rankwise.layers.spec import (
    build_module,
    module_spec,
    module_storage_bits,
    register_layer,
    tensor_bits,
)


@register_layer
class CompensatedLinear(nn.Module):
    """``y = base(x) + B (A x)``: a rank-``r`` correction ``B (out, r)``, ``A (r, in)`` beside ``base``.

    ``base`` is any linear-like module (``nn.Linear``, :class:`LowRankLinear`, a registered
    layer); its bias stays in ``base``. EoRA (2024) and LQ-LoRA (2023) build these.
    """

    def __init__(self, base: nn.Module, rank: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype))
        self.A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype))

    @classmethod
    def from_factors(
        cls, base: nn.Module, up: torch.Tensor, down: torch.Tensor
    ) -> CompensatedLinear:
        if up.shape != (base.out_features, down.shape[0]) or down.shape[1] != base.in_features:
            raise ShapeError(
                f"factors {tuple(up.shape)}, {tuple(down.shape)} do not fit a "
                f"{base.out_features}x{base.in_features} layer"
            )
        layer = cls(base, up.shape[1], dtype=up.dtype)
        with torch.no_grad():
            layer.B.copy_(up)
            layer.A.copy_(down)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @property
    def kernel(self) -> str:
        """The base's matmul path (:attr:`QuantizedLinear.kernel`), ``"dense"`` for other bases."""
        return getattr(self.base, "kernel", "dense")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)

    def dense_weight(self) -> torch.Tensor:
        base = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dense_weight()
        return base.float() + (self.B @ self.A).float()

    def spec(self) -> dict:
        return {"rank": self.rank, "base": module_spec(self.base)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> CompensatedLinear:
        return cls(build_module(spec["base"], dtype), int(spec["rank"]), dtype=dtype)

    def storage_bits(self) -> int:
        return module_storage_bits(self.base) + tensor_bits(self.A) + tensor_bits(self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


@register_layer
class QuantizedLowRankLinear(CompensatedLinear):
    """``y = deq(Q) x + L1 (L2 x) + b`` (LQ-LoRA 2023): a :class:`CompensatedLinear` over a
    :class:`QuantizedLinear` (``L1 = B``, ``L2 = A``)."""


__all__ = ["CompensatedLinear", "QuantizedLowRankLinear"]
