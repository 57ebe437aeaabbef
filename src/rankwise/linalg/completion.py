"""Low-rank matrix completion by alternating minimisation, linear in the observed entries.

Only the observed entries ``(rows[t], cols[t], values[t])`` are ever touched: products
with the sparse observed matrix are ``index_add`` scatters, the per-row ``r x r``
least-squares systems are built by scattering outer products and solved in one batched
Cholesky, so no dense ``m x n`` matrix is formed.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import (
    check_choice,
    check_dtype,
    check_float,
    check_generator,
    check_int,
    check_rank,
    working_dtype,
)

_FN = "complete_altmin"


class CompletionResult(NamedTuple):
    """Result of :func:`complete_altmin`: ``M ~ U @ V.T``.

    Attributes:
        U: ``(m, rank)`` left factor.
        V: ``(n, rank)`` right factor.
        residuals: ``(n_iter,)`` float64, relative residual on the observed entries after
            each iteration, ``||P_Omega(U V^T - M)||_F / ||P_Omega(M)||_F``.
        n_iter: number of alternating iterations run.
        converged: whether a ``tol`` criterion stopped the loop (else ``max_iter`` did).
    """

    U: torch.Tensor
    V: torch.Tensor
    residuals: torch.Tensor
    n_iter: int
    converged: bool

    def predict(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Entries ``(U V^T)[rows[t], cols[t]]`` as a 1-D tensor, without forming ``U V^T``."""
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        for name, idx, size in (("rows", rows, self.U.shape[0]), ("cols", cols, self.V.shape[0])):
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                raise ShapeError(f"predict: argument '{name}' must hold integers; got {idx.dtype}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise ShapeError(f"predict: argument '{name}' has indices outside [0, {size})")
        if rows.shape != cols.shape:
            raise ShapeError(
                f"predict: arguments 'rows' and 'cols' must have the same shape; got "
                f"{tuple(rows.shape)} and {tuple(cols.shape)}"
            )
        return (self.U[rows] * self.V[cols]).sum(-1)


def _check_index(idx: object, name: str, size: int) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        raise ShapeError(f"{_FN}: argument '{name}' must be a torch.Tensor; got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ShapeError(
            f"{_FN}: argument '{name}' must hold integer indices; got dtype {idx.dtype}"
        )
    if idx.ndim != 1 or idx.numel() == 0:
        raise ShapeError(
            f"{_FN}: argument '{name}' must be a non-empty 1-D tensor; got shape {tuple(idx.shape)}"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ShapeError(
            f"{_FN}: argument '{name}' has indices in [{lo}, {hi}]; valid range is [0, {size - 1}] "
            f"for shape dimension {size}"
        )
    return idx.long()


def _spmm(out_idx, in_idx, vals, X, n_out):
    """``S @ X`` for the sparse ``S`` with entries ``S[out_idx[t], in_idx[t]] = vals[t]``."""
    out = X.new_zeros(n_out, X.shape[1])
    return out.index_add_(0, out_idx, vals[:, None] * X[in_idx])


def _init_basis(rows, cols, vals, m, n, width, power_iter, generator):
    """Randomized range finder for the rescaled observed matrix ``P_Omega(M) / p`` (m x n).

    Returns an orthonormal ``(m, width)`` basis; the ``1/p`` scale does not change the span.
    """
    Omega = torch.randn(n, width, dtype=vals.dtype, device=vals.device, generator=generator)
    Q = torch.linalg.qr(_spmm(rows, cols, vals, Omega, m)).Q  # (m, width)
    for _ in range(power_iter):  # re-orthonormalise after every product
        Z = torch.linalg.qr(_spmm(cols, rows, vals, Q, n)).Q  # (n, width) = S^T Q
        Q = torch.linalg.qr(_spmm(rows, cols, vals, Z, m)).Q  # (m, width) = S Z
    return Q


def _solve_side(out_idx, in_idx, vals, F, n_out, reg, chunk):
    """Least squares for every output row: ``x_i = argmin sum_t (vals_t - f_{in_t}^T x_i)^2``.

    Builds the ``(n_out, r, r)`` Gram matrices ``sum_t f f^T`` by scattering outer products
    in chunks, damps each by ``reg * mean diagonal``, and solves them with one batched
    Cholesky. Cost ``O(|Omega| r^2 + n_out r^3)``.
    """
    r = F.shape[1]
    gram = F.new_zeros(n_out, r, r)
    rhs = F.new_zeros(n_out, r)
    for s in range(0, out_idx.numel(), chunk):
        o, f = out_idx[s : s + chunk], F[in_idx[s : s + chunk]]  # f: (c, r)
        gram.index_add_(0, o, f[:, :, None] * f[:, None, :])
        rhs.index_add_(0, o, vals[s : s + chunk, None] * f)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)  # (n_out,)
    floor = torch.finfo(F.dtype).tiny ** 0.5
    eye = torch.eye(r, dtype=F.dtype, device=F.device)
    damp = reg
    X = F.new_zeros(n_out, r)
    todo = torch.arange(n_out, device=F.device)
    for _ in range(8):  # rows whose Gram is too singular get 1000x more damping
        A = gram[todo] + (damp * scale[todo] + floor)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(A)
        ok = info == 0
        X[todo[ok]] = torch.cholesky_solve(rhs[todo[ok], :, None], chol[ok])[..., 0]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        damp *= 1e3
    return X


def _cg_side(out_idx, in_idx, vals, F, X0, n_out, reg, steps):
    """``steps`` batched conjugate-gradient steps on every row's normal equations.

    Never forms the ``r x r`` Gram matrices: each step costs ``O(|Omega| r)``, the
    approximate-update regime of robust alternating minimisation.
    """
    f = F[in_idx]  # (|Omega|, r)
    scale = _spmm(out_idx, in_idx, torch.ones_like(vals), F.square(), n_out).mean(-1)
    lam = (reg * scale + torch.finfo(F.dtype).tiny ** 0.5)[:, None]  # (n_out, 1)

    def normal(X):  # (sum_t f f^T + lam) X, row by row
        pred = (X[out_idx] * f).sum(-1)
        return F.new_zeros(n_out, F.shape[1]).index_add_(0, out_idx, pred[:, None] * f) + lam * X

    b = F.new_zeros(n_out, F.shape[1]).index_add_(0, out_idx, vals[:, None] * f)
    X = X0.clone()
    R = b - normal(X)
    P = R.clone()
    rs = R.square().sum(-1, keepdim=True)
    for _ in range(steps):
        AP = normal(P)
        alpha = rs / (P * AP).sum(-1, keepdim=True).clamp_min(torch.finfo(F.dtype).tiny)
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = R.square().sum(-1, keepdim=True)
        P = R + rs_new / rs.clamp_min(torch.finfo(F.dtype).tiny) * P
        rs = rs_new
    return X


def _clip_rows(Q, cap):
    norms = Q.norm(dim=1, keepdim=True)
    return Q * (cap / norms.clamp_min(cap))


def complete_altmin(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    rank: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    reg: float = 1e-10,
    solver: Literal["cholesky", "cg"] = "cholesky",
    cg_steps: int = 3,
    init_iter: int = 2,
    trim: float | None = None,
    chunk_size: int = 1 << 16,
    generator: torch.Generator | None = None,
) -> CompletionResult:
    """Complete a low-rank matrix from observed entries by alternating least squares.

    Given ``M[rows[t], cols[t]] = values[t]`` for ``t`` in ``Omega``, find ``U`` (``m x r``)
    and ``V`` (``n x r``) minimising ``sum_{(i,j) in Omega} (M_ij - u_i^T v_j)^2``:

    1. Initialise ``U`` from a randomized SVD of the rescaled observed matrix
       ``P_Omega(M) / p`` (``p = |Omega| / (m n)``), using sparse-times-dense scatter
       products (``init_iter`` power iterations, QR after every product); optionally
       clip the rows of ``U`` to norm ``2 trim sqrt(r / m)`` (incoherence trimming, with
       ``trim`` the incoherence ``mu``) and re-orthonormalise.
    2. Alternate: orthonormalise ``U`` and solve every row of ``V`` by least squares, then
       orthonormalise ``V`` and solve ``U``. ``solver="cholesky"`` solves the per-row
       ``r x r`` normal equations exactly (``O(|Omega| r^2)`` per iteration);
       ``solver="cg"`` takes ``cg_steps`` warm-started conjugate-gradient steps
       (``O(|Omega| r)`` per step), the approximate updates that robust alternating
       minimisation tolerates.
    3. Stop when the relative observed residual is ``<= tol`` or improves by less than a
       factor ``tol``, or after ``max_iter`` iterations.

    ("Low Rank Matrix Completion via Robust Alternating Minimization in Nearly Linear
    Time", Gu, Song, Yin, Zhang, 2023; initialisation and trimming as in Jain, Netrapalli,
    Sanghavi, 2013.) Duplicate ``(row, col)`` pairs act as repeated measurements.

    Args:
        rows, cols: ``(|Omega|,)`` integer indices of the observed entries.
        values: ``(|Omega|,)`` real floating, finite observed values (float16/bfloat16 are
            computed in float32; factors come back in ``values.dtype``).
        shape: ``(m, n)`` of the full matrix.
        rank: ``r``, ``1 <= r <= min(m, n)``.
        max_iter: maximum alternating iterations (each updates ``V`` then ``U``).
        tol: stopping tolerance (see step 3).
        reg: ridge damping relative to each row's mean Gram diagonal; rows with fewer than
            ``r`` observations get more damping automatically, rows with none get zeros.
        solver: ``"cholesky"`` (exact per-row solves) or ``"cg"`` (approximate).
        cg_steps: conjugate-gradient steps per update when ``solver="cg"``.
        init_iter: power iterations in the randomized initialisation.
        trim: incoherence bound ``mu`` for clipping the initial factor, or ``None``.
        chunk_size: observed entries processed at once when building Gram matrices
            (bounds the ``chunk_size x r x r`` temporary).
        generator: randomness of the initialisation; the same seed gives the same result.

    Returns:
        :class:`CompletionResult` ``(U, V, residuals, n_iter, converged)``; use
        ``result.predict(rows, cols)`` for entries of ``U V^T``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> M = torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.randn(
        ...     3, 50, generator=g, dtype=torch.float64)
        >>> mask = torch.rand(60, 50, generator=g) < 0.4
        >>> r, c = mask.nonzero(as_tuple=True)
        >>> res = complete_altmin(r, c, M[r, c], (60, 50), 3, generator=g)
        >>> bool((res.U @ res.V.T - M).norm() / M.norm() < 1e-4)
        True
    """
    fn = _FN
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ConfigError(
            f"{fn}: argument 'shape' must be a pair of positive integers (m, n); got {shape!r}"
        )
    m, n = int(shape[0]), int(shape[1])
    if not isinstance(values, torch.Tensor):
        raise ShapeError(f"{fn}: argument 'values' must be a torch.Tensor; got {type(values).__name__}")
    check_dtype(values.dtype, "values", fn)
    if values.ndim != 1 or values.numel() == 0:
        raise ShapeError(
            f"{fn}: argument 'values' must be a non-empty 1-D tensor; got shape {tuple(values.shape)}"
        )
    rows = _check_index(rows, "rows", m)
    cols = _check_index(cols, "cols", n)
    if not (rows.numel() == cols.numel() == values.numel()):
        raise ShapeError(
            f"{fn}: arguments 'rows', 'cols' and 'values' must have the same length; got "
            f"{rows.numel()}, {cols.numel()} and {values.numel()}"
        )
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ShapeError(f"{fn}: argument 'values' contains {bad} NaN/Inf value(s)")
    rank = check_rank(rank, m, n, fn)
    max_iter = check_int(max_iter, "max_iter", fn, low=1)
    tol = check_float(tol, "tol", fn, low=0.0)
    reg = check_float(reg, "reg", fn, low=0.0)
    check_choice(solver, "solver", fn, ("cholesky", "cg"))
    cg_steps = check_int(cg_steps, "cg_steps", fn, low=1)
    init_iter = check_int(init_iter, "init_iter", fn, low=0)
    if trim is not None:
        trim = check_float(trim, "trim", fn, low=0.0, low_open=True)
    chunk_size = check_int(chunk_size, "chunk_size", fn, low=1)
    check_generator(generator, fn, values.device)

    out_dtype = values.dtype
    vals = values.to(working_dtype(out_dtype))
    rows, cols = rows.to(vals.device), cols.to(vals.device)
    reg = max(reg, 4 * torch.finfo(vals.dtype).eps)

    # 1. spectral initialisation (oversampled range finder, then the top-r left vectors)
    width = min(rank + 10, m, n)
    Q = _init_basis(rows, cols, vals, m, n, width, init_iter, generator)  # (m, width)
    B = _spmm(cols, rows, vals, Q, n)  # (n, width) = S^T Q
    Ub = torch.linalg.svd(B.mT, full_matrices=False).U  # (width, width)
    U = Q @ Ub[:, :rank]  # (m, r)
    if trim is not None:
        U = torch.linalg.qr(_clip_rows(U, 2.0 * trim * math.sqrt(rank / m))).Q
    V = vals.new_zeros(n, rank)

    norm_obs = float(vals.norm()) or 1.0
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        U, Ur = torch.linalg.qr(U)
        if solver == "cholesky":
            V = _solve_side(cols, rows, vals, U, n, reg, chunk_size)
        else:  # warm start in the new basis: U V^T = Uq (V Ur^T)^T
            V = _cg_side(cols, rows, vals, U, V @ Ur.mT, n, reg, cg_steps)
        Vq, Vr = torch.linalg.qr(V)
        if solver == "cholesky":
            U = _solve_side(rows, cols, vals, Vq, m, reg, chunk_size)
        else:
            U = _cg_side(rows, cols, vals, Vq, U @ Vr.mT, m, reg, cg_steps)
        V = Vq
        pred = (U[rows] * V[cols]).sum(-1)
        res = float((pred - vals).norm()) / norm_obs
        history.append(res)
        if res <= tol or (len(history) > 1 and history[-2] - res <= tol * history[-2]):
            converged = True
            break
    return CompletionResult(
        U.to(out_dtype),
        V.to(out_dtype),
        torch.tensor(history, dtype=torch.float64),
        len(history),
        converged,
    )


__all__ = ["CompletionResult", "complete_altmin"]
