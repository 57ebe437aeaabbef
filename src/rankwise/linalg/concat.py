"""Shared-basis SVD of many matrices, its incremental update, and error-bounded clustering.

Matrices ``M_1, ..., M_g`` with the same number of rows ``d`` are compressed together by a
truncated SVD of their horizontal concatenation ``A = [M_1 | ... | M_g]``: one shared left
basis ``U`` (``d x r``) and small per-matrix coefficients ``C_i = U^T M_i`` (``r x n_i``),
``M_i ~ U C_i`` ("Concatenated Matrix SVD: Compression Bounds, Incremental Approximation,
and Error-Constrained Clustering", 2025). Which matrices may share a basis is decided by
clustering that merges them only while the group's rank-``r`` error stays under a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import as_float, check_choice, check_float, check_int, check_matrix


class ConcatSVD(NamedTuple):
    """A shared-basis factorisation ``M_i ~ U @ coeffs[i]``.

    Attributes:
        U: ``(d, r)`` orthonormal shared left basis.
        S: ``(r,)`` singular values of the (approximated) concatenation, descending.
        coeffs: tuple of ``(r, n_i)`` coefficient blocks, one per matrix, in input order.
        residual: ``||A - U [C_1 | ... | C_g]||_F`` as a float: exact after
            :func:`concat_svd`, an upper bound after :func:`concat_svd_update`.
        norm: ``||A||_F`` (exact).
    """

    U: torch.Tensor
    S: torch.Tensor
    coeffs: tuple[torch.Tensor, ...]
    residual: float
    norm: float

    @property
    def rel_error(self) -> float:
        """``residual / norm``, the relative Frobenius error of the whole concatenation."""
        return self.residual / self.norm if self.norm > 0 else 0.0

    def reconstruct(self, i: int) -> torch.Tensor:
        """The ``(d, n_i)`` approximation ``U @ coeffs[i]`` of matrix ``i``."""
        return self.U @ self.coeffs[i]


class ConcatClusters(NamedTuple):
    """Result of :func:`cluster_concat`.

    Attributes:
        groups: lists of input indices; every input is in exactly one group.
        errors: ``(n_groups,)`` float64 exact relative error of each group's rank-``r``
            shared-basis reconstruction.
        factors: one :class:`ConcatSVD` per group (coefficients in the group's order).
    """

    groups: list[list[int]]
    errors: torch.Tensor
    factors: list[ConcatSVD]


def _check_mats(mats: object, fn: str, *, d: int | None = None) -> list[torch.Tensor]:
    if isinstance(mats, torch.Tensor) or not isinstance(mats, Sequence) or len(mats) == 0:
        raise ShapeError(
            f"{fn}: argument 'mats' must be a non-empty list of (d, n_i) tensors; "
            f"got {type(mats).__name__}"
        )
    out = []
    for i, M in enumerate(mats):
        M = check_matrix(M, f"mats[{i}]", fn, batched=False)
        if d is None:
            d = M.shape[0]
        if M.shape[0] != d:
            raise ShapeError(
                f"{fn}: argument 'mats[{i}]' has {M.shape[0]} rows; all matrices must have the "
                f"same row dimension d = {d}"
            )
        out.append(M)
    return out


def _fro(A: torch.Tensor) -> float:
    """Frobenius norm in float64 (float32 squares overflow for entries near 1e20)."""
    return float(torch.linalg.vector_norm(A, dtype=torch.float64))


def _svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors and values of ``A`` (dense, exact)."""
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank], S[:rank]


