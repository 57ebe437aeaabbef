"""Nyström approximations: a PSD matrix from ``AΩ``, a general matrix from two sketches.

* :func:`nystrom` — ``A ≈ U diag(λ) Uᵀ`` for a symmetric positive semidefinite ``A``
  (..., N, N) from one product ``AΩ``, in the numerically stable shifted form of
  Tropp, Yurtsever, Udell & Cevher 2017 ("Fixed-rank approximation of a positive-
  semidefinite matrix from streaming data", Alg. 3).
* :func:`nystrom_general` — ``A ≈ (AX) (YᵀAX)⁺ (YᵀA)`` for any ``A`` (..., M, N), the
  generalized Nyström approximation (Nakatsukasa 2020, "Fast and stable randomized
  low-rank matrix approximation") used by NLoRA (2025, "Nyström-initiated low-rank
  adaptation") to initialise its three factors ``B · M · A``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rankwise.errors import ShapeError
from rankwise.linalg._checks import check_generator, check_int, check_rank
from rankwise.linalg.svd import MatrixOperator, _Op


class NystromResult(NamedTuple):
    """``A ≈ eigenvectors @ diag(eigenvalues) @ eigenvectorsᵀ``.

    Shapes: ``eigenvalues`` (..., K) descending and non-negative, ``eigenvectors``
    (..., N, K) orthonormal columns. (Descending, unlike :func:`torch.linalg.eigh`.)
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


class NystromFactors(NamedTuple):
    """``A ≈ C @ W @ R`` with ``C = AX`` (..., M, K), ``W = (YᵀAX)⁺`` (..., K, L) and
    ``R = YᵀA`` (..., L, N)."""

    C: torch.Tensor
    W: torch.Tensor
    R: torch.Tensor


def nystrom(
    A: torch.Tensor | MatrixOperator,
    rank: int,
    *,
    oversample: int = 10,
    generator: torch.Generator | None = None,
) -> NystromResult:
    """Rank-``rank`` Nyström approximation of a symmetric PSD matrix (stable, shifted).

    With an orthonormal Gaussian test matrix ``Ω`` (N, L), ``L = rank + oversample``
    (clamped to N), the Nyström approximation is ``A⟨Ω⟩ = Y (ΩᵀY)⁺ Yᵀ``, ``Y = AΩ``.
    Computing it stably (Tropp et al. 2017, Alg. 3): shift ``Y_ν = Y + νΩ`` with
    ``ν = √N · eps · ‖Y‖₂``, factor ``ΩᵀY_ν = CᵀC`` (Cholesky), ``E = Y_ν C⁻¹``, take the
    thin SVD ``E = U Σ Vᵀ`` and return the top ``rank`` pairs of ``(U, max(Σ² - ν, 0))``.
    One product with ``A``; the error is within a small factor of the best rank-``rank``
    error when the spectrum decays (Tropp et al. 2017, Thm. 4.1).

    Args:
        A: symmetric PSD matrix (..., N, N), dense or an operator (only ``A @ X`` is used).
        rank: number of eigenpairs, 1 <= rank <= N.
        oversample: extra sketch columns.
        generator: source of ``Ω``.
    Returns:
        :class:`NystromResult` ``(eigenvalues (..., K), eigenvectors (..., N, K))`` in the
        caller's dtype (bf16/fp16 computed in float32).
    Raises:
        ShapeError: non-square, non-symmetric (dense input), complex, integer, empty or
            non-finite ``A``, or a sketch showing ``A`` is not PSD.
        ConfigError: bad ``rank``, ``oversample`` or ``generator``.
    """
    fn = "nystrom"
    op = _Op(A, fn)
    n = op.shape[-1]
    if op.shape[-2] != n:
        raise ShapeError(f"{fn}: argument 'A' must be square (..., N, N); got shape {op.shape}")
    if op.dense:
        asym = torch.linalg.vector_norm(op.A - op.A.mT, dim=(-2, -1))
        scale = op._fro2.sqrt().to(asym.dtype)
        limit = 100 * torch.finfo(op.dtype).eps * n**0.5
        if bool((asym > limit * scale).any()):
            raise ShapeError(
                f"{fn}: argument 'A' must be symmetric; got ‖A - Aᵀ‖_F / ‖A‖_F = "
                f"{float((asym / scale.clamp_min(1e-300)).max()):.3g}. For a general "
                "matrix use nystrom_general or rsvd."
            )
    k = check_rank(rank, n, n, fn)
    oversample = check_int(oversample, "oversample", fn, low=0)
    check_generator(generator, fn, op.device)
    L = min(k + oversample, n)

    omega = torch.randn(*op.batch, n, L, generator=generator, device=op.device, dtype=op.dtype)
    omega = torch.linalg.qr(omega).Q  # (..., N, L) orthonormal
    Y = op.rescale(op.matmul(omega))  # (..., N, L), in the safe range (see _Op)
    if not bool(torch.isfinite(Y).all()):
        raise ShapeError(f"{fn}: operator 'A' produced NaN/Inf values when applied")
    eps = torch.finfo(op.dtype).eps
    nu = (n**0.5 * eps) * torch.linalg.matrix_norm(Y, ord=2)  # (...,)
    nu = nu.clamp_min(torch.finfo(op.dtype).tiny)
    Y_nu = Y + nu[..., None, None] * omega
    core = omega.mT @ Y_nu  # (..., L, L)
    core = (core + core.mT) / 2
    chol, info = torch.linalg.cholesky_ex(core)
    if bool(info.any()):
        raise ShapeError(
            f"{fn}: argument 'A' is not positive semidefinite (ΩᵀAΩ has a negative "
            "eigenvalue); use nystrom_general or rsvd for indefinite matrices"
        )
    E = torch.linalg.solve_triangular(chol.mT, Y_nu, upper=True, left=False)  # Y_ν C⁻ᵀ
    U, sig, _ = torch.linalg.svd(E, full_matrices=False)
    lam = (sig[..., :k] ** 2 - nu[..., None]).clamp_min(0)
    lam = lam.double() * op.unscale.unsqueeze(-1)  # back from the safe range
    return NystromResult(lam.to(op.out_dtype), U[..., :k].to(op.out_dtype))


