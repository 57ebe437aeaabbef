"""``QuantizedLinear``: ``y = deq(Q) x + b``, a group-wise k-bit weight stored packed
(:mod:`rankwise.layers.quantize`), decoded on PyTorch's packed int8/int4 CPU kernels where the
format fits one. Written by ``rankwise.compress`` (``lq``, ``eora``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import CheckpointError, ShapeError
from rankwise.layers.quantize import (
    FORMATS,
    Quantized,
    dequantize,
    kernel_for,
    kernel_matmul,
    pack_for_kernel,
    storage_bits,
)
from rankwise.layers.spec import register_layer


@register_layer
class QuantizedLinear(nn.Module):
    """``y = deq(Q) x + b``: group-wise k-bit weight (packed ``uint8`` codes, float16 scales,
    float16 group minima for the ``"affine"`` format).

    Forward: inputs of at most :attr:`KERNEL_MAX_ROWS` rows (decoding) run on the packed CPU
    kernel that fits the format (:attr:`kernel`: ``"int8"``, ``"int4"``; bfloat16 inside),
    built once from the codes and rebuilt if they change (e.g. loaded); larger inputs (prefill,
    perplexity), inputs that need a gradient, and formats or machines with no kernel
    (:attr:`kernel` ``"dequantize"``) dequantize the weight to float32 for that call.
    :meth:`storage_bits` counts what is saved: codes + scales (+ minima).
    """

    KERNEL_MAX_ROWS = 32  # above this the dequantized float32 matmul is faster (bench/quantized.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        fmt: str = "nf",
        group_size: int = 64,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.fmt, self.group_size = bits, fmt, group_size
        n_groups = -(-in_features * out_features // group_size)
        self.register_buffer(
            "codes", torch.zeros(-(-n_groups * group_size * bits // 8), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(n_groups, dtype=torch.float16))
        if fmt == "affine":
            self.register_buffer("zeros", torch.zeros(n_groups, dtype=torch.float16))
        else:
            self.zeros = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._packed: tuple | None = None  # (key, kernel name, operands), see _operands

    @classmethod
    def from_quantized(cls, q: Quantized, bias: torch.Tensor | None = None) -> QuantizedLinear:
        out_features, in_features = q.shape
        layer = cls(
            in_features,
            out_features,
            bits=q.bits,
            fmt=q.fmt,
            group_size=q.group_size,
            bias=bias is not None,
            dtype=None if bias is None else bias.dtype,
        )
        if q.codes.shape != layer.codes.shape or q.scales.shape != layer.scales.shape:
            raise ShapeError("quantized codes/scales do not match the layer shape")
        layer.codes.copy_(q.codes)
        layer.scales.copy_(q.scales)
        if layer.zeros is not None:
            if q.zeros is None or q.zeros.shape != layer.zeros.shape:
                raise ShapeError("an 'affine' quantized weight needs group minima of the layer's shape")
            layer.zeros.copy_(q.zeros)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    def quantized(self) -> Quantized:
        """The stored weight as a :class:`~rankwise.layers.quantize.Quantized`."""
        shape = (self.out_features, self.in_features)
        return Quantized(
            self.codes, self.scales, shape, self.bits, self.fmt, self.group_size, self.zeros
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out, in)``."""
        return dequantize(self.quantized())

    def _operands(self) -> tuple[str | None, tuple[torch.Tensor, ...] | None]:
        """``(kernel name, packed operands)``, rebuilt when the codes change; ``None``s: no kernel."""
        tensors = (self.codes, self.scales) if self.zeros is None else (self.codes, self.scales, self.zeros)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            shape = (self.out_features, self.in_features)
            name = kernel_for(
                shape, bits=self.bits, fmt=self.fmt, group_size=self.group_size, device=self.codes.device
            )
            operands = None if name is None else pack_for_kernel(self.quantized(), name)
            self._packed = (key, name if operands is not None else None, operands)
        return self._packed[1], self._packed[2]

    @property
    def kernel(self) -> str:
        """What decoding-sized inputs run on: ``"int8"``, ``"int4"`` or ``"dequantize"``."""
        return self._operands()[0] or "dequantize"

    def decodes_on_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is decoding-sized (at most :attr:`KERNEL_MAX_ROWS` rows) and needs no
        gradient: the inputs that :meth:`forward` sends to the packed kernel."""
        rows = x.numel() // max(1, x.shape[-1])
        return rows <= self.KERNEL_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decodes_on_kernel(x):
            return self._kernel_forward(x)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x Wᵀ`` (no bias) on the packed kernel, in ``x``'s dtype (pass bfloat16 to skip the
        casts); ``None`` when no kernel runs this layer."""
        name, operands = self._operands()
        return None if operands is None else kernel_matmul(x, name, operands, self.group_size)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the packed kernel whatever its size (no autograd); dequantizes if none."""
        name, operands = self._operands()
        if operands is None:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        y = kernel_matmul(x, name, operands, self.group_size)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def spec(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "fmt": self.fmt,
            "group_size": self.group_size,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> QuantizedLinear:
        if spec["fmt"] not in FORMATS:
            raise CheckpointError(
                f"quantized format {spec['fmt']!r} is unknown to this rankwise; known: {', '.join(FORMATS)}"
            )
        return cls(
            spec["in_features"],
            spec["out_features"],
            bits=int(spec["bits"]),
            fmt=spec["fmt"],
            group_size=int(spec["group_size"]),
            bias=bool(spec["bias"]),
            dtype=dtype,
        )

    def storage_bits(self) -> int:
        return storage_bits(
            self.out_features,
            self.in_features,
            bits=self.bits,
            group_size=self.group_size,
            fmt=self.fmt,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"fmt={self.fmt}, group_size={self.group_size}, kernel={self.kernel}"
        )


__all__ = ["QuantizedLinear"]
