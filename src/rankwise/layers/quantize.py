"""Group-wise k-bit weight quantization with packed storage (NF-k, symmetric int-k or affine),
and the packed-weight CPU matmul kernels that run it without dequantizing.

This is the storage format of :class:`~rankwise.layers.QuantizedLinear`; it lives beside the
layer (below ``rankwise.compress``) so that the layer can be rebuilt without the compression
code, and ``compress``'s ``lq``/``eora`` methods quantize with it.

A weight ``W (out, in)`` is flattened row-major and cut into groups of ``group_size``
consecutive values (the last group zero-padded). Each group keeps one absmax scale
``a_g = max |w|`` (stored as float16) and each value one ``bits``-bit code ``c`` into a
codebook ``q ∈ [-1, 1]^(2^bits)``: ``w ≈ a_g · q[c]``, ``c = argmin_j |w / a_g − q_j|``.
The ``"affine"`` format instead keeps a step ``s_g = (max − min) / (2^k − 1)`` and the
minimum ``m_g`` (both float16) per group: ``w ≈ m_g + s_g · c``, ``c ∈ [0, 2^k)`` (GPTQ/AWQ's
asymmetric int-k; the GGUF Q4_1 format SmolLM2 ships in is the same with groups of 32).

Codebooks (both computed here, from their definitions):

- ``"nf"`` (NormalFloat, QLoRA 2023 / LQ-LoRA 2023): levels at quantiles of N(0, 1), with
  ``2^(k-1)`` positive levels, ``2^(k-1) − 1`` negative ones and an exact zero, scaled to
  ``[-1, 1]`` — information-theoretically suited to normally distributed weights;
- ``"int"``: symmetric uniform levels ``j / (2^(k-1) − 1)``, ``|j| ≤ 2^(k-1) − 1`` (one code
  unused, so zero is exact and the grid symmetric).

Codes are bit-packed into ``uint8`` (``⌈N·k/8⌉`` bytes for ``N`` values), so a 3-bit layer
really stores 3 bits per weight; :func:`storage_bits` counts codes + scales (+ minima) exactly.

Kernels (:func:`kernel_for`, :func:`pack_for_kernel`, :func:`kernel_matmul`): PyTorch ships
weight-only int8 (one scale per output row) and int4 (scale + zero per group of 32–256 inputs)
matmuls for CPU in ``torch.ops.aten``. They are fast only with bfloat16 activations (measured
in ``bench/quantized.py``: float32 inputs run ~10× slower than a dense float32 matmul), so
inputs are rounded to bfloat16 and the output cast back (the scales and zeros the kernels
read are bfloat16 too: a relative output error of a few 1e-3, far below the quantization's). Two formats map onto them exactly:
``"int"`` 8-bit with one group per row (``group_size == in``) → ``_weight_int8pack_mm``, and
``"affine"`` 4-bit with ``in % group_size == 0``, ``group_size ∈ {32, 64, 128, 256}`` and
``out % 16 == 0`` → ``_weight_int4pack_mm_for_cpu``. The kernel's operand is a copy built
from the stored codes (the int4 kernel wants its own tile order), so a layer running a kernel
holds that copy beside its codes at run time; what is saved is only codes + scales.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch

from rankwise.errors import ConfigError, ShapeError

FORMATS = ("nf", "int", "affine")
#: resolved by :func:`resolve_format` per layer: 8 bits → ``"int"``, one group per row;
#: other bits → ``"affine"`` (both run on a packed kernel where one exists).
AUTO = "auto"
SCALE_DTYPE = torch.float16


def _check(bits: int, fmt: str, group_size: int) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"quantization format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in [2, 8]; got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer; got {group_size!r}")


def resolve_format(fmt: str, bits: int, group_size: int, in_features: int) -> tuple[str, int]:
    """``(fmt, group_size)`` for one layer: ``"auto"`` picks the kernel-friendly format for
    ``bits`` (8 → symmetric ``"int"`` with one group per row, else ``"affine"``); any other
    ``fmt`` is returned as given."""
    if fmt != AUTO:
        return fmt, group_size
    return ("int", in_features) if bits == 8 else ("affine", group_size)


def codebook(bits: int, fmt: str = "nf") -> torch.Tensor:
    """The ``2^bits`` (``"nf"``) or ``2^bits − 1`` (``"int"``) levels in ``[-1, 1]``, ascending (float32).

    ``"affine"`` has no fixed codebook (its levels are ``m_g + s_g · c`` per group).
    """
    _check(bits, fmt, 1)
    if fmt == "affine":
        raise ConfigError("the 'affine' format has no codebook: its levels are min + step·code per group")
    return _codebook(bits, fmt).clone()


@functools.cache
def _codebook(bits: int, fmt: str) -> torch.Tensor:
    half = 2 ** (bits - 1)
    if fmt == "int":
        return torch.arange(-(half - 1), half, dtype=torch.float64).div(half - 1).float()
    # quantile probabilities: the extreme level sits at the centre of the outermost 1/2^(k+1) tail
    tail = 0.5 / 2**bits
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(0.5, 1.0 - tail, half + 1, dtype=torch.float64))[
        1:
    ]  # half levels > 0
    neg = normal.icdf(torch.linspace(tail, 0.5, half, dtype=torch.float64))[
        :-1
    ]  # half-1 levels < 0
    levels = torch.cat([neg / -neg[0], torch.zeros(1, dtype=torch.float64), pos / pos[-1]])
    return levels.float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(N,)`` in ``[0, 2^bits)`` into ``uint8 (⌈N·bits/8⌉,)``, little-endian bits."""
    c = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=c.device)
    bitplane = ((c[:, None] >> shifts) & 1).reshape(-1)  # (N·bits,)
    pad = (-bitplane.numel()) % 8
    if pad:
        bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=c.device)
    return (bitplane.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` codes as ``int64 (count,)``."""
    if 8 % bits == 0:  # fast path: whole codes per byte
        shifts = torch.arange(0, 8, bits, device=packed.device)
        codes = (packed.to(torch.int64)[:, None] >> shifts) & ((1 << bits) - 1)  # (bytes, per_byte)
        return codes.reshape(-1)[:count]
    bitplane = (packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1
    bitplane = bitplane.reshape(-1)[: count * bits].view(count, bits)  # (count, bits)
    return (bitplane << torch.arange(bits, device=packed.device)).sum(1)


class Quantized(NamedTuple):
    """A quantized ``(out, in)`` weight: packed codes ``uint8``, float16 scales ``(groups,)``,
    and for ``"affine"`` the float16 group minima ``zeros (groups,)`` (``None`` otherwise)."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    bits: int
    fmt: str
    group_size: int
    zeros: torch.Tensor | None = None


def quantize(
    weight: torch.Tensor, *, bits: int = 4, fmt: str = "nf", group_size: int = 64
) -> Quantized:
    """Quantize ``weight (out, in)`` group-wise (absmax scale per ``group_size`` values)."""
    _check(bits, fmt, group_size)
    if weight.ndim != 2 or weight.numel() == 0:
        raise ShapeError(
            f"weight must be a non-empty (out, in) matrix; got shape {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise ShapeError("weight contains NaN/Inf; cannot quantize it")
    flat = weight.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, group_size)  # (n_groups, group_size)
    if fmt == "affine":
        return _quantize_affine(groups, tuple(weight.shape), bits, group_size)
    scales = groups.abs().amax(1).to(SCALE_DTYPE)
    scale = scales.float().clamp(min=torch.finfo(SCALE_DTYPE).tiny)[:, None]
    levels = codebook(bits, fmt).to(flat.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize((groups / scale).clamp(-1, 1), midpoints)  # nearest level
    return Quantized(pack_codes(codes, bits), scales, tuple(weight.shape), bits, fmt, group_size)


def _quantize_affine(
    groups: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int
) -> Quantized:
    """``w ≈ m + s·c``: float16 minimum ``m`` and step ``s`` per group, ``c ∈ [0, 2^bits)``."""
    top = 2**bits - 1
    low, high = groups.amin(1), groups.amax(1)
    zeros = low.to(SCALE_DTYPE)
    scales = ((high - zeros.float()) / top).to(SCALE_DTYPE)
    step = scales.float().clamp(min=torch.finfo(SCALE_DTYPE).tiny)[:, None]
    codes = ((groups - zeros.float()[:, None]) / step).round().clamp(0, top).to(torch.int64)
    return Quantized(pack_codes(codes, bits), scales, shape, bits, "affine", group_size, zeros)


def dequantize_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    shape: tuple[int, int],
    *,
    bits: int,
    fmt: str,
    group_size: int,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 ``(out, in)`` weight from packed ``codes``, float16 ``scales`` (and ``zeros``)."""
    count = scales.numel() * group_size
    idx = unpack_codes(codes, bits, count).view(-1, group_size)  # (n_groups, group_size)
    if fmt == "affine":
        if zeros is None:
            raise ShapeError("an 'affine' quantized weight needs its group minima (zeros)")
        values = idx.float() * scales.float()[:, None] + zeros.float()[:, None]
    else:
        levels = codebook(bits, fmt).to(codes.device)
        values = levels[idx] * scales.float()[:, None]
    return values.reshape(-1)[: shape[0] * shape[1]].view(shape)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 weight a :class:`Quantized` stands for."""
    return dequantize_parts(
        q.codes, q.scales, q.shape, bits=q.bits, fmt=q.fmt, group_size=q.group_size, zeros=q.zeros
    )


def quantize_dequantize(weight: torch.Tensor, **options: object) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype: the quantized weight's values."""
    return dequantize(quantize(weight, **options)).to(weight.dtype)


def storage_bits(
    out_features: int, in_features: int, *, bits: int, group_size: int, fmt: str = "nf"
) -> int:
    """Bits to store a quantized ``(out, in)`` weight: packed codes + one float16 scale per
    group (+ one float16 minimum per group for ``"affine"``)."""
    n_groups = math.ceil(out_features * in_features / group_size)
    code_bytes = math.ceil(n_groups * group_size * bits / 8)
    per_group = 32 if fmt == "affine" else 16
    return 8 * code_bytes + per_group * n_groups


# ----------------------------------------------------------------------------- packed kernels

KERNEL_DTYPE = torch.bfloat16  # the activations' dtype the CPU kernels are fast in
INT4_GROUPS = (32, 64, 128, 256)
#: ``_weight_int8pack_mm`` returns garbage (or crashes) unless the input width is a multiple of 16
INT8_K_MULTIPLE = 16
_warned: set[str] = set()


def kernel_for(
    shape: tuple[int, int], *, bits: int, fmt: str, group_size: int, device: torch.device | str = "cpu"
) -> str | None:
    """``"int8"`` or ``"int4"``: the packed CPU kernel that runs this format exactly, or ``None``
    (the layer dequantizes). Whether the running torch really has it is :func:`pack_for_kernel`'s
    business."""
    out_f, in_f = shape
    if torch.device(device).type != "cpu":
        return None
    if fmt == "int" and bits == 8 and group_size == in_f and in_f % INT8_K_MULTIPLE == 0:
        return "int8"
    if fmt == "affine" and bits == 4 and group_size in INT4_GROUPS and in_f % group_size == 0 and out_f % 16 == 0:
        return "int4"
    return None


def warn_once(key: str, message: str) -> None:
    """One ``RuntimeWarning`` per ``key`` per process (a fallback said once, not per layer)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def pack_for_kernel(q: Quantized, kernel: str) -> tuple[torch.Tensor, ...] | None:
    """The operands :func:`kernel_matmul` needs for ``q`` on ``kernel``; ``None`` (with one
    warning per process) when this torch lacks the kernel or it refuses the operands."""
    idx = unpack_codes(q.codes, q.bits, q.shape[0] * q.shape[1]).view(q.shape)
    try:
        if kernel == "int8":
            levels = (idx - (2 ** (q.bits - 1) - 1)).to(torch.int8)  # code → signed level j
            scales = q.scales.float().div(2 ** (q.bits - 1) - 1).to(KERNEL_DTYPE)
            operands = (levels.contiguous(), scales)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(idx.to(torch.int32), 1)
            scales = q.scales.float().view(q.shape[0], -1)  # (out, groups per row)
            zeros = q.zeros.float().view(q.shape[0], -1) + 8 * scales  # kernel: (c − 8)·s + z
            scale_zero = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
            operands = (packed, scale_zero.to(KERNEL_DTYPE))
        kernel_matmul(torch.zeros(1, q.shape[1]), kernel, operands, q.group_size)  # probe once
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        warn_once(
            kernel,
            f"the packed {kernel} matmul is unavailable in this torch ({torch.__version__}): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; quantized layers "
            "dequantize their weight in every forward instead (correct, but slower)",
        )
        return None
    return operands


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (n, k)`` as the int8 kernel's operands: symmetric int8 levels with one bfloat16
    scale per row (``w ≈ s_i · j``, ``|j| ≤ 127``). ``k`` must be a multiple of
    :data:`INT8_K_MULTIPLE` (pad with zero columns first)."""
    if weight.shape[1] % INT8_K_MULTIPLE:
        raise ShapeError(f"the int8 kernel needs a width that is a multiple of {INT8_K_MULTIPLE}; got {weight.shape[1]}")
    w = weight.detach().float()
    scales = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    levels = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return levels.contiguous(), scales.to(KERNEL_DTYPE)


def kernel_matmul(
    x: torch.Tensor, kernel: str, operands: tuple[torch.Tensor, ...], group_size: int
) -> torch.Tensor:
    """``x (..., in) @ Wᵀ`` with a packed weight, computed in bfloat16, returned in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    if kernel == "int8":
        out = torch.ops.aten._weight_int8pack_mm(rows, *operands)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, operands[0], group_size, operands[1])
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


__all__ = [
    "FORMATS",
    "AUTO",
    "resolve_format",
    "kernel_for",
    "pack_for_kernel",
    "kernel_matmul",
    "int8_rows",
    "warn_once",
    "Quantized",
    "codebook",
    "quantize",
    "dequantize",
    "dequantize_parts",
    "quantize_dequantize",
    "pack_codes",
    "unpack_codes",
    "storage_bits",
]