def nystrom_general(
    A: torch.Tensor | MatrixOperator,
    rank: int,
    *,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
) -> NystromFactors:
    """Generalized Nyström: ``A ≈ (AX) (YᵀAX)⁺ (YᵀA)`` from two Gaussian sketches.

    ``X`` (N, K) and ``Y`` (M, L) are Gaussian with ``K = rank`` and ``L > K`` (the
    oversampled left sketch keeps the core well conditioned; Nakatsukasa 2020, Sec. 4).
    The core pseudo-inverse is taken in the working precision with the default relative
    cutoff, which makes the formula stable (ibid., Sec. 4.2). Costs one product with ``A``
    and one with ``Aᵀ``, no orthonormalisation of a long block. NLoRA initialises
    ``B = C``, ``M = W``, ``A = R``.

    Args:
        A: dense (..., M, N) or an operator with ``@`` and ``.mT``/``rmatmul``.
        rank: K, 1 <= K <= min(M, N).
        oversample: ``L - K``; ``None`` (the default) means ``ceil(K / 2)`` (L ≈ 1.5K as
            recommended by Nakatsukasa 2020). Clamped so ``L <= M``.
        generator: source of ``X`` and ``Y``.
    Returns:
        :class:`NystromFactors` ``(C (..., M, K), W (..., K, L), R (..., L, N))``.
    """
    fn = "nystrom_general"
    op = _Op(A, fn)
    m, n = op.shape[-2:]
    k = check_rank(rank, m, n, fn)
    extra = (k + 1) // 2 if oversample is None else check_int(oversample, "oversample", fn, low=0)
    check_generator(generator, fn, op.device)
    L = min(k + extra, m)
    X = torch.randn(*op.batch, n, k, generator=generator, device=op.device, dtype=op.dtype)
    Y = torch.randn(*op.batch, m, L, generator=generator, device=op.device, dtype=op.dtype)
    C = op.rescale(op.matmul(X))  # (..., M, K) for c·A, c = 1 / op.unscale (see _Op)
    R = op.rmatmul(Y).mT  # (..., L, N)
    if not (bool(torch.isfinite(C).all()) and bool(torch.isfinite(R).all())):
        raise ShapeError(f"{fn}: operator 'A' produced NaN/Inf values when applied")
    W = torch.linalg.pinv(Y.mT @ C)  # (..., K, L)
    # (cC)(W/c)(cR) = c·A: scale C and R back, W up, each by the exact power of two.
    s = op.unscale[..., None, None]
    out = op.out_dtype
    return NystromFactors((C * s).to(out), (W / s).to(out), (R * s).to(out))


__all__ = ["NystromFactors", "NystromResult", "nystrom", "nystrom_general"]
