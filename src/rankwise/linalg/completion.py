"""Low-rank matrix completion by alternating minimisation, linear in the observed entries.

Only the observed entries ``(rows[t], cols[t], values[t])`` are ever touched: products
with the sparse observed matrix are CSR sparse-times-dense products, the per-row ``r x r``
least-squares Gram matrices are one CSR product with row-wise outer products, and all of
them are solved in one batched Cholesky, so no dense ``m x n`` matrix is formed.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch

from rankwise.errors import ShapeError
from rankwise.linalg._checks import (
    as_tensor,
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_rank,
    check_shape_pair,
    check_vector,
    pow2_scale,
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
    idx = as_tensor(idx, name, _FN)
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


class _Side(NamedTuple):
    """The observed entries sorted by one index, as a CSR pattern ``(n_out, n_in)``.

    ``out[t]``, ``inn[t]``, ``vals[t]`` are the entries in CSR order (by ``out``), so a
    sparse-times-dense product with any per-entry weights is one CSR matmul.
    """

    crow: torch.Tensor  # (n_out + 1,)
    out: torch.Tensor  # (|Omega|,)
    inn: torch.Tensor  # (|Omega|,)
    vals: torch.Tensor  # (|Omega|,)
    n_out: int
    n_in: int

    @classmethod
    def build(cls, out_idx, in_idx, vals, n_out, n_in):
        order = torch.argsort(out_idx, stable=True)
        counts = torch.bincount(out_idx, minlength=n_out)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(crow, out_idx[order], in_idx[order], vals[order], n_out, n_in)

    def matmul(self, weights: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``S @ X`` for the sparse ``S[out[t], inn[t]] = weights[t]`` (``X``: ``(n_in, c)``)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(
                self.crow, self.inn, weights, size=(self.n_out, self.n_in), check_invariants=False
            )
        return S @ X


def _init_basis(rows: _Side, cols: _Side, width, power_iter, generator):
    """Randomized range finder for the rescaled observed matrix ``P_Omega(M) / p`` (m x n).

    Returns an orthonormal ``(m, width)`` basis; the ``1/p`` scale does not change the span.
    """
    vals = rows.vals
    Omega = torch.randn(rows.n_in, width, dtype=vals.dtype, device=vals.device, generator=generator)
    Q = torch.linalg.qr(rows.matmul(rows.vals, Omega)).Q  # (m, width)
    for _ in range(power_iter):  # re-orthonormalise after every product
        Z = torch.linalg.qr(cols.matmul(cols.vals, Q)).Q  # (n, width) = S^T Q
        Q = torch.linalg.qr(rows.matmul(rows.vals, Z)).Q  # (m, width) = S Z
    return Q


def _solve_side(side: _Side, F, reg):
    """Least squares for every output row: ``x_i = argmin sum_t (vals_t - f_{in_t}^T x_i)^2``.

    The ``(n_out, r, r)`` Gram matrices ``G_i = sum_{j in Omega_i} f_j f_j^T`` are one CSR
    product of the 0/1 observation pattern with the row-wise outer products
    ``f_j (x) f_j`` (``(n_in, r^2)``, no ``|Omega| x r^2`` temporary); each is damped by
    ``reg * mean diagonal`` and all are solved in one batched Cholesky.
    Cost ``O(|Omega| r^2 + n_out r^3)``.
    """
    r = F.shape[1]
    outer = (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], r * r)  # (n_in, r^2)
    gram = side.matmul(torch.ones_like(side.vals), outer).reshape(side.n_out, r, r)
    rhs = side.matmul(side.vals, F)  # (n_out, r)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)  # (n_out,)
    floor = torch.finfo(F.dtype).tiny ** 0.5
    eye = torch.eye(r, dtype=F.dtype, device=F.device)
    damp = reg
    X = F.new_zeros(side.n_out, r)
    todo = torch.arange(side.n_out, device=F.device)
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


def _cg_side(side: _Side, F, X0, reg, steps):
    """``steps`` batched conjugate-gradient steps on every row's normal equations.

    Never forms the ``r x r`` Gram matrices: each step costs ``O(|Omega| r)``, the
    approximate-update regime of robust alternating minimisation.
    """
    f = F[side.inn]  # (|Omega|, r)
    scale = side.matmul(torch.ones_like(side.vals), F.square()).mean(-1)  # mean Gram diagonal
    lam = (reg * scale + torch.finfo(F.dtype).tiny ** 0.5)[:, None]  # (n_out, 1)

    def normal(X):  # (sum_t f f^T + lam) X, row by row
        return side.matmul((X[side.out] * f).sum(-1), F) + lam * X

    X = X0.clone()
    R = side.matmul(side.vals, F) - normal(X)
    P = R.clone()
    rs = R.square().sum(-1, keepdim=True)
    tiny = torch.finfo(F.dtype).tiny
    for _ in range(steps):
        AP = normal(P)
        alpha = rs / (P * AP).sum(-1, keepdim=True).clamp_min(tiny)
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = R.square().sum(-1, keepdim=True)
        P = R + rs_new / rs.clamp_min(tiny) * P
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
    m, n = check_shape_pair(shape, "shape", fn)
    values = check_vector(values, "values", fn)
    rows = _check_index(rows, "rows", m)
    cols = _check_index(cols, "cols", n)
    if not (rows.numel() == cols.numel() == values.numel()):
        raise ShapeError(
            f"{fn}: arguments 'rows', 'cols' and 'values' must have the same length; got "
            f"{rows.numel()}, {cols.numel()} and {values.numel()}"
        )
    rank = check_rank(rank, m, n, fn)
    max_iter = check_int(max_iter, "max_iter", fn, low=1)
    tol = check_float(tol, "tol", fn, low=0.0)
    reg = check_float(reg, "reg", fn, low=0.0)
    check_choice(solver, "solver", fn, ("cholesky", "cg"))
    cg_steps = check_int(cg_steps, "cg_steps", fn, low=1)
    init_iter = check_int(init_iter, "init_iter", fn, low=0)
    if trim is not None:
        trim = check_float(trim, "trim", fn, low=0.0, low_open=True)
    check_generator(generator, fn, values.device)

    out_dtype = values.dtype
    vals = values.to(working_dtype(out_dtype))
    # Fit c·M, c an exact power of two bringing the largest value to ~1, so the squared
    # residuals and Gram matrices neither overflow nor underflow; U is scaled back at the end.
    c = pow2_scale(vals).to(vals.dtype)
    vals = vals * c
    rows, cols = rows.to(vals.device), cols.to(vals.device)
    reg = max(reg, 4 * torch.finfo(vals.dtype).eps)

    # 1. spectral initialisation (oversampled range finder, then the top-r left vectors)
    by_row = _Side.build(rows, cols, vals, m, n)  # P_Omega(M) in CSR, (m, n)
    by_col = _Side.build(cols, rows, vals, n, m)  # its transpose, (n, m)
    width = min(rank + 10, m, n)
    Q = _init_basis(by_row, by_col, width, init_iter, generator)  # (m, width)
    B = by_col.matmul(by_col.vals, Q)  # (n, width) = S^T Q
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
            V = _solve_side(by_col, U, reg)
        else:  # warm start in the new basis: U V^T = Uq (V Ur^T)^T
            V = _cg_side(by_col, U, V @ Ur.mT, reg, cg_steps)
        Vq, Vr = torch.linalg.qr(V)
        if solver == "cholesky":
            U = _solve_side(by_row, Vq, reg)
        else:
            U = _cg_side(by_row, Vq, U @ Vr.mT, reg, cg_steps)
        V = Vq
        pred = (U[rows] * V[cols]).sum(-1)
        res = float((pred - vals).norm()) / norm_obs
        history.append(res)
        if res <= tol or (len(history) > 1 and history[-2] - res <= tol * history[-2]):
            converged = True
            break
    return CompletionResult(
        (U / c).to(out_dtype),
        V.to(out_dtype),
        torch.tensor(history, dtype=torch.float64),
        len(history),
        converged,
    )


__all__ = ["CompletionResult", "complete_altmin"]