def concat_svd(mats: Sequence[torch.Tensor], rank: int) -> ConcatSVD:
    """Rank-``r`` shared left basis of ``A = [M_1 | ... | M_g]`` and per-matrix coefficients.

    ``U`` holds the top ``r`` left singular vectors of ``A`` (a dense SVD of the ``d x N``
    concatenation, ``N = sum n_i``) and ``C_i = U^T M_i``; then
    ``sum_i ||M_i - U C_i||_F^2 = sum_{j > r} sigma_j(A)^2``, the optimal rank-``r`` error
    (Eckart-Young). Storage falls from ``d N`` to ``r (d + N)``.

    Args:
        mats: ``g >= 1`` real floating, finite ``(d, n_i)`` matrices (same ``d``).
        rank: ``r``, ``1 <= r <= min(d, N)``.

    Returns:
        :class:`ConcatSVD` ``(U, S, coeffs, residual, norm)`` in the dtype of the inputs
        (float16/bfloat16 computed in float32).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(30, 4, generator=g)
        >>> mats = [basis @ torch.randn(4, n, generator=g) for n in (5, 7, 9)]
        >>> res = concat_svd(mats, 4)
        >>> res.rel_error < 1e-5 and torch.allclose(res.reconstruct(1), mats[1], atol=1e-4)
        True
    """
    fn = "concat_svd"
    mats = _check_mats(mats, fn)
    d, N = mats[0].shape[0], sum(M.shape[1] for M in mats)
    rank = check_int(
        rank, "rank", fn, low=1, high=min(d, N), what=f"[1, min(d, N)] = [1, {min(d, N)}]"
    )
    A, out_dtype = as_float(torch.cat(mats, dim=1))  # (d, N)
    U, S = _svd(A, rank)
    C = U.mT @ A  # (r, N)
    residual = _fro(A - U @ C)
    coeffs = tuple(c.to(out_dtype) for c in C.split([M.shape[1] for M in mats], dim=1))
    return ConcatSVD(U.to(out_dtype), S.to(out_dtype), coeffs, residual, _fro(A))


def concat_svd_update(result: ConcatSVD, mats: Sequence[torch.Tensor]) -> ConcatSVD:
    """Add matrices to a shared basis without revisiting the old ones (incremental SVD).

    The old concatenation is represented by its rank-``r`` sketch ``U diag(S)``; the new
    basis ``U'`` is the top-``r`` left singular vectors of ``K = [U diag(S) | B]``
    (``d x (r + n_B)``, ``B`` the new matrices), the old coefficients are rotated,
    ``C_i' = (U'^T U) C_i``, and the new ones are ``U'^T M_j``. This keeps the invariant
    ``sum_i C_i C_i^T = diag(S^2)``. The returned ``residual`` is a rigorous upper bound on
    the true error of the new reconstruction (Minkowski inequality)::

        residual' <= sqrt((residual + ||(I - U'U'^T) U S||)^2 + ||(I - U'U'^T) B||^2)

    (the incremental truncated-SVD estimator of Concatenated Matrix SVD, 2025, Sec. 4).

    Args:
        result: a :class:`ConcatSVD` from :func:`concat_svd` or a previous update.
        mats: new ``(d, n_j)`` matrices.

    Returns:
        :class:`ConcatSVD` with the same rank and ``len(result.coeffs) + len(mats)`` blocks.
    """
    fn = "concat_svd_update"
    if not isinstance(result, ConcatSVD):
        raise ConfigError(
            f"{fn}: argument 'result' must be a ConcatSVD from concat_svd; "
            f"got {type(result).__name__}"
        )
    U0, out_dtype = as_float(result.U)
    d, rank = U0.shape
    mats = _check_mats(mats, fn, d=d)
    B = torch.cat([M.to(U0) for M in mats], dim=1)  # (d, n_B)
    S0 = result.S.to(U0)
    K = torch.cat([U0 * S0, B], dim=1)  # (d, r + n_B)
    U, S = _svd(K, rank)
    rot = U.mT @ U0  # (r, r)
    old = tuple((rot @ c.to(U0)).to(out_dtype) for c in result.coeffs)
    CB = U.mT @ B  # (r, n_B)
    new = tuple(c.to(out_dtype) for c in CB.split([M.shape[1] for M in mats], dim=1))
    lost_old = math.sqrt(max(_fro(S0) ** 2 - _fro(rot * S0) ** 2, 0.0))
    lost_new = math.sqrt(max(_fro(B) ** 2 - _fro(CB) ** 2, 0.0))
    residual = math.hypot(result.residual + lost_old, lost_new)
    norm = math.hypot(result.norm, _fro(B))
    return ConcatSVD(U.to(out_dtype), S.to(out_dtype), old + new, residual, norm)


def _tail_energy(gram: torch.Tensor, rank: int) -> float:
    """``sum_{j > r} lambda_j`` of a PSD Gram matrix: the squared rank-``r`` SVD error."""
    ev = torch.linalg.eigvalsh(gram)  # ascending
    return max(float(ev.sum() - ev[-rank:].sum()), 0.0)


