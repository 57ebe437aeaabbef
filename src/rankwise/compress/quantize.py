"""Group-wise k-bit weight quantization with packed storage (NF-k or symmetric int-k).

A weight ``W (out, in)`` is flattened row-major and cut into groups of ``group_size``
consecutive values (the last group zero-padded). Each group keeps one absmax scale
``a_g = max |w|`` (stored as float16) and each value one ``bits``-bit code ``c`` into a
codebook ``q ∈ [-1, 1]^(2^bits)``: ``w ≈ a_g · q[c]``, ``c = argmin_j |w / a_g − q_j|``.

Codebooks (both computed here, from their definitions):

- ``"nf"`` (NormalFloat, QLoRA 2023 / LQ-LoRA 2023): levels at quantiles of N(0, 1), with
  ``2^(k-1)`` positive levels, ``2^(k-1) − 1`` negative ones and an exact zero, scaled to
  ``[-1, 1]`` — information-theoretically suited to normally distributed weights;
- ``"int"``: symmetric uniform levels ``j / (2^(k-1) − 1)``, ``|j| ≤ 2^(k-1) − 1`` (one code
  unused, so zero is exact and the grid symmetric).

Codes are bit-packed into ``uint8`` (``⌈N·k/8⌉`` bytes for ``N`` values), so a 3-bit layer
really stores 3 bits per weight; :func:`storage_bits` counts codes + scales exactly.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from rankwise.errors import ConfigError, ShapeError

FORMATS = ("nf", "int")
SCALE_DTYPE = torch.float16


def _check(bits: int, fmt: str, group_size: int) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"quantization format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in [2, 8]; got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer; got {group_size!r}")


def codebook(bits: int, fmt: str = "nf") -> torch.Tensor:
    """The ``2^bits`` (``"nf"``) or ``2^bits − 1`` (``"int"``) levels in ``[-1, 1]``, ascending (float32)."""
    _check(bits, fmt, 1)
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
    """A quantized ``(out, in)`` weight: packed codes ``uint8``, float16 scales ``(groups,)``."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    bits: int
    fmt: str
    group_size: int


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
    scales = groups.abs().amax(1).to(SCALE_DTYPE)
    scale = scales.float().clamp(min=torch.finfo(SCALE_DTYPE).tiny)[:, None]
    levels = codebook(bits, fmt).to(flat.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize((groups / scale).clamp(-1, 1), midpoints)  # nearest level
    return Quantized(pack_codes(codes, bits), scales, tuple(weight.shape), bits, fmt, group_size)


def dequantize_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    shape: tuple[int, int],
    *,
    bits: int,
    fmt: str,
    group_size: int,
) -> torch.Tensor:
    """The float32 ``(out, in)`` weight from packed ``codes`` and float16 ``scales``."""
    count = scales.numel() * group_size
    idx = unpack_codes(codes, bits, count).view(-1, group_size)  # (n_groups, group_size)
    levels = codebook(bits, fmt).to(codes.device)
    values = levels[idx] * scales.float()[:, None]
    return values.reshape(-1)[: shape[0] * shape[1]].view(shape)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 weight a :class:`Quantized` stands for."""
    return dequantize_parts(
        q.codes, q.scales, q.shape, bits=q.bits, fmt=q.fmt, group_size=q.group_size
    )


def quantize_dequantize(weight: torch.Tensor, **options: object) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in ``weight``'s dtype: the quantized weight's values."""
    return dequantize(quantize(weight, **options)).to(weight.dtype)


def storage_bits(out_features: int, in_features: int, *, bits: int, group_size: int) -> int:
    """Bits to store a quantized ``(out, in)`` weight: packed codes + one float16 scale per group."""
    n_groups = math.ceil(out_features * in_features / group_size)
    code_bytes = math.ceil(n_groups * group_size * bits / 8)
    return 8 * code_bytes + 16 * n_groups


__all__ = [
    "FORMATS",
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
