"""Input validation shared by every kernel in :mod:`rankwise.linalg`.

Each check raises a rankwise error whose message names the public function, the
argument, the value seen and what would be valid, e.g.::

    rsvd: argument 'rank' must be an integer in [1, min(M, N)] = [1, 40]; got 64

Use them at the public boundary of a kernel, before any work is done:

    A = check_matrix(A, "A", "rsvd")              # tensor, (..., M, N), real float, finite
    check_rank(rank, A.shape[-2], A.shape[-1], "rsvd")
    work, out_dtype = as_float(A)                 # bf16/fp16 -> float32 inside

Checks that read tensor values (NaN/Inf) cost one pass over the data; kernels that accept
implicit operators check only what they can see (shape, dtype) on those.

NumPy input: every array argument goes through :func:`as_tensor`, so a ``numpy.ndarray``
is accepted wherever a tensor is (converted with ``torch.as_tensor``, without a copy when
it can be shared) and the results are torch tensors, as scikit-learn's input validation
turns array-likes into its own arrays. Anything else that is not a tensor (a list, a
pandas frame, ...) is a ShapeError naming the function, the type seen and the fix.

Extreme magnitudes: :func:`pow2_scale` gives the exact (power-of-two) factor that kernels
use to bring entries near 1e±30 to order one before forming Gram matrices or squares.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from rankwise.errors import ConfigError, ShapeError

# Dtypes computed in float32 inside and cast back on return (no SVD/QR kernels for them
# on several backends, and too little precision for orthogonalisation anyway).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def as_tensor(
    x: object, name: str, fn: str, *, accepted: str = "a torch.Tensor (or a numpy.ndarray)"
) -> torch.Tensor:
    """Return ``x`` as a tensor: a tensor unchanged, a ``numpy.ndarray`` converted.

    NumPy arrays share memory with the result when torch can (writable, non-negative
    strides); otherwise they are copied. Anything else raises ShapeError naming the type
    seen and the fix; ``accepted`` says what the argument may be.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            raise ShapeError(
                f"{fn}: argument '{name}' is a numpy array of dtype {x.dtype}; expected a "
                "numeric array (e.g. a.astype(np.float32))"
            )
        if not x.flags.writeable or any(s < 0 for s in x.strides):
            x = np.array(x)  # torch cannot share read-only or negatively strided memory
        return torch.as_tensor(x)
    raise ShapeError(
        f"{fn}: argument '{name}' must be {accepted}; got "
        f"{type(x).__name__}. Convert it first, e.g. torch.as_tensor({name.split('[')[0]}, "
        "dtype=torch.float32)"
    )


def check_dtype(dtype: torch.dtype, name: str, fn: str) -> None:
    """Refuse complex, integer and boolean dtypes (ShapeError)."""
    if dtype.is_complex:
        raise ShapeError(
            f"{fn}: argument '{name}' has complex dtype {dtype}; only real floating dtypes "
            "(float16, bfloat16, float32, float64) are supported. Pass the real and "
            "imaginary parts separately or use torch.linalg.svd for complex input."
        )
    if not dtype.is_floating_point:
        raise ShapeError(
            f"{fn}: argument '{name}' has dtype {dtype}; expected a floating dtype "
            "(float16, bfloat16, float32, float64). Convert it with .float() first."
        )


def check_shape(
    shape: tuple[int, ...] | torch.Size, name: str, fn: str, *, batched: bool = True
) -> None:
    """Require ``(..., M, N)`` (or exactly ``(M, N)`` if not ``batched``) with no empty dim."""
    shape = tuple(shape)
    if len(shape) < 2 or (not batched and len(shape) != 2):
        want = "(..., M, N) with at least 2 dimensions" if batched else "(M, N)"
        raise ShapeError(f"{fn}: argument '{name}' must have shape {want}; got shape {shape}")
    if any(int(s) == 0 for s in shape):
        raise ShapeError(
            f"{fn}: argument '{name}' is empty (shape {shape}); every dimension must be >= 1"
        )


def check_finite(A: torch.Tensor, name: str, fn: str) -> None:
    """Refuse NaN or Inf entries (ShapeError), saying how many there are.

    A NaN/Inf entry makes the sum non-finite, so one fast reduction clears the usual case;
    the elementwise pass runs only if the sum is not finite (bad entries or overflow).
    """
    if bool(torch.isfinite(A.sum())):
        return
    finite = torch.isfinite(A)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ShapeError(
            f"{fn}: argument '{name}' contains {bad} NaN/Inf value(s) (of {A.numel()}); "
            "all entries must be finite"
        )


def check_matrix(
    A: object, name: str, fn: str, *, batched: bool = True, finite: bool = True
) -> torch.Tensor:
    """Validate a dense matrix argument and return it as a tensor (see :func:`as_tensor`).

    Requires a tensor (or NumPy array) of shape ``(..., M, N)`` (``(M, N)`` if ``batched``
    is False), no empty dimension, a real floating dtype, and (if ``finite``) no NaN/Inf.
    """
    A = as_tensor(A, name, fn)
    check_shape(A.shape, name, fn, batched=batched)
    check_dtype(A.dtype, name, fn)
    if finite:
        check_finite(A, name, fn)
    return A


