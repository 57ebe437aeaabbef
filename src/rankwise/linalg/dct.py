"""DCT-II bases and gradient-aligned column selection for SVD-free low-rank projection.

The orthonormal DCT-II basis is a fixed orthogonal matrix, so an optimizer can build it
once and, per layer, keep only the indices of the columns that best align with the
gradient, instead of an SVD and a stored projection matrix ("SVD-Free Low-Rank Adaptive
Gradient Optimization for Large Language Models", 2025).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from rankwise.errors import ShapeError
from rankwise.linalg._checks import (
    check_choice,
    check_dtype,
    check_int,
    check_matrix,
    check_rank,
    pow2_scale,
    working_dtype,
)


class DCTSelection(NamedTuple):
    """Result of :func:`dct_select`.

    Attributes:
        indices: ``(..., rank)`` int64, the chosen DCT frequencies, highest energy first.
        P: ``(..., d, rank)`` the chosen basis columns (orthonormal), ``d`` the projected
            side of ``G``: project with ``P.mT @ G`` (left) or ``G @ P`` (right).
        side: ``"left"`` or ``"right"``, the side of ``G`` that ``P`` acts on.
    """

    indices: torch.Tensor
    P: torch.Tensor
    side: str


def dct_basis(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal DCT-II basis as an ``(n, n)`` matrix whose columns are the basis vectors.

    ``D[j, k] = s_k cos(pi k (2j + 1) / (2n))`` with ``s_0 = sqrt(1/n)``, ``s_k = sqrt(2/n)``,
    so ``D.T @ D = I`` and ``D.T @ x`` equals ``scipy.fft.dct(x, norm="ortho")``. Computed in
    float64 and cast to ``dtype``.

    Example:
        >>> D = dct_basis(8, dtype=torch.float64)
        >>> torch.allclose(D.T @ D, torch.eye(8, dtype=torch.float64))
        True
    """
    n = check_int(n, "n", "dct_basis", low=1)
    if not isinstance(dtype, torch.dtype):
        raise ShapeError(f"dct_basis: argument 'dtype' must be a torch.dtype; got {dtype!r}")
    check_dtype(dtype, "dtype", "dct_basis")
    j = torch.arange(n, dtype=torch.float64, device=device)
    k = torch.arange(n, dtype=torch.float64, device=device)
    D = torch.cos(math.pi * (2.0 * j[:, None] + 1.0) * k[None, :] / (2.0 * n))  # (n, n) [j, k]
    D *= math.sqrt(2.0 / n)
    D[:, 0] = math.sqrt(1.0 / n)
    return D.to(dtype)


def dct_select(
    G: torch.Tensor,
    rank: int,
    *,
    side: Literal["auto", "left", "right"] = "auto",
    basis: torch.Tensor | None = None,
) -> DCTSelection:
    """Pick the ``rank`` DCT-II basis columns that capture the most energy of ``G``.

    For ``side="left"`` with ``G`` of shape ``(..., m, n)`` and ``D = dct_basis(m)``, the
    score of frequency ``k`` is ``||(D.T G)[k, :]||^2``, the energy of ``G`` along column
    ``k`` of ``D``; the top-``rank`` columns ``P = D[:, idx]`` give the projection
    ``P.T @ G`` (``(rank, n)``). ``side="right"`` does the same for ``G @ D`` with
    ``D = dct_basis(n)``. Because ``D`` is orthonormal, the kept energy
    ``||P.T G||_F^2`` is the largest any ``rank`` columns of ``D`` can capture; it is at most
    the SVD's (``sum_{i<=rank} sigma_i^2``). One matrix product and a top-k, no SVD
    ("SVD-Free Low-Rank Adaptive Gradient Optimization for LLMs", 2025, Sec. 3).

    Args:
        G: ``(..., m, n)`` real floating matrix (a gradient), batched over leading dims.
        rank: number of columns to keep, ``1 <= rank <= min(m, n)``.
        side: ``"left"`` (project rows, ``D`` is ``m x m``), ``"right"`` (columns, ``n x n``),
            or ``"auto"``: the smaller of ``m`` and ``n`` (left on ties), as GaLore does.
        basis: a precomputed ``dct_basis(d)`` for the chosen side (built once and reused by
            an optimizer); built on the fly if ``None``.

    Returns:
        :class:`DCTSelection` ``(indices, P, side)``.
    """
    fn = "dct_select"
    G = check_matrix(G, "G", fn)
    m, n = G.shape[-2], G.shape[-1]
    rank = check_rank(rank, m, n, fn)
    check_choice(side, "side", fn, ("auto", "left", "right"))
    if side == "auto":
        side = "left" if m <= n else "right"
    d = m if side == "left" else n
    work = working_dtype(G.dtype)
    if basis is None:
        D = dct_basis(d, dtype=work, device=G.device)
    else:
        basis = check_matrix(basis, "basis", fn, batched=False)
        if tuple(basis.shape) != (d, d):
            raise ShapeError(
                f"{fn}: argument 'basis' must be the ({d}, {d}) DCT basis for side={side!r} "
                f"of G with shape {tuple(G.shape)}; got shape {tuple(basis.shape)}"
            )
        D = basis.to(device=G.device, dtype=work)
    Gw = G.to(work)
    proj = D.mT @ Gw if side == "left" else (Gw @ D).mT  # (..., d, other side)
    # Energy per frequency, in units where the largest coefficient is ~1 (an exact power of
    # two), so the squares neither overflow (entries near 1e20) nor underflow (near 1e-30).
    proj = proj * pow2_scale(proj, (-2, -1), keepdim=True).to(proj.dtype)
    scores = proj.square().sum(-1)  # (..., d)
    indices = torch.topk(scores, rank, dim=-1).indices  # (..., rank), highest first
    P = D[:, indices].movedim(0, -2) if indices.ndim > 1 else D[:, indices]  # (..., d, rank)
    return DCTSelection(indices, P.to(G.dtype), side)


__all__ = ["DCTSelection", "dct_basis", "dct_select"]
