"""Top eigenvector of ``A^T A`` from one pass over a stream of rows, in O(d) memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import (
    as_tensor,
    check_dtype,
    check_finite,
    check_float,
    check_generator,
    check_int,
    pow2_scale,
)

_FN = "streaming_top_eigvec"


class TopEigResult(NamedTuple):
    """Result of :func:`streaming_top_eigvec`.

    Attributes:
        vector: ``(d,)`` unit vector, the estimate of the top eigenvector ``v_1`` of
            ``A^T A`` (equivalently the top right singular vector of ``A``); its sign is
            arbitrary.
        value: estimate of ``lambda_1 / n_rows``, the top eigenvalue of the second-moment
            matrix ``A^T A / n`` (the covariance for centred rows), as a Python float.
        n_rows: number of rows consumed.
    """

    vector: torch.Tensor
    value: float
    n_rows: int


def _as_block(item: object, index: int, d: int | None) -> torch.Tensor:
    item = as_tensor(item, f"stream[{index}]", _FN)
    check_dtype(item.dtype, f"stream[{index}]", _FN)
    if item.ndim == 1:
        item = item[None, :]
    if item.ndim != 2 or item.shape[1] == 0:
        raise ShapeError(
            f"{_FN}: argument 'stream' item {index} must be a vector (d,) or a row block (b, d) "
            f"with d >= 1; got shape {tuple(item.shape)}"
        )
    if d is not None and item.shape[1] != d:
        raise ShapeError(
            f"{_FN}: argument 'stream' item {index} has {item.shape[1]} columns; earlier items "
            f"(or 'dim') have d = {d}"
        )
    check_finite(item, f"stream[{index}]", _FN)
    return item


def streaming_top_eigvec(
    stream: Iterable[torch.Tensor],
    *,
    dim: int | None = None,
    lr: float = 2.0,
    max_rows: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> TopEigResult:
    """Approximate the top eigenvector of ``A^T A`` in one pass over the rows of ``A``.

    Oja's rule on a stream of rows ``a_t`` (single vectors or blocks ``B_t`` of rows)::

        v <- normalise(v + eta_t B_t^T (B_t v)),    eta_t = lr / S_t,
        S_t = sum_{s <= t} ||B_s v_{s-1}||^2

    ``S_t`` is a running, online estimate of ``t * lambda_1`` (the Rayleigh energy seen so
    far), so ``eta_t ~ lr / (lambda_1 t)``, the classic ``1/t`` schedule for Oja's
    algorithm, without knowing the stream length or the scale of the data. Early steps are
    large, which moves the random start onto the data quickly. Memory is ``O(d)``: ``v``,
    one row block and two scalars. The eigenvalue estimate is the running mean of
    ``||B_t v_{t-1}||^2 / b_t`` weighted by rows seen (late, well-aligned steps count most).

    The analysis this follows assumes rows in uniformly random order and a spectral gap
    ``R = sigma_1^2 / sigma_2^2 = Omega(1)`` ("Approximating the Top Eigenvector in Random
    Order Streams", 2024): correlation ``1 - O(1/R)`` with ``v_1``. Adversarial orders (e.g.
    sorted rows) can defeat any single-pass method with this memory; shuffle if you can.
    The paper's separate handling of heavy rows (``O(h d)`` memory) is not implemented.

    Args:
        stream: an iterable of ``(d,)`` vectors or ``(b, d)`` row blocks (real floating,
            finite); consumed once.
        dim: ``d``, if known in advance (checked against every item).
        lr: the constant ``c`` in ``eta_t = c / S_t``; values in ``[1, 4]`` work well.
        max_rows: stop after this many rows (so an endless stream cannot hang); ``None``
            reads the whole stream.
        dtype: working dtype (default: float32, or float64 if the first item is float64).
        generator: randomness of the starting vector.

    Returns:
        :class:`TopEigResult` ``(vector, value, n_rows)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> u = torch.nn.functional.normalize(torch.randn(20, generator=g), dim=0)
        >>> rows = (torch.randn(4000, 20, generator=g)
        ...         + 3 * torch.randn(4000, 1, generator=g) * u)  # covariance I + 9 u u^T
        >>> res = streaming_top_eigvec(iter(rows.split(50)), generator=g)
        >>> bool(abs(res.vector @ u) > 0.98)
        True
    """
    if dim is not None:
        dim = check_int(dim, "dim", _FN, low=1)
    lr = check_float(lr, "lr", _FN, low=0.0, low_open=True)
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows", _FN, low=1)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"{_FN}: argument 'dtype' must be a torch.dtype; got {dtype!r}")
        check_dtype(dtype, "dtype", _FN)
    check_generator(generator, _FN)
    try:
        iterator = iter(stream)
    except TypeError:
        raise ShapeError(
            f"{_FN}: argument 'stream' must be an iterable of tensors; got {type(stream).__name__}"
        ) from None

    v: torch.Tensor | None = None
    d = dim
    energy = 0.0  # S_t
    value_num = value_den = 0.0
    n_rows = 0
    for index, item in enumerate(iterator):
        B = _as_block(item, index, d)
        if max_rows is not None and n_rows + B.shape[0] > max_rows:
            B = B[: max_rows - n_rows]
        if v is None:
            d = B.shape[1]
            work = dtype or (torch.float64 if B.dtype == torch.float64 else torch.float32)
            v = torch.randn(d, dtype=work, generator=generator).to(B.device)
            v = v / v.norm()
        # Work with c·B, c an exact power of two bringing the block's entries to ~1, so the
        # squares below neither overflow (entries near 1e20) nor underflow (near 1e-30).
        c = float(pow2_scale(B))
        B = B.to(v.dtype) * c
        Bv = B @ v  # (b,) = c B v
        proj = float(Bv.double().square().sum()) / c**2
        b = B.shape[0]
        n_rows += b
        energy += proj
        value_num += n_rows * proj / b
        value_den += n_rows
        if energy > 0.0:
            w = v + (lr / (energy * c**2)) * (B.mT @ Bv)
            norm = float(w.norm())
            if norm > 0.0:
                v = w / norm
        if max_rows is not None and n_rows >= max_rows:
            break
    if v is None:
        raise ShapeError(f"{_FN}: argument 'stream' is empty; it must yield at least one row")
    return TopEigResult(v, value_num / value_den, n_rows)


__all__ = ["TopEigResult", "streaming_top_eigvec"]
