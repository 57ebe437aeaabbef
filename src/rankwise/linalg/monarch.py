"""Monarch matrices: projection of a dense matrix and the fast product.

A Monarch matrix ("Monarch: Expressive Structured Matrices for Efficient and Accurate
Training", Dao et al., 2022) is ``M = P^T L P R``: a block-diagonal ``R`` (``k`` blocks of
``b_out x b_in``), a fixed transpose permutation ``P``, a block-diagonal ``L`` (``b_out``
blocks of ``k x k``) and the permutation back. With ``n_in = k * b_in`` and
``n_out = k * b_out``, indexing rows as ``(l, j)`` and columns as ``(i, s)``
(``l, i < k``, ``j < b_out``, ``s < b_in``)::

    M[(l, j), (i, s)] = L[j, l, i] * R[i, j, s]

so for every pair ``(j, i)`` the ``k x b_in`` slice ``M[(:, j), (i, :)]`` is the rank-1
outer product ``L[j, :, i] R[i, j, :]``, and each pair owns its own parameters. The
closest Monarch matrix in Frobenius norm therefore takes the best rank-1 approximation
of every slice (the paper's Theorem 1), which is one batched SVD.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rankwise.errors import ShapeError
from rankwise.linalg._checks import as_float, as_tensor, check_int, check_matrix


class MonarchFactors(NamedTuple):
    """Result of :func:`monarch_project`.

    Attributes:
        L: ``(..., b_out, k, k)``, block ``j`` acts on the permuted groups.
        R: ``(..., k, b_out, b_in)``, block ``i`` acts on input chunk ``i``.
    """

    L: torch.Tensor
    R: torch.Tensor


def _check_factors(
    L: torch.Tensor, R: torch.Tensor, fn: str
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Validate Monarch factors; return ``(L, R, k, b_out, b_in)`` (as tensors)."""
    L = check_matrix(L, "L", fn)
    R = check_matrix(R, "R", fn)
    if L.ndim < 3 or R.ndim < 3 or L.shape[-1] != L.shape[-2]:
        raise ShapeError(
            f"{fn}: arguments 'L' and 'R' must have shapes (..., b_out, k, k) and "
            f"(..., k, b_out, b_in); got {tuple(L.shape)} and {tuple(R.shape)}"
        )
    b_out, k = L.shape[-3], L.shape[-1]
    if R.shape[-3] != k or R.shape[-2] != b_out or L.shape[:-3] != R.shape[:-3]:
        raise ShapeError(
            f"{fn}: argument 'R' must have shape (..., k, b_out, b_in) = "
            f"{(*L.shape[:-3], k, b_out, 'b_in')} to match L {tuple(L.shape)}; "
            f"got {tuple(R.shape)}"
        )
    return L, R, k, b_out, R.shape[-1]


def monarch_project(W: torch.Tensor, nblocks: int) -> MonarchFactors:
    """Project ``W`` onto the closest Monarch matrix with ``nblocks`` blocks (Frobenius norm).

    ``W`` of shape ``(..., n_out, n_in)`` with ``nblocks`` dividing both sizes is reshaped
    into ``(b_out * k)`` slices of size ``k x b_in``; each slice is replaced by its top
    singular triple ``sigma u v^T``, split as ``L[j, :, i] = sqrt(sigma) u`` and
    ``R[i, j, :] = sqrt(sigma) v`` (Monarch, 2022, Theorem 1 / Algorithm 1). A Monarch
    matrix is returned unchanged (up to rounding). Low precision inputs are computed in
    float32 and cast back.

    Args:
        W: ``(..., n_out, n_in)`` real floating, finite.
        nblocks: ``k``, the number of blocks; must divide ``n_out`` and ``n_in``.

    Returns:
        :class:`MonarchFactors` ``(L, R)`` with ``L`` ``(..., b_out, k, k)`` and ``R``
        ``(..., k, b_out, b_in)``; ``monarch_matmul(x, L, R) == x @ M.mT`` for the projection
        ``M``, and ``monarch_dense(L, R)`` forms ``M``.

    Example:
        >>> W = torch.randn(8, 12, dtype=torch.float64)
        >>> L, R = monarch_project(W, 2)
        >>> L2, R2 = monarch_project(monarch_dense(L, R), 2)
        >>> torch.allclose(monarch_dense(L2, R2), monarch_dense(L, R))
        True
    """
    fn = "monarch_project"
    W = check_matrix(W, "W", fn)
    n_out, n_in = W.shape[-2], W.shape[-1]
    k = check_int(nblocks, "nblocks", fn, low=1, high=min(n_out, n_in))
    if n_out % k or n_in % k:
        raise ShapeError(
            f"{fn}: argument 'nblocks' = {k} must divide both sizes of W "
            f"(n_out={n_out}, n_in={n_in}); valid choices are common divisors of both"
        )
    b_out, b_in = n_out // k, n_in // k
    Ww, out_dtype = as_float(W)
    batch = W.shape[:-2]
    # (..., n_out, n_in) -> (..., k[l], b_out[j], k[i], b_in[s]) -> (..., j, i, l, s)
    nb = len(batch)
    blocks = Ww.reshape(*batch, k, b_out, k, b_in)
    blocks = blocks.permute(*range(nb), nb + 1, nb + 2, nb, nb + 3)
    # blocks: (..., b_out[j], k[i], k[l], b_in[s]) = slices [j, i] of shape (k, b_in)
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    root = S[..., :1].sqrt()  # (..., b_out, k, 1)
    a = U[..., :, 0] * root  # (..., b_out[j], k[i], k[l])
    c = Vh[..., 0, :] * root  # (..., b_out[j], k[i], b_in[s])
    L = a.mT  # (..., j, l, i)
    R = c.movedim(-2, -3)  # (..., i, j, s)
    return MonarchFactors(L.to(out_dtype).contiguous(), R.to(out_dtype).contiguous())


