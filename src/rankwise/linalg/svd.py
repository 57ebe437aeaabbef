"""Singular value decompositions: randomized (block Krylov), exact truncated, incremental.

All functions take matrices of shape ``(..., M, N)`` (batched over leading dimensions) and
return an :class:`SVDResult` ``(U, S, Vh)`` laid out like :func:`torch.linalg.svd`:
``U`` is ``(..., M, K)``, ``S`` is ``(..., K)`` in descending order, ``Vh`` is
``(..., K, N)``, and ``A ≈ U @ diag(S) @ Vh``.

:func:`rsvd` also accepts an implicit matrix (anything following
:class:`MatrixOperator`), so ``X @ W`` can be decomposed without ever being formed::

    op = ProductOperator(X, W)          # (M, N), applied as X @ (W @ v)
    U, S, Vh = rsvd(op, 32)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import (
    as_float,
    as_tensor,
    check_choice,
    check_dtype,
    check_finite,
    check_float,
    check_generator,
    check_int,
    check_matrix,
    check_rank,
    check_shape,
    pow2_scale,
    safe_range,
    working_dtype,
)

# "auto" Krylov depth, for a requested relative accuracy `rtol` of the leading singular
# values: stop once every leading Ritz pair (u_i, s_i, v_i) has a residual
# ‖A v_i - s_i u_i‖ <= AUTO_RESIDUAL · sqrt(rtol) · s_i (a singular value's error is about
# the square of that ratio), and one more subspace step would add at most
# AUTO_ENERGY · rtol of the residual energy ‖A - U S Vh‖_F² still missing (see
# _ritz_converged); at most AUTO_MAX_DEPTH blocks. Calibrated on bench/rsvd.py so that the
# default rtol=0.01 meets its bar (singular values within 1%, residual within 2% of
# optimal) at the smallest depth or one more.
AUTO_RESIDUAL = 0.75
AUTO_ENERGY = 0.5
AUTO_MAX_DEPTH = 16
# When the remaining dimensions (n - basis width) are at most this many blocks, the next
# block takes all of them, so the basis spans the range of A and the SVD of QᵀA is exact.
EXACT_BLOCKS = 2

# What a matrix argument of rsvd/nystrom may be (for error messages).
_OPERAND = (
    "a torch.Tensor, a numpy.ndarray or a matrix operator (with .shape, @ and .mT or .rmatmul)"
)


class SVDResult(NamedTuple):
    """A (thin or truncated) SVD: ``A ≈ U @ diag(S) @ Vh``.

    Shapes: ``U`` (..., M, K), ``S`` (..., K) descending, ``Vh`` (..., K, N).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class RSVDResult(SVDResult):
    """:class:`SVDResult` from :func:`rsvd`, with its error estimate attached.

    Unpacks as ``U, S, Vh``; in addition

    - ``residual`` (...,): estimated relative Frobenius error
      ``‖A - U diag(S) Vh‖_F / ‖A‖_F`` (exact up to rounding for dense input; for an
      operator ``‖A‖_F`` is a Gaussian-sketch estimate unless it has ``fro_norm()``);
    - ``ranks`` (...,): the rank each matrix needed to meet ``tol`` (equal to ``K``
      when ``tol`` is None);
    - ``depth``: the number of Krylov blocks after the first one (power iterations) used.
    """

    residual: torch.Tensor
    ranks: torch.Tensor
    depth: int

    def __new__(cls, U, S, Vh, residual, ranks, depth):
        self = super().__new__(cls, U, S, Vh)
        self.residual, self.ranks, self.depth = residual, ranks, depth
        return self


# --------------------------------------------------------------------------------------
# Implicit matrices
# --------------------------------------------------------------------------------------


