"""``ResizedLinear``: an ``nn.Linear`` whose shape differs from the base architecture's,
registered so checkpoints record its new shape (MoDeGPT 2024 shrinks the MLP's width)."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers.spec import register_layer, tensor_bits


@register_layer
class ResizedLinear(nn.Linear):
    """An ``nn.Linear`` whose shape differs from the base architecture's (MoDeGPT 2024 shrinks
    the MLP's intermediate dimension); registered so checkpoints record its new shape."""

    def spec(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> ResizedLinear:
        return cls(spec["in_features"], spec["out_features"], bias=bool(spec["bias"]), dtype=dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> ResizedLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def storage_bits(self) -> int:
        return tensor_bits(self.weight)


__all__ = ["ResizedLinear"]