def cluster_concat(
    mats: Sequence[torch.Tensor],
    rank: int,
    *,
    max_error: float,
    estimator: Literal["exact", "incremental"] = "exact",
) -> ConcatClusters:
    """Group matrices so each group's shared rank-``r`` basis meets a relative error bound.

    Greedy error-constrained clustering (Concatenated Matrix SVD, 2025, Sec. 5): visit the
    matrices by decreasing Frobenius norm; put each into the existing group whose merged
    relative rank-``r`` error ``||A_g - U_g U_g^T A_g||_F / ||A_g||_F`` is smallest and at
    most ``max_error``, or open a new group. The merged error is predicted by

    * ``estimator="exact"``: ``sum_{j>r} lambda_j(G_g + M M^T)`` from the ``d x d`` Gram
      matrices (additive over merges, float64, ``O(d^3)`` per check);
    * ``estimator="incremental"``: the upper bound of :func:`concat_svd_update`
      (``O(d r (r + n))`` per check, never under-estimates, so it may open more groups).

    Either way every group with two or more members satisfies the bound; a single matrix
    whose own rank-``r`` error exceeds ``max_error`` forms a group by itself (reported in
    ``errors``). Final factors are computed exactly by :func:`concat_svd` per group.

    Args:
        mats: real floating, finite ``(d, n_i)`` matrices with the same ``d``.
        rank: ``r`` of every group's basis, ``1 <= r <= d``.
        max_error: relative Frobenius error bound, ``>= 0``.
        estimator: ``"exact"`` or ``"incremental"`` (see above).

    Returns:
        :class:`ConcatClusters` ``(groups, errors, factors)``.
    """
    fn = "cluster_concat"
    mats = _check_mats(mats, fn)
    d = mats[0].shape[0]
    rank = check_int(rank, "rank", fn, low=1, high=d, what=f"[1, d] = [1, {d}]")
    max_error = check_float(max_error, "max_error", fn, low=0.0)
    check_choice(estimator, "estimator", fn, ("exact", "incremental"))

    work = [M.double() for M in mats]
    sq = [float(M.square().sum()) for M in work]
    order = sorted(range(len(work)), key=lambda i: -sq[i])
    groups: list[list[int]] = []
    state: list[object] = []  # per group: Gram (exact) or ConcatSVD sketch (incremental)
    energy: list[float] = []
    for i in order:
        M = work[i]
        best, best_err, best_state = -1, math.inf, None
        for g, st in enumerate(state):
            total = energy[g] + sq[i]
            if total == 0.0:
                err, new_state = 0.0, st
            elif estimator == "exact":
                new_state = st + M @ M.mT
                err = math.sqrt(_tail_energy(new_state, rank) / total)
            else:
                new_state = concat_svd_update(st, [M])
                err = new_state.residual / math.sqrt(total)
            if err <= max_error and err < best_err:
                best, best_err, best_state = g, err, new_state
        if best >= 0:
            groups[best].append(i)
            state[best] = best_state
            energy[best] += sq[i]
        else:
            groups.append([i])
            energy.append(sq[i])
            if estimator == "exact":
                state.append(M @ M.mT)
            else:
                state.append(concat_svd(_pad_rank(M, rank), rank))
    factors, errors = [], []
    for grp in groups:
        members = [mats[i] for i in grp]
        n_cols = sum(M.shape[1] for M in members)
        if n_cols >= rank:
            f = concat_svd(members, rank)
        else:  # fewer columns than r: the basis spans them exactly
            f = concat_svd(members, n_cols)
        factors.append(f)
        errors.append(f.rel_error)
    return ConcatClusters(groups, torch.tensor(errors, dtype=torch.float64), factors)


def _pad_rank(M: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """``[M]`` padded with zero columns up to ``rank`` (so a rank-``r`` sketch exists)."""
    if M.shape[1] >= rank:
        return [M]
    return [M, M.new_zeros(M.shape[0], rank - M.shape[1])]


__all__ = [
    "ConcatClusters",
    "ConcatSVD",
    "cluster_concat",
    "concat_svd",
    "concat_svd_update",
]