@runtime_checkable
class MatrixOperator(Protocol):
    """What :func:`rsvd` and :func:`~rankwise.linalg.nystrom` need from a matrix.

    ``shape`` is ``(..., M, N)``; ``A @ X`` maps ``(..., N, K)`` to ``(..., M, K)``;
    ``A.mT`` is the transpose (another operator). Dense tensors qualify; so does
    :class:`LinearOperator`. An object with ``rmatmul(Y)`` (returning ``Aᵀ @ Y``, the
    scipy convention) instead of ``mT`` is accepted too. ``dtype`` (default float32) and
    ``device`` (default cpu) are read if present; ``fro_norm()`` is used if present.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor: ...


class LinearOperator:
    """An implicit matrix of shape ``(..., M, N)`` given by its two products.

    ``matmul(X)`` must return ``A @ X`` for ``X`` of shape (..., N, K); ``rmatmul(Y)`` must
    return ``Aᵀ @ Y`` for ``Y`` of shape (..., M, K). ``fro_norm`` (optional) returns
    ``‖A‖_F`` with shape (...); it makes :func:`rsvd`'s residual exact.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        matmul: Callable[[torch.Tensor], torch.Tensor],
        rmatmul: Callable[[torch.Tensor], torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fro_norm: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self._matmul, self._rmatmul, self._fro = matmul, rmatmul, fro_norm

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self._matmul(other)

    @property
    def mT(self) -> LinearOperator:  # noqa: N802 (mirrors torch.Tensor.mT)
        shape = (*self.shape[:-2], self.shape[-1], self.shape[-2])
        return LinearOperator(
            shape,
            self._rmatmul,
            self._matmul,
            dtype=self.dtype,
            device=self.device,
            fro_norm=self._fro,
        )

    def fro_norm(self) -> torch.Tensor:
        """``‖A‖_F`` (...,), if the operator knows it; else raises ConfigError."""
        if self._fro is None:
            raise ConfigError("LinearOperator.fro_norm: no fro_norm callable was given")
        return self._fro()

    def has_fro_norm(self) -> bool:
        return self._fro is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


class ProductOperator(LinearOperator):
    """The product ``F1 @ F2 @ ... @ Fp`` of tensors (or operators), never formed.

    Applying it costs one product per factor, so a rank-r ``X @ W`` with ``X`` (M, r) and
    ``W`` (r, N) costs ``O((M + N) r K)`` per block of K vectors instead of ``O(M N K)``.
    Shapes must chain; leading batch dimensions broadcast like ``torch.matmul``.
    ``fro_norm`` is exact (trace of the product of Gram matrices) for two dense factors.
    """

    def __init__(self, *factors: torch.Tensor | MatrixOperator) -> None:
        if len(factors) < 1:
            raise ConfigError("ProductOperator: needs at least one factor; got none")
        factors = tuple(
            f
            if hasattr(f, "shape") and hasattr(f, "__matmul__") and not isinstance(f, np.ndarray)
            else as_tensor(f, f"factors[{i}]", "ProductOperator", accepted=_OPERAND)
            for i, f in enumerate(factors)
        )
        for i, f in enumerate(factors):
            if len(f.shape) < 2:
                raise ShapeError(
                    f"ProductOperator: factor {i} must be a tensor or operator of shape "
                    f"(..., M, N); got shape {tuple(f.shape)}"
                )
            check_dtype(getattr(f, "dtype", torch.float32), f"factors[{i}]", "ProductOperator")
        for i in range(len(factors) - 1):
            if factors[i].shape[-1] != factors[i + 1].shape[-2]:
                raise ShapeError(
                    f"ProductOperator: factors {i} and {i + 1} do not chain: shapes "
                    f"{tuple(factors[i].shape)} and {tuple(factors[i + 1].shape)}"
                )
        batch = torch.broadcast_shapes(*(tuple(f.shape[:-2]) for f in factors))
        shape = (*batch, factors[0].shape[-2], factors[-1].shape[-1])
        self.factors = tuple(factors)
        dtype = getattr(factors[0], "dtype", torch.float32)
        device = getattr(factors[0], "device", torch.device("cpu"))
        fro = (
            self._fro_two
            if len(factors) == 2 and all(isinstance(f, torch.Tensor) for f in factors)
            else None
        )
        super().__init__(
            shape, self._apply, self._apply_t, dtype=dtype, device=device, fro_norm=fro
        )

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.factors):
            X = f @ X.to(f.dtype) if isinstance(f, torch.Tensor) else f @ X
        return X

    def _apply_t(self, Y: torch.Tensor) -> torch.Tensor:
        for f in self.factors:
            Y = f.mT @ Y.to(f.dtype) if isinstance(f, torch.Tensor) else _rmatmul(f, Y)
        return Y

    def _fro_two(self) -> torch.Tensor:
        # ‖XW‖_F² = trace((XᵀX)(WWᵀ)) = Σ (XᵀX) ∘ (WWᵀ), computed in float64.
        X, W = (f.double() for f in self.factors)
        return ((X.mT @ X) * (W @ W.mT)).sum((-2, -1)).clamp_min(0).sqrt()


def _rmatmul(A: object, Y: torch.Tensor) -> torch.Tensor:
    if hasattr(A, "mT"):
        return A.mT @ Y
    return A.rmatmul(Y)


