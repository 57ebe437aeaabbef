"""``CompensatedLinear``: ``y = base(x) + B (A x)``, a rank-``r`` correction beside any other
linear-like layer (EoRA 2024), and ``QuantizedLowRankLinear``, its case over a
:class:`~rankwise.layers.QuantizedLinear` (LQ-LoRA 2023: ``W ≈ Q + L1 L2``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError, ShapeError
from rankwise.layers.quantize import INT8_K_MULTIPLE, KERNEL_DTYPE, int8_rows, kernel_for, warn_once
from rankwise.layers.quantized import QuantizedLinear
from rankwise.layers.spec import (
    build_module,
    module_spec,
    module_storage_bits,
    register_layer,
    tensor_bits,
)


def _int8_kernel_runs(operands: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Probe ``_weight_int8pack_mm`` once per operand set; one warning per process if missing."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, operands[0].shape[1], dtype=KERNEL_DTYPE), *operands)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        warn_once(
            "merged-int8",
            f"the packed int8 matmul is unavailable in this torch ({torch.__version__}): {type(e).__name__}; "
            "compensated layers decode in float32 instead (correct, but slower)",
        )
        return False
    return True


@register_layer
class CompensatedLinear(nn.Module):
    """``y = base(x) + B (A x)``: a rank-``r`` correction ``B (out, r)``, ``A (r, in)`` beside ``base``.

    ``base`` is any linear-like module (``nn.Linear``, :class:`LowRankLinear`, a registered
    layer); its bias stays in ``base``. EoRA (2024) and LQ-LoRA (2023) build these.

    Decoding: when ``base`` is a :class:`QuantizedLinear` that runs on a packed kernel
    (:attr:`kernel` ``"int8"``/``"int4"``; others keep the float32 path) and that kernel takes this input
    (:meth:`QuantizedLinear.decodes_on_kernel`: decoding-sized, no gradient) and the factors
    need no gradient, the input is rounded to bfloat16 and the layer runs on operands built
    once from the stored codes and float32 factors (rebuilt when they change; nothing extra is
    saved), chosen by :attr:`factor_kernel` (class attribute; measured in ``bench/quantized.py``):

    - ``"auto"`` (default): ``"merged-int8"`` where it reads fewer bytes than the base's codes
      plus the float32 factors (an int8 base; an int4 base with ``r ≥ in·out / (8 (in + out))``,
      e.g. eora's ranks of 120–270), else ``"float32"`` (e.g. lq's small ranks over int4);
    - ``"merged-int8"``: ``deq(Q) + B A`` requantized to per-row int8 with bfloat16
      scales, one ``_weight_int8pack_mm`` call — a quarter of a dense float32 weight's bytes at
      run time; the only path measured at dense decode speed or better with compensation ranks
      of 120–270 (eager bfloat16/int8 matmuls of the thin factors cost more per call than
      float32 ones on CPU). Error vs float32: per-row int8 rounding of the merged weight
      (relative output error ~5e-3, like ``lq``'s 8-bit layers);
    - ``"int8"``: ``Q x`` on the base's kernel, ``A`` and ``B`` as per-row int8 copies (rank
      zero-padded to a multiple of 16);
    - ``"bfloat16"``: ``Q x`` on the base's kernel, bfloat16 copies of ``A`` and ``B``;
    - ``"float32"``: ``base(x) + B (A x)`` with the stored factors, as every other input.

    The int8 paths need ``in_features`` to be a multiple of 16 (else ``"bfloat16"``); outputs
    are accumulated in ``x``'s dtype. Prefill, training and bases without a kernel compute
    ``base(x) + B (A x)`` in float32.
    """

    FACTOR_KERNELS = ("auto", "merged-int8", "int8", "bfloat16", "float32")
    factor_kernel = "auto"

    def __init__(self, base: nn.Module, rank: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype))
        self.A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype))
        self._factors: tuple | None = None  # (key, operands), see _factor_operands
        self._plan: tuple[bool, bool] | None = None  # (base has a kernel, merging pays)

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
        if self._decodes_on_kernel(x):
            y = self._kernel_forward(x)
            if y is not None:
                return y
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)

    def _decodes_on_kernel(self, x: torch.Tensor) -> bool:
        if self.factor_kernel not in self.FACTOR_KERNELS:
            raise ConfigError(
                f"factor_kernel must be one of {', '.join(self.FACTOR_KERNELS)}; got {self.factor_kernel!r}"
            )
        if self.factor_kernel == "float32" or not isinstance(self.base, QuantizedLinear):
            return False
        grad = torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)
        if grad or not self.base.decodes_on_kernel(x):
            return False
        if self._plan is None:  # shapes and formats are fixed: decide once, not per token
            self._plan = (self._base_has_kernel(), self._merge_pays())
        has_kernel, merge_pays = self._plan
        return has_kernel and (self.factor_kernel != "auto" or merge_pays)

    def _base_has_kernel(self) -> bool:
        """Whether the base's format fits a packed kernel, without building its operands (the
        merged path never needs them)."""
        base = self.base
        shape = (base.out_features, base.in_features)
        return kernel_for(shape, bits=base.bits, fmt=base.fmt, group_size=base.group_size, device=base.codes.device) is not None

    def _merge_pays(self) -> bool:
        """Whether one int8 ``(out, in)`` weight is fewer bytes than the base's codes plus the
        float32 factors (``"auto"``: then ``"merged-int8"``, else the float32 path)."""
        base_bytes = self.base.storage_bits() // 8
        return self.in_features * self.out_features < base_bytes + 4 * self.rank * (self.in_features + self.out_features)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``Q x + B (A x)`` in bfloat16 on the kernels, accumulated in ``x``'s dtype; ``None``
        when the base has no kernel."""
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        kind, operands = self._factor_operands()
        if kind == "float32":
            return None
        if kind == "merged-int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, *operands).to(x.dtype)
            if self.base.bias is not None:
                y = y + self.base.bias
            return y.view(*x.shape[:-1], self.out_features)
        base = self.base.packed_matmul(rows)
        if base is None:
            return None
        if kind == "int8":
            hidden = torch.ops.aten._weight_int8pack_mm(rows, *operands[:2])
            low = torch.ops.aten._weight_int8pack_mm(hidden, *operands[2:])
        else:
            low = F.linear(F.linear(rows, operands[0]), operands[1])
        y = base.to(x.dtype).add_(low)
        if self.base.bias is not None:
            y = y + self.base.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _factor_operands(self) -> tuple[str, tuple[torch.Tensor, ...]]:
        """``(kind, operands)`` for ``B (A x)`` in bfloat16, rebuilt when the factors change;
        ``"int8"`` falls back to ``"bfloat16"`` where the kernel does not fit the width."""
        kind = "merged-int8" if self.factor_kernel == "auto" else self.factor_kernel
        if kind in ("int8", "merged-int8") and self.in_features % INT8_K_MULTIPLE:
            kind = "bfloat16"
        tensors = (self.A, self.B, *(t for t in (self.base.codes, self.base.scales, self.base.zeros) if t is not None))
        key = (kind, *((t.data_ptr(), t._version) for t in tensors))
        if self._factors is None or self._factors[0] != key:
            A, B = self.A.detach(), self.B.detach()
            if kind == "merged-int8":
                operands = int8_rows(self.dense_weight())
                if not _int8_kernel_runs(operands):
                    kind, operands = "float32", ()
                else:
                    self.base._packed = None  # its own kernel copy is not used on this path
            elif kind == "int8":
                pad = -self.rank % INT8_K_MULTIPLE  # the second matmul's width is the rank
                A = torch.cat([A, A.new_zeros(pad, self.in_features)])
                B = torch.cat([B, B.new_zeros(self.out_features, pad)], 1)
                operands = (*int8_rows(A), *int8_rows(B))
            else:
                operands = (A.to(KERNEL_DTYPE).contiguous(), B.to(KERNEL_DTYPE).contiguous())
            self._factors = (key, kind, operands)
        return self._factors[1], self._factors[2]

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