def check_vector(x: object, name: str, fn: str) -> torch.Tensor:
    """Validate a non-empty 1-D real floating, finite vector; return it as a tensor."""
    x = as_tensor(x, name, fn)
    check_dtype(x.dtype, name, fn)
    if x.ndim != 1 or x.numel() == 0:
        raise ShapeError(
            f"{fn}: argument '{name}' must be a non-empty 1-D tensor; got shape {tuple(x.shape)}"
        )
    check_finite(x, name, fn)
    return x


def check_int(
    value: object,
    name: str,
    fn: str,
    *,
    low: int | None = None,
    high: int | None = None,
    what: str | None = None,
) -> int:
    """Require a Python/NumPy integer (not bool) in ``[low, high]``; return it as ``int``."""
    rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    valid = (
        f"an integer in {what or rng}"
        if what or low is not None or high is not None
        else "an integer"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{fn}: argument '{name}' must be {valid}; got {_describe(value)}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ConfigError(f"{fn}: argument '{name}' must be {valid}; got {v}")
    return v


def check_rank(rank: object, m: int, n: int, fn: str, *, name: str = "rank") -> int:
    """Require an integer rank with ``1 <= rank <= min(m, n)``; return it as ``int``."""
    k = min(int(m), int(n))
    return check_int(
        rank, name, fn, low=1, high=k, what=f"[1, min(M, N)] = [1, {k}] for a {m} x {n} matrix"
    )


def check_float(
    value: object,
    name: str,
    fn: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Require a finite real number in the given interval; return it as ``float``."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{fn}: argument '{name}' must be a number in {interval}; got {_describe(value)}"
        )
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or v < low or (low_open and v == low)
    if high is not None:
        bad = bad or v > high or (high_open and v == high)
    if bad:
        raise ConfigError(f"{fn}: argument '{name}' must be a number in {interval}; got {v:g}")
    return v


def check_choice(value: object, name: str, fn: str, choices: tuple[object, ...]) -> object:
    """Require ``value`` to be one of ``choices`` (e.g. an ``"auto"`` string or a mode)."""
    if isinstance(value, bool) or value not in choices:
        raise ConfigError(
            f"{fn}: argument '{name}' must be one of {', '.join(map(repr, choices))}; "
            f"got {_describe(value)}"
        )
    return value


def check_generator(generator: object, fn: str, device: torch.device | None = None) -> None:
    """Require ``None`` or a ``torch.Generator`` (on ``device``'s type, if given)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ConfigError(
            f"{fn}: argument 'generator' must be a torch.Generator or None; "
            f"got {_describe(generator)}"
        )
    if device is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ConfigError(
            f"{fn}: argument 'generator' is on device {generator.device} but the input is on "
            f"{device}; create it with torch.Generator(device={str(device)!r})"
        )


def check_shape_pair(shape: object, name: str, fn: str, what: str = "(m, n)") -> tuple[int, int]:
    """Require a pair of positive Python integers (a matrix shape); return it as a tuple."""
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape)
    ):
        raise ConfigError(
            f"{fn}: argument '{name}' must be a pair of positive integers {what}; got {shape!r}"
        )
    return int(shape[0]), int(shape[1])


def pow2_scale(
    X: torch.Tensor, dim: int | tuple[int, ...] | None = None, *, keepdim: bool = False
) -> torch.Tensor:
    """The power of two ``c`` (float64) with ``c * max|X|`` in ``[0.5, 1)``, the maximum
    taken over ``dim`` (all entries if None); 1 where that maximum is 0.

    Multiplying by a power of two is exact (no rounding), so ``X * c`` is the same data in
    other units: kernels scale by it before forming Gram matrices or squares (which
    overflow float32 for entries near 1e20 and underflow near 1e-20) and scale back after.
    """
    absX = X.abs()
    mag = (absX.amax() if dim is None else absX.amax(dim=dim, keepdim=keepdim)).double()
    _, exponent = torch.frexp(mag)
    ok = torch.isfinite(mag) & (mag > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(mag), -exponent), 1.0)


def safe_range(dtype: torch.dtype) -> tuple[float, float]:
    """Magnitudes (a norm of the data) that ``dtype`` can square and Gram without
    overflow or underflow, with room for sizes and precision: ``2^±(maxexp / 4)``."""
    bits = math.log2(torch.finfo(dtype).max) / 4
    return 2.0**-bits, 2.0**bits


def as_float(A: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Return ``(A in a working dtype, caller's dtype)``.

    float16/bfloat16 are promoted to float32 (compute there, cast results back with
    ``.to(out_dtype)``); float32 and float64 pass through without a copy.
    """
    if A.dtype in LOW_PRECISION:
        return A.float(), A.dtype
    return A, A.dtype


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for inputs of ``dtype`` (float32 for bf16/fp16)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


__all__ = [
    "LOW_PRECISION",
    "as_float",
    "as_tensor",
    "check_choice",
    "check_dtype",
    "check_finite",
    "check_float",
    "check_generator",
    "check_int",
    "check_matrix",
    "check_rank",
    "check_shape",
    "check_shape_pair",
    "check_vector",
    "pow2_scale",
    "safe_range",
    "working_dtype",
]