class _Op:
    """Internal view of a validated input: products in the working dtype, maybe transposed.

    Magnitudes: when ``‖A‖_F`` (dense) or the first sketch (:meth:`rescale`, operators) is
    outside :func:`safe_range` of the working dtype, the products are computed for
    ``c A``, ``c`` the exact power of two of each matrix's largest entry (of the sketch's,
    for operators), so Gram matrices and Cholesky-QR neither overflow (entries near 1e20
    in float32) nor underflow (near 1e-30). Kernels
    multiply singular values (or eigenvalues) by ``unscale = 1 / c`` (float64, (...,)).
    """

    def __init__(self, A: object, fn: str, name: str = "A") -> None:
        if isinstance(A, np.ndarray) or not (hasattr(A, "shape") and hasattr(A, "__matmul__")):
            A = as_tensor(A, name, fn, accepted=_OPERAND)
        self.dense = isinstance(A, torch.Tensor)
        self._fro2 = None
        self._c = None  # (..., 1, 1) multiplier of operator outputs, once rescaled
        if self.dense:
            check_matrix(A, name, fn, finite=False)
            self.A, self.out_dtype = as_float(A)
            self.shape, self.device = tuple(A.shape), A.device
            self.unscale = torch.ones(self.batch, dtype=torch.float64, device=self.device)
            # One pass gives ‖A‖_F and, if it is finite, proves every entry is finite. It is
            # accumulated in float64: a float32 sum over 10⁷ entries is off by ~1e-4, more
            # than the residual energy of a fast-decaying spectrum.
            fro = torch.linalg.vector_norm(self.A, dim=(-2, -1), dtype=torch.float64)
            if not bool(torch.isfinite(fro).all()):
                check_finite(A, name, fn)  # raises on NaN/Inf; else the square overflowed
            low, high = safe_range(self.A.dtype)
            if not bool(((fro >= low) & (fro <= high)).all()):  # tiny, huge (or zero)
                c = pow2_scale(self.A, (-2, -1))
                self.A = self.A * c[..., None, None].to(self.A.dtype)
                self.unscale = 1 / c
                fro = torch.linalg.vector_norm(self.A, dim=(-2, -1), dtype=torch.float64)
            self._fro2 = fro.double() ** 2
        else:
            if not hasattr(A, "mT") and not hasattr(A, "rmatmul"):
                raise ShapeError(
                    f"{fn}: operator '{name}' ({type(A).__name__}) has neither .mT nor "
                    ".rmatmul, so its transpose cannot be applied"
                )
            self.shape = tuple(int(s) for s in A.shape)
            check_shape(self.shape, name, fn)
            self.out_dtype = getattr(A, "dtype", torch.float32)
            check_dtype(self.out_dtype, name, fn)
            self.device = torch.device(getattr(A, "device", "cpu"))
            self.unscale = torch.ones(self.batch, dtype=torch.float64, device=self.device)
            self.A = A
        self.dtype = working_dtype(self.out_dtype)
        self.fn, self.name = fn, name
        self.transposed = False

    def rescale(self, Y: torch.Tensor) -> torch.Tensor:
        """Given the first product ``Y = A @ X`` (..., m, k) of an operator, scale this and
        every later product into the safe range (see the class docstring); return ``c Y``.
        Dense input is scaled on construction, so this returns ``Y`` unchanged."""
        if self.dense:
            return Y
        if not bool(torch.isfinite(Y).all()):
            raise ShapeError(
                f"{self.fn}: operator '{self.name}' produced NaN/Inf values when applied"
            )
        mag = torch.linalg.vector_norm(Y, dim=(-2, -1))
        low, high = safe_range(self.dtype)
        if bool(((mag >= low) & (mag <= high)).all()):
            return Y
        c = pow2_scale(Y, (-2, -1))
        self._c = c[..., None, None].to(self.dtype)
        self.unscale = 1 / c
        return Y * self._c

    @property
    def m(self) -> int:
        return self.shape[-1] if self.transposed else self.shape[-2]

    @property
    def n(self) -> int:
        return self.shape[-2] if self.transposed else self.shape[-1]

    @property
    def batch(self) -> tuple[int, ...]:
        return self.shape[:-2]

    def _fwd(self, X: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.A @ X
        return self._checked(self.A @ X.to(self.out_dtype))

    def _bwd(self, Y: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.A.mT @ Y
        return self._checked(_rmatmul(self.A, Y.to(self.out_dtype)))

    def _checked(self, Y: torch.Tensor) -> torch.Tensor:
        if not isinstance(Y, torch.Tensor):
            raise ShapeError(
                f"{self.fn}: operator '{self.name}' returned {type(Y).__name__}, expected a tensor"
            )
        Y = Y.to(self.dtype)
        return Y if self._c is None else Y * self._c

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` (or ``Aᵀ @ X`` when transposed), (..., n, k) -> (..., m, k)."""
        return self._bwd(X) if self.transposed else self._fwd(X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ Y`` (or ``A @ Y`` when transposed), (..., m, k) -> (..., n, k)."""
        return self._fwd(Y) if self.transposed else self._bwd(Y)

    def fro2(self, sketch: torch.Tensor | None = None) -> torch.Tensor | None:
        """``‖cA‖_F²`` (...,) in float64 (``c = 1 / unscale``): exact if possible, else from
        a Gaussian sketch of ``cA``."""
        if self._fro2 is not None:
            return self._fro2
        has = getattr(self.A, "has_fro_norm", None)
        if has() if callable(has) else hasattr(self.A, "fro_norm"):
            f = torch.as_tensor(self.A.fro_norm(), dtype=torch.float64, device=self.device)
            return (f.expand(self.batch) / self.unscale) ** 2
        if sketch is None:
            return None
        # E‖AΩ‖_F² = k‖A‖_F² for Ω with k standard Gaussian columns (Hutchinson).
        return sketch.double().square().sum((-2, -1)) / sketch.shape[-1]


# --------------------------------------------------------------------------------------
# Orthonormalisation
# --------------------------------------------------------------------------------------


def _cholqr(
    X: torch.Tensor, *, shift: bool = False, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One Cholesky-QR pass ``Q = X R⁻¹`` with ``RᵀR = XᵀX (+ sI)``; returns ``(Q, XᵀX)``,
    or None when the Cholesky factorisation fails or (``strict``) ``X`` looks too
    ill-conditioned for an unshifted pass to be accurate."""
    G = X.mT @ X
    H = G
    if shift:  # Fukaya et al. 2020, shifted CholeskyQR: s = 11 (mk + k(k+1)) u ‖X‖²
        m, k = X.shape[-2:]
        u = torch.finfo(X.dtype).eps / 2
        tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖X‖_F² >= ‖X‖₂²
        s = (11 * (m * k + k * (k + 1)) * u) * tr.clamp_min(torch.finfo(X.dtype).tiny)
        H = G + s[..., None, None] * torch.eye(k, dtype=X.dtype, device=X.device)
    L, info = torch.linalg.cholesky_ex(H)
    if bool(info.any()):
        return None
    if strict:
        d = L.diagonal(dim1=-2, dim2=-1)
        limit = 1e-3 if X.dtype == torch.float32 else 1e-7
        if not bool((d.amin(-1) > limit * d.amax(-1)).all()):
            return None
    return torch.linalg.solve_triangular(L.mT, X, upper=True, left=False), G


def _orth(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``X`` (..., m, k), k <= m.

    Cholesky-QR2 (two passes of ``X R⁻¹``; Yamamoto et al. 2015) costs a few GEMMs and two
    k x k factorisations instead of a Householder QR, which is several times slower for
    tall-skinny blocks on CPU (and, on a busy machine, up to 1000x slower). When ``X`` is
    too ill-conditioned for it we use shifted Cholesky-QR3 (Fukaya, Kannan, Nakatsukasa,
    Yamamoto & Yanagisawa 2020), which handles condition numbers up to ~1/eps; only a
    numerically rank-deficient block falls back to Householder QR.
    """
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    for attempt in (X, None):
        if attempt is None:  # numerically rank deficient: fill the null directions
            attempt = _fill_rank_deficient(X)
        first = _cholqr(attempt)
        if first is None:
            first = _cholqr(attempt, shift=True, strict=False)
            if first is not None:  # a third pass: shifted Q₁ is only well-conditioned
                first = _cholqr(first[0], strict=False)
        if first is not None:
            second = _cholqr(first[0], strict=False)
            if second is not None and bool((second[1] - eye).abs().amax() < 0.5):
                return second[0]
    return torch.linalg.qr(X).Q


def _fill_rank_deficient(X: torch.Tensor) -> torch.Tensor:
    """``X`` (..., m, k) rotated to its right singular basis and scaled to unit columns, with
    the directions of numerically zero singular value replaced by fixed Gaussian columns:
    same span where ``X`` has rank, well conditioned everywhere (SVQB, Stathopoulos & Wu
    2002). Householder QR of a rank-deficient block costs 10-100x more on a busy CPU."""
    G = (X.mT @ X).double()
    w, V = torch.linalg.eigh(G)
    k = X.shape[-1]
    floor = w[..., -1:].clamp_min(torch.finfo(torch.float64).tiny) * (k * torch.finfo(X.dtype).eps)
    live = w > floor  # (..., k)
    Y = X @ (V / w.clamp_min(1e-300).sqrt().unsqueeze(-2)).to(X.dtype)
    g = torch.Generator(device=X.device).manual_seed(0)
    noise = torch.randn(X.shape, generator=g, dtype=X.dtype, device=X.device)
    noise = noise / torch.linalg.vector_norm(noise, dim=-2, keepdim=True)
    return torch.where(live.unsqueeze(-2), Y, noise)


def _orth_against(
    W: torch.Tensor, Q: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Orthonormalise ``W`` against the orthonormal ``Q`` and itself (block Gram-Schmidt,
    twice, so the new block stays orthogonal to ``Q`` even when W is nearly inside it).

    When the Krylov space is numerically exhausted (a matrix of low numerical rank, or
    one graded over many orders of magnitude), the projected block is rounding noise that
    normalisation turns into columns lying back inside ``Q``; those columns are replaced
    by Gaussian directions, which any orthonormal basis may contain without harm to the
    Rayleigh-Ritz step.
    """
    for attempt in range(2):
        for _ in range(2):
            W = W - Q @ (Q.mT @ W)
            W = _orth(W)
        leak = (Q.mT @ W).abs().amax(-2)  # (..., b): worst overlap of each new column
        bad = leak > 1e3 * torch.finfo(W.dtype).eps
        if attempt or not bool(bad.any()):
            return W
        fresh = torch.randn(W.shape, generator=generator, dtype=W.dtype, device=W.device)
        W = torch.where(bad.unsqueeze(-2), fresh, W)
    return W


# --------------------------------------------------------------------------------------
# Randomized SVD
# --------------------------------------------------------------------------------------


def rsvd(
    A: torch.Tensor | MatrixOperator,
    rank: int | None,
    *,
    oversample: int = 10,
    n_iter: int | str = "auto",
    tol: float | None = None,
    rtol: float = 0.01,
    accuracy: str = "values",
    generator: torch.Generator | None = None,
) -> RSVDResult:
    """Randomized truncated SVD by randomized block Krylov iteration.

    Builds an orthonormal basis ``Q`` of the block Krylov space
    ``K = [AΩ, (AAᵀ)AΩ, ..., (AAᵀ)^q AΩ]`` with a Gaussian ``Ω`` of ``b = rank + oversample``
    columns, re-orthonormalising every new block against all previous ones (Cholesky-QR2,
    block Gram-Schmidt twice), then solves the small problem ``QᵀA = Ũ S Vh`` and returns
    ``U = QŨ`` (Rayleigh-Ritz). ``QᵀA`` is assembled from the products ``AᵀQ_j`` the
    iteration computes anyway, so depth q costs ``2q + 2`` products with b columns, the same
    as q classic power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4), but the basis
    has ``(q+1)b`` columns and converges like a Chebyshev polynomial of degree 2q+1 instead
    of a monomial (Musco & Musco 2015, "Randomized block Krylov methods", Alg. 2).

    Args:
        A: dense tensor (..., M, N) or an implicit matrix (:class:`MatrixOperator`).
        rank: number of singular triplets K. With ``tol``, the largest rank allowed
            (``None``: ``min(M, N)``).
        oversample: extra columns in each block (``b = rank + oversample``, clamped to
            ``min(M, N)``). With ``tol``, ``b = min(rank, 64) + oversample``.
        n_iter: Krylov depth q (blocks after the first; the power-iteration count, as
            in ``torch.svd_lowrank``'s ``niter`` and scikit-learn's ``n_iter``). ``"auto"``: keep adding
            blocks until the residuals of the leading ``rank`` Ritz pairs show the singular
            values are within about ``rtol`` (relative), at most 16 blocks; with
            ``tol``, until the tolerance is met and one more block no longer lowers the
            rank picked. An int fixes q (with ``tol``: caps it).
        tol: fixed-accuracy mode. Grow the basis a block at a time until the rank-k
            truncation has ``‖A - U_k S_k Vh_k‖_F <= tol ‖A‖_F`` for some ``k <= rank``;
            return the smallest such k (the largest over a batch; ``ranks`` holds each).
        rtol: the relative accuracy of the leading singular values that ``n_iter="auto"``
            aims at (default 1%, the bar of bench/rsvd.py). A caller that needs less (a
            GaLore refresh needs the captured gradient energy, not each σ) passes more.
        accuracy: what ``rtol`` is about with ``n_iter="auto"``: ``"values"`` (each leading
            singular value) or ``"energy"`` (the energy ``Σ s_i²`` the rank-K subspace
            captures: stop when one more block would add less than ``rtol`` of it — what
            a gradient projection needs, usually reached one or two blocks earlier).
        generator: source of ``Ω``; the same seed gives the same result.

    Returns:
        :class:`RSVDResult` ``(U, S, Vh)`` with ``U`` (..., M, K), ``S`` (..., K),
        ``Vh`` (..., K, N), in the caller's dtype (bf16/fp16 are computed in float32), plus
        ``residual``, ``ranks`` and ``depth``.

    Raises:
        ShapeError: empty, complex, integer or non-finite ``A``.
        ConfigError: ``rank`` outside ``[1, min(M, N)]``, bad ``oversample``,
            ``n_iter``, ``tol`` or ``generator``.
    """
    fn = "rsvd"
    op = _Op(A, fn)
    m, n = op.shape[-2:]
    if tol is None:
        k = check_rank(rank, m, n, fn)
    else:
        tol = check_float(tol, "tol", fn, low=0.0, high=1.0, low_open=True)
        k = min(m, n) if rank is None else check_rank(rank, m, n, fn)
    oversample = check_int(oversample, "oversample", fn, low=0)
    rtol = check_float(rtol, "rtol", fn, low=0.0, high=1.0, low_open=True)
    check_choice(accuracy, "accuracy", fn, ("values", "energy"))
    if isinstance(n_iter, str):
        check_choice(n_iter, "n_iter", fn, ("auto",))
        max_depth = AUTO_MAX_DEPTH if tol is None else None
    else:
        max_depth = check_int(n_iter, "n_iter", fn, low=0, what="[0, inf) or 'auto'")
    auto = isinstance(n_iter, str)
    check_generator(generator, fn, op.device)

    op.transposed = m < n  # work with the tall orientation: the small problem is n x n
    m, n = op.m, op.n
    b = min((k if tol is None else min(k, 64)) + oversample, n)
    batch = op.batch

    # Krylov blocks: Q_j (..., m, b) orthonormal; Z_j = AᵀQ_j (..., n, b), so QᵀA = Zᵀ.
    omega = torch.randn(*batch, n, b, generator=generator, device=op.device, dtype=op.dtype)
    Y = op.rescale(op.matmul(omega))  # (..., m, b)
    fro2 = op.fro2(Y)
    Q = Qj = _orth(Y)  # (..., m, L) basis so far, (..., m, b) newest block
    Bt = None  # (..., n, L) = (QᵀA)ᵀ
    gram = None  # (..., L, L) float64 Gram of QᵀA, grown a block at a time
    eig = None  # the Gram's eigenpairs, when the loop already computed them
    k_met = -1  # tol mode: the rank that met tol at the previous block
    depth = 0
    while True:
        Z = op.rmatmul(Qj)  # (..., n, b_j)
        Bt = Z if Bt is None else torch.cat([Bt, Z], -1)
        gram = _grow_gram(gram, Bt, Z)
        width = Q.shape[-1]
        if width >= n:  # the basis spans the range of A: exact
            break
        if tol is not None:
            ritz = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)  # σ² estimates
            kk = min(k, width)
            resid2 = fro2.unsqueeze(-1) - ritz[..., :kk].cumsum(-1)  # (..., kk)
            ok = resid2 <= tol**2 * fro2.unsqueeze(-1)
            if bool(ok.any(-1).all()):
                # Met; with "auto", go on until one more block no longer lowers the rank.
                k_now = int(ok.int().argmax(-1).max()) + 1
                if not auto or k_now == k_met:
                    break
                k_met = k_now
        if max_depth is not None and depth >= max_depth:
            break
        b_next = n - width if n - width <= EXACT_BLOCKS * b else b
        if auto and tol is None:
            # Next block: A applied to the leading Ritz directions AᵀQũ_i = s_i v_i. Its part
            # outside Q is s_i times the residual of pair i, which decides whether to stop.
            eig = _eigh_descending(gram)
            W = op.matmul(
                _pad_gaussian((Bt.double() @ eig[1][..., :b_next]).to(Bt.dtype), b_next, generator)
            )
            if _ritz_converged(W, Q, eig[0], fro2, k, rtol, accuracy):
                break
            eig = None
        else:
            W = op.matmul(_pad_gaussian(Z, b_next, generator))  # (..., m, b_next)
        Qj = _orth_against(W, Q, generator)
        Q = torch.cat([Q, Qj], -1)
        depth += 1

    if tol is None:
        K = k
        ranks = torch.full(batch, k, dtype=torch.long, device=op.device)
    else:
        ritz = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
        kk = min(k, Q.shape[-1])
        resid2 = fro2.unsqueeze(-1) - ritz[..., :kk].cumsum(-1)  # (..., kk)
        ok = resid2 <= tol**2 * fro2.unsqueeze(-1)
        ranks = torch.where(
            ok.any(-1), ok.int().argmax(-1) + 1, torch.full_like(ok[..., 0], kk, dtype=torch.long)
        )
        K = int(ranks.max())
        if not bool(ok.any(-1).all()):
            warnings.warn(
                f"rsvd: tol={tol:g} was not reached within rank {kk} "
                f"(max residual {float((resid2[..., -1] / fro2).clamp_min(0).sqrt().max()):.3g});"
                " raise 'rank' or 'n_iter'",
                RuntimeWarning,
                stacklevel=2,
            )
    U, S, Vh = _rayleigh_ritz(Q, Bt, gram, K, eig)
    cap = S.double().square().sum(-1)
    residual = ((fro2 - cap).clamp_min(0) / fro2.clamp_min(1e-300)).sqrt()
    if op.transposed:  # we decomposed Aᵀ = U S Vh, so A = Vhᵀ S Uᵀ
        U, Vh = Vh.mT, U.mT
    out = op.out_dtype
    S = S.double() * op.unscale.unsqueeze(-1)  # back from the safe range (exact: powers of 2)
    return RSVDResult(U.to(out), S.to(out), Vh.to(out), residual.to(op.dtype), ranks, depth)


def _pad_gaussian(X: torch.Tensor, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """The first ``cols`` columns of ``X`` (..., n, c), with Gaussian columns appended when
    ``cols > c``: ``A @`` the result stays in the range of ``A``."""
    if cols <= X.shape[-1]:
        return X[..., :cols]
    extra = torch.randn(
        *X.shape[:-1], cols - X.shape[-1], generator=generator, dtype=X.dtype, device=X.device
    )
    return torch.cat([X, extra], -1)


def _eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the Gram ``BBᵀ`` (..., L, L), largest first: ``(s², Ũ)``, float64."""
    w, V = torch.linalg.eigh(gram)
    return w.flip(-1).clamp_min(0), V.flip(-1)


def _ritz_converged(
    W: torch.Tensor,
    Q: torch.Tensor,
    w: torch.Tensor,
    fro2: torch.Tensor,
    k: int,
    rtol: float,
    accuracy: str = "values",
) -> bool:
    """Whether the leading ``k`` Ritz pairs of the basis ``Q`` are accurate enough to stop.

    ``W = A Aᵀ Q Ũ`` (..., m, ≥k), ``w`` the descending Ritz values ``s_i²``. For a Ritz pair ``QᵀA v_i = s_i ũ_i`` exactly, so the
    residual ``r_i = A v_i - s_i u_i`` is the part of ``A v_i = W_i / s_i`` outside ``Q``.
    ``‖r_i‖ / s_i`` bounds the pair's error (its square bounds the singular value's, up to
    the gap), and ``Σ‖r_i‖²`` is the energy one more subspace step would capture, which we
    compare with the residual energy ``‖A‖_F² - Σ s_i²`` still missing.
    """
    k = min(k, W.shape[-1], w.shape[-1])
    w = w[..., :k]
    outside = W[..., :k] - Q @ (Q.mT @ W[..., :k])
    r2 = outside.double().square().sum(-2) / w.clamp_min(1e-300)  # (..., k) ‖r_i‖²
    live = w > 1e-12 * w[..., :1]  # directions at rounding level are noise either way
    if accuracy == "energy":  # one more step would add < rtol of the captured energy
        return bool(((r2 * live).sum(-1) <= rtol * w.sum(-1)).all())
    rel_ok = ((r2 <= AUTO_RESIDUAL**2 * rtol * w) | ~live).all(-1)
    missing = (fro2 - w.sum(-1)).clamp_min(0)
    # (slack: the Ritz values come from float32 products, good to ~1e-7 of ‖A‖_F²)
    energy_ok = (r2 * live).sum(-1) <= AUTO_ENERGY * rtol * missing + 1e-6 * fro2
    return bool((rel_ok & energy_ok).all())


def _grow_gram(gram: torch.Tensor | None, Bt: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Append the newest block ``Z`` (last columns of ``Bt``) to the float64 Gram matrix
    ``(QᵀA)(QᵀA)ᵀ = BtᵀBt``."""
    col = Bt.double().mT @ Z.double()  # (..., L, b)
    if gram is None:
        return col
    top = torch.cat([gram, col[..., : gram.shape[-1], :]], -1)
    bottom = col.mT
    return torch.cat([top, bottom], -2)


def _rayleigh_ritz(
    Q: torch.Tensor,
    Bt: torch.Tensor,
    gram: torch.Tensor,
    K: int,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K SVD of ``B = QᵀA`` (given as ``Bt = Bᵀ``), lifted back: ``U = Q Ũ``.

    In float32 we use the eigendecomposition of the float64 Gram ``BBᵀ`` (cheaper than an
    SVD of the L x n matrix ``B``, and exact enough for singular values above ~1e-6 σ₁);
    float64 input, or a spectrum below that, uses the SVD of ``B`` directly. ``eig``: the
    Gram's eigenpairs from :func:`_eigh_descending`, if already computed.
    """
    if Q.dtype == torch.float32:
        w, V = _eigh_descending(gram) if eig is None else eig
        w, V = w[..., :K], V[..., :K]
        s = w.sqrt()  # (..., K) float64
        if bool((s[..., -1] > 1e-6 * s[..., 0]).all()):
            Vh = ((Bt.double() @ V) / s.unsqueeze(-2)).mT  # (..., K, n)
            return Q @ V.to(Q.dtype), s.to(Q.dtype), Vh.to(Q.dtype)
    Ub, S, Vh = torch.linalg.svd(Bt.mT, full_matrices=False)  # (..., L, L), (..., L), (..., L, n)
    return Q @ Ub[..., :K], S[..., :K], Vh[..., :K, :]


# --------------------------------------------------------------------------------------
# Exact and incremental SVD
# --------------------------------------------------------------------------------------


def truncated_svd(A: torch.Tensor, rank: int | None = None) -> SVDResult:
    """Exact truncated SVD: the ``rank`` leading triplets of ``torch.linalg.svd(A)``.

    For small problems and as a reference; costs ``O(M N min(M, N))``. ``A`` (..., M, N);
    returns ``U`` (..., M, K), ``S`` (..., K), ``Vh`` (..., K, N) with ``K = rank``
    (``None``: ``min(M, N)``), in the caller's dtype (bf16/fp16 computed in float32).
    By Eckart–Young (1936) ``U diag(S) Vh`` is a best rank-K approximation in every
    unitarily invariant norm.
    """
    fn = "truncated_svd"
    A = check_matrix(A, "A", fn)
    m, n = A.shape[-2:]
    k = min(m, n) if rank is None else check_rank(rank, m, n, fn)
    work, out = as_float(A)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return SVDResult(U[..., :k].to(out), S[..., :k].to(out), Vh[..., :k, :].to(out))


def svd_update(
    svd: SVDResult | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    cols: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rank: int | None = None,
) -> SVDResult:
    """Update a thin SVD after appending columns or rows (Brand 2006, "Fast low-rank
    modifications of the thin SVD", Sec. 2).

    With ``A = U diag(S) Vh`` (U (..., M, K), S (..., K), Vh (..., K, N)) and new columns
    ``C`` (..., M, c): write ``C = U (UᵀC) + P R`` (P orthonormal, R (c, c)), so

        [A  C] = [U  P] · [[diag(S), UᵀC], [0, R]] · blockdiag(Vh, I)

    and an SVD of the (K+c) x (K+c) middle matrix gives the new factors, at cost
    ``O((M + N)(K + c)²)`` instead of a fresh SVD. Rows ``D`` (..., r, N) are the same
    update applied to ``Aᵀ``. Exactly one of ``cols``/``rows``. The result is the exact SVD
    of the updated ``U diag(S) Vh`` (if the input SVD was truncated, so is the base).

    Args:
        svd: the current ``(U, S, Vh)``.
        cols: columns appended on the right, (..., M, c).
        rows: rows appended at the bottom, (..., r, N).
        rank: keep only this many leading triplets (``None``: ``min(K + c, M, N + c)``).
    Returns:
        :class:`SVDResult` of ``[A C]`` (..., M, N + c) or ``[A; D]`` (..., M + r, N).
    """
    fn = "svd_update"
    if not isinstance(svd, tuple) or len(svd) != 3:
        raise ConfigError(
            f"{fn}: argument 'svd' must be a (U, S, Vh) tuple; got {type(svd).__name__}"
        )
    U = check_matrix(svd[0], "svd.U", fn)
    Vh = check_matrix(svd[2], "svd.Vh", fn)
    S = as_tensor(svd[1], "svd.S", fn)
    if S.ndim < 1:
        raise ShapeError(f"{fn}: argument 'svd.S' must be a tensor of shape (..., K)")
    check_dtype(S.dtype, "svd.S", fn)
    K = S.shape[-1]
    if U.shape[-1] != K or Vh.shape[-2] != K:
        raise ShapeError(
            f"{fn}: argument 'svd' has inconsistent shapes U {tuple(U.shape)}, S "
            f"{tuple(S.shape)}, Vh {tuple(Vh.shape)}; expected (..., M, K), (..., K), (..., K, N)"
        )
    if (cols is None) == (rows is None):
        raise ConfigError(
            f"{fn}: pass exactly one of 'cols' or 'rows'; got "
            f"{'both' if cols is not None else 'neither'}"
        )
    if rows is not None:
        rows = check_matrix(rows, "rows", fn)
        if rows.shape[-1] != Vh.shape[-1]:
            raise ShapeError(
                f"{fn}: argument 'rows' must have N = {Vh.shape[-1]} columns "
                f"to match svd.Vh; got shape {tuple(rows.shape)}"
            )
        res = svd_update(SVDResult(Vh.mT, S, U.mT), cols=rows.mT, rank=rank)
        return SVDResult(res.Vh.mT, res.S, res.U.mT)
    cols = check_matrix(cols, "cols", fn)
    if cols.shape[-2] != U.shape[-2]:
        raise ShapeError(
            f"{fn}: argument 'cols' must have M = {U.shape[-2]} rows to match "
            f"svd.U; got shape {tuple(cols.shape)}"
        )
    c = cols.shape[-1]
    full = min(K + c, U.shape[-2], Vh.shape[-1] + c)  # the rank [A C] can have
    if rank is not None:
        rank = check_int(rank, "rank", fn, low=1, high=full)
    out = U.dtype
    dt = torch.promote_types(working_dtype(U.dtype), working_dtype(cols.dtype))
    U, S, Vh, C = U.to(dt), S.to(dt), Vh.to(dt), cols.to(dt)
    M_ = U.mT @ C  # (..., K, c)
    P = C - U @ M_
    M2 = U.mT @ P  # second Gram-Schmidt pass keeps P orthogonal to U
    P, M_ = P - U @ M2, M_ + M2
    P, R = torch.linalg.qr(P)  # (..., M, c), (..., c, c)
    batch = torch.broadcast_shapes(S.shape[:-1], C.shape[:-2])
    mid = torch.zeros(*batch, K + c, K + c, dtype=dt, device=U.device)
    mid[..., :K, :K] = torch.diag_embed(S)
    mid[..., :K, K:] = M_
    mid[..., K:, K:] = R
    Um, Sm, Vhm = torch.linalg.svd(mid)
    keep = full if rank is None else rank
    U_new = torch.cat([U.expand(*batch, *U.shape[-2:]), P], -1) @ Um[..., :keep]
    # blockdiag(Vh, I_c) has shape (..., K + c, N + c); Vh_new = Vhm[:keep] @ blockdiag
    Vh_new = torch.cat([Vhm[..., :keep, :K] @ Vh, Vhm[..., :keep, K:]], -1)  # (..., keep, N+c)
    return SVDResult(U_new.to(out), Sm[..., :keep].to(out), Vh_new.to(out))


__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "ProductOperator",
    "RSVDResult",
    "SVDResult",
    "rsvd",
    "svd_update",
    "truncated_svd",
]
