"""``SparseDictLinear``: ``y = S (D x) + b``, a dictionary ``D`` and sparse codes ``S``
stored as values + indices (CoSpaDi 2025). Written by ``rankwise.compress``'s ``cospadi``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ShapeError
from rankwise.layers.spec import register_layer, tensor_bits


@register_layer
class SparseDictLinear(nn.Module):
    """``y = S (D x) + b``: dictionary ``D (k, in)``, codes ``S (out, k)`` with ``s`` non-zeros per row.

    ``S`` is stored as ``values (out, s)`` and ``indices (out, s)`` (int16 when ``k < 2^15``);
    the forward scatters them into a dense ``(out, k)`` matrix (cheap next to the matmuls).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        atoms: int,
        nonzeros: int,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= nonzeros <= atoms:
            raise ShapeError(f"nonzeros must be in [1, atoms={atoms}]; got {nonzeros}")
        self.in_features, self.out_features, self.atoms, self.nonzeros = (
            in_features,
            out_features,
            atoms,
            nonzeros,
        )
        index_dtype = torch.int16 if atoms < 2**15 else torch.int32
        self.D = nn.Parameter(torch.zeros(atoms, in_features, dtype=dtype))
        self.values = nn.Parameter(torch.zeros(out_features, nonzeros, dtype=dtype))
        self.register_buffer("indices", torch.zeros(out_features, nonzeros, dtype=index_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_parts(
        cls,
        dictionary: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> SparseDictLinear:
        layer = cls(
            dictionary.shape[1],
            values.shape[0],
            dictionary.shape[0],
            values.shape[1],
            bias=bias is not None,
            dtype=dictionary.dtype,
        )
        with torch.no_grad():
            layer.D.copy_(dictionary)
            layer.values.copy_(values)
            layer.indices.copy_(indices.to(layer.indices.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def codes(self) -> torch.Tensor:
        """The dense ``(out, k)`` code matrix ``S``."""
        dense = self.values.new_zeros(self.out_features, self.atoms)
        return dense.scatter(1, self.indices.long(), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.D), self.codes(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.codes() @ self.D

    def spec(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "atoms": self.atoms,
            "nonzeros": self.nonzeros,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> SparseDictLinear:
        return cls(
            spec["in_features"],
            spec["out_features"],
            int(spec["atoms"]),
            int(spec["nonzeros"]),
            bias=bool(spec["bias"]),
            dtype=dtype,
        )

    def storage_bits(self) -> int:
        return tensor_bits(self.D) + tensor_bits(self.values) + tensor_bits(self.indices)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
            f"nonzeros={self.nonzeros}"
        )


__all__ = ["SparseDictLinear"]
