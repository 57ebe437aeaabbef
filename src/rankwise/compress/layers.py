"""Compressed layers that are not one ``U V`` product, and the registry that saves/loads them.

Each class here replaces one ``nn.Linear(in, out)`` of the base architecture:

- :class:`QuantizedLinear`: ``y = deq(Q) x + b``, ``Q`` packed k-bit codes + float16 group
  scales (``quantize.py``); decoding runs on PyTorch's packed int8/int4 CPU kernels where the
  format fits one (its :attr:`~QuantizedLinear.kernel` says which), otherwise the weight is
  dequantized on the fly;
- :class:`CompensatedLinear`: ``y = base(x) + B (A x)``, a rank-``r`` term beside any other
  layer (EoRA 2024); :class:`QuantizedLowRankLinear` is the ``base = QuantizedLinear`` case
  (LQ-LoRA 2023: ``W ≈ Q + L1 L2``);
- :class:`SparseDictLinear`: ``y = S (D x) + b``, dictionary ``D (k, in)`` and codes
  ``S (out, k)`` with ``s`` non-zeros per row stored as values + int16/int32 indices
  (CoSpaDi 2025);
- :class:`ScatterLinear` / :class:`GatherLinear`: a linear map onto / from a subset of a wider
  vector's coordinates (MoDeGPT 2024: attention heads with fewer value / query-key dims,
  zero-padded back to the head size the attention kernel expects).

Registry: ``@register_layer`` makes a class savable. A registered class implements
``spec() -> dict`` (JSON: everything needed to rebuild empty modules of the right shapes),
``from_spec(spec, dtype)`` (classmethod) and ``storage_bits()`` (the exact bits its weights
take, codes and indices included; the bias is not counted, as everywhere in ``compress``).
``checkpoint.py`` writes ``{"type": name, **spec}`` for every registered module and rebuilds
them on load; :func:`rankwise.models.count_parameters` counts every module with a
``storage_bits()`` as that storage, in parameters of the model's dtype (what the ``ratio`` /
``size`` targets count, and what ``rankwise eval`` prints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.compress.base import LowRankLinear
from rankwise.compress.quantize import (
    FORMATS,
    Quantized,
    dequantize,
    kernel_for,
    kernel_matmul,
    pack_for_kernel,
    storage_bits,
)
from rankwise.errors import CheckpointError, ConfigError, ModelError, ShapeError
from rankwise.modules import replace_module
from rankwise.registry import Registry

LAYER_TYPES: Registry[type[nn.Module]] = Registry("compressed layer type")


def register_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` savable by :mod:`rankwise.compress.checkpoint` under its name."""
    for attr in ("spec", "from_spec", "storage_bits"):
        if not hasattr(cls, attr):
            raise ConfigError(f"{cls.__name__} needs a {attr!r} method to be a registered layer")
    return LAYER_TYPES.register(cls.__name__, cls)


def is_registered(module: nn.Module) -> bool:
    """Whether ``module``'s class is a registered compressed layer type."""
    name = type(module).__name__
    return name in LAYER_TYPES and LAYER_TYPES[name] is type(module)


def _bits(t: torch.Tensor | None) -> int:
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
    raise CheckpointError(f"{type(module).__name__} is not a registered compressed layer type")


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
        f"compressed layer type {kind!r} is unknown to this rankwise; known: "
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
        return _bits(module.U) + _bits(module.V)
    if isinstance(module, nn.Linear):
        return _bits(module.weight)
    raise ShapeError(f"cannot count the storage of a {type(module).__name__}")


# ----------------------------------------------------------------------------- quantized


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
        """The stored weight as a :class:`~rankwise.compress.quantize.Quantized`."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows <= self.KERNEL_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
            return self._kernel_forward(x)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the packed kernel whatever its size (no autograd); dequantizes if none."""
        name, operands = self._operands()
        if operands is None:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        y = kernel_matmul(x, name, operands, self.group_size)
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> torch.Tensor:
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

    def to_dense(self) -> torch.Tensor:
        base = self.base.weight if isinstance(self.base, nn.Linear) else self.base.to_dense()
        return base.float() + (self.B @ self.A).float()

    def spec(self) -> dict:
        return {"rank": self.rank, "base": module_spec(self.base)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> CompensatedLinear:
        return cls(build_module(spec["base"], dtype), int(spec["rank"]), dtype=dtype)

    def storage_bits(self) -> int:
        return module_storage_bits(self.base) + _bits(self.A) + _bits(self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


@register_layer
class QuantizedLowRankLinear(CompensatedLinear):
    """``y = deq(Q) x + L1 (L2 x) + b`` (LQ-LoRA 2023): a :class:`CompensatedLinear` over a
    :class:`QuantizedLinear` (``L1 = B``, ``L2 = A``)."""


# ----------------------------------------------------------------------------- sparse dictionary


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

    def to_dense(self) -> torch.Tensor:
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
        return _bits(self.D) + _bits(self.values) + _bits(self.indices)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
            f"nonzeros={self.nonzeros}"
        )


# ----------------------------------------------------------------------------- coordinate subsets


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

    def to_dense(self) -> torch.Tensor:
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
        return _bits(self.weight) + _bits(self.index)


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
        return _bits(self.weight)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight a linear-like module applies (float32), for error measurements."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    return module.to_dense().detach().float()


__all__ = [
    "LAYER_TYPES",
    "register_layer",
    "module_spec",
    "build_module",
    "module_storage_bits",
    "registered_modules",
    "install_module",
    "is_registered",
    "dense_weight",
    "QuantizedLinear",
    "CompensatedLinear",
    "QuantizedLowRankLinear",
    "SparseDictLinear",
    "ScatterLinear",
    "GatherLinear",
    "ResizedLinear",
]
