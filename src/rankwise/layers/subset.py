"""``ScatterLinear`` / ``GatherLinear``: a linear map onto / from a subset of a wider
vector's coordinates (MoDeGPT 2024: attention heads with fewer value / query-key dims,
zero-padded back to the head size the attention kernel expects)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.spec import register_layer, tensor_bits


class _SubsetLinear(nn.Module):
    """A linear map that touches only ``kept`` coordinates of its output (``axis=0``) or of
    its input (``axis=1``); ``index (kept,)`` int32 says which. The subclasses differ only
    in the axis and the forward."""

    axis: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kept: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kept = in_features, out_features, kept
        shape = (kept, in_features) if self.axis == 0 else (out_features, kept)
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=dtype))
        self.register_buffer("index", torch.zeros(kept, dtype=torch.int32))
        bias_size = kept if self.axis == 0 else out_features
        self.bias = nn.Parameter(torch.zeros(bias_size, dtype=dtype)) if bias else None

    @classmethod
    def from_parts(
        cls,
        weight: torch.Tensor,
        index: torch.Tensor,
        full: int,
        bias: torch.Tensor | None = None,
    ) -> _SubsetLinear:
        """From the kept block ``weight``, its ``index`` and the full width of the subset axis."""
        out_features, in_features = (full, weight.shape[1]) if cls.axis == 0 else (weight.shape[0], full)
        kept = weight.shape[cls.axis]
        layer = cls(in_features, out_features, kept, bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.index.copy_(index.to(torch.int32))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return self.weight.new_zeros(self.out_features, self.in_features).index_copy(
            self.axis, self.index.long(), self.weight
        )

    def spec(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "kept": self.kept,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> _SubsetLinear:
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["kept"]),
            bias=bool(spec["bias"]),
            dtype=dtype,
        )

    def storage_bits(self) -> int:
        return tensor_bits(self.weight) + tensor_bits(self.index)


@register_layer
class ScatterLinear(_SubsetLinear):
    """``y[index] = W x + b[index]``, other coordinates of ``y (out,)`` zero.

    ``W (k, in)``; ``index (k,)`` positions in the ``out``-wide output. With MoDeGPT (2024),
    ``v_proj`` keeps ``k`` dims per head and writes them into the first ``k`` slots of each
    head; ``q/k_proj`` keep RoPE pairs of dims in place.
    """

    axis = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = F.linear(x, self.weight, self.bias)  # (..., kept)
        out = part.new_zeros(*part.shape[:-1], self.out_features)
        return out.index_copy(-1, self.index.long(), part)


@register_layer
class GatherLinear(_SubsetLinear):
    """``y = W x[index] + b``: reads only ``k`` coordinates of the ``in``-wide input.

    ``W (out, k)`` (MoDeGPT's ``o_proj`` reading the kept value dims).
    """

    axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index.long()), self.weight, self.bias)


__all__ = ["ScatterLinear", "GatherLinear"]