def monarch_matmul(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Apply the Monarch matrix ``M(L, R)`` to the rows of ``x``: ``x @ M.T``, fast.

    Two batched block-diagonal products and a permutation, ``O(N (b_in + k) b_out)``
    instead of ``O(N n_in n_out)`` for ``N`` rows (Monarch, 2022, Sec. 3)::

        y[..., i, j] = sum_s R[i, j, s] x[..., i, s]      # block-diagonal R
        z[..., l, j] = sum_i L[j, l, i] y[..., i, j]      # permute, block-diagonal L

    Args:
        x: ``(..., n_in)`` with ``n_in = k * b_in``.
        L: ``(b_out, k, k)`` and ``R``: ``(k, b_out, b_in)`` as from :func:`monarch_project`
            (unbatched factors).

    Returns:
        ``(..., n_out)`` with ``n_out = k * b_out``.
    """
    fn = "monarch_matmul"
    x = as_tensor(x, "x", fn)
    if x.ndim < 1 or x.numel() == 0:
        raise ShapeError(
            f"{fn}: argument 'x' must be a non-empty tensor of shape (..., n_in); "
            f"got shape {tuple(x.shape)}"
        )
    L, R, k, b_out, b_in = _check_factors(L, R, fn)
    if L.ndim != 3:
        raise ShapeError(
            f"{fn}: arguments 'L' and 'R' must be unbatched (3-D); got L {tuple(L.shape)}"
        )
    if x.shape[-1] != k * b_in:
        raise ShapeError(
            f"{fn}: argument 'x' must have last dimension n_in = k * b_in = {k * b_in}; "
            f"got shape {tuple(x.shape)}"
        )
    check_matrix(x.reshape(-1, x.shape[-1]), "x", fn)
    batch = x.shape[:-1]
    xs = x.reshape(-1, k, b_in).transpose(0, 1)  # (k, N, b_in)
    y = torch.bmm(xs, R.transpose(-1, -2))  # (k[i], N, b_out[j])
    y = y.permute(2, 1, 0)  # (b_out[j], N, k[i]): the permutation P
    z = torch.bmm(y, L.transpose(-1, -2))  # (b_out[j], N, k[l])
    return z.permute(1, 2, 0).reshape(*batch, k * b_out)  # (N, l, j) -> (..., n_out)


def monarch_dense(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Form the dense ``(..., n_out, n_in)`` Monarch matrix ``M[(l, j), (i, s)] = L[j,l,i] R[i,j,s]``."""
    fn = "monarch_dense"
    L, R, k, b_out, b_in = _check_factors(L, R, fn)
    M = torch.einsum("...jli,...ijs->...ljis", L, R)  # (..., k[l], b_out[j], k[i], b_in[s])
    return M.reshape(*L.shape[:-3], k * b_out, k * b_in)


__all__ = ["MonarchFactors", "monarch_dense", "monarch_matmul", "monarch_project"]
