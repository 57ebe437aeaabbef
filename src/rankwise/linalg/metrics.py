"""Scalar measures of how low-rank a matrix is.

All take a matrix ``A`` of shape ``(..., M, N)`` and return a tensor of shape ``(...)``,
except :func:`energy_rank`, which takes singular values ``S`` (..., K). Singular values are
computed in float32 (float64 stays float64); results are float (ranks: int64). The zero
matrix has nuclear norm, effective rank and stable rank 0.
"""

from __future__ import annotations

import torch

from rankwise.errors import ShapeError
from rankwise.linalg._checks import as_float, as_tensor, check_dtype, check_float, check_matrix


def _svdvals(A: torch.Tensor, fn: str) -> torch.Tensor:
    A = check_matrix(A, "A", fn)
    work, _ = as_float(A)
    return torch.linalg.svdvals(work)  # (..., min(M, N)) descending


def _over_largest(S: torch.Tensor) -> torch.Tensor:
    """``S`` (descending, non-negative) divided by its first (largest) value: in [0, 1], so
    squares cannot overflow. Dividing by that value itself, not by a clamp at the smallest normal
    float, keeps a subnormal largest value's ratio at exactly 1; an all-zero ``S`` stays zero."""
    top = S[..., :1]
    return S / torch.where(top > 0, top, torch.ones_like(top))


def nuclear_norm(A: torch.Tensor) -> torch.Tensor:
    """Nuclear (trace) norm ``‖A‖_* = Σᵢ σᵢ``, the convex surrogate of rank (Fazel 2002).

    ``A`` (..., M, N) -> (...).
    """
    return _svdvals(A, "nuclear_norm").sum(-1)


def effective_rank(A: torch.Tensor) -> torch.Tensor:
    """Effective rank ``exp(H(p))`` with ``pᵢ = σᵢ / Σⱼ σⱼ`` and ``H`` the Shannon entropy
    (Roy & Vetterli 2007, "The effective rank", Def. 1).

    A real number in ``[1, rank(A)]``: 1 for a rank-one matrix, ``min(M, N)`` when all
    singular values are equal. ``A`` (..., M, N) -> (...); 0 for the zero matrix.
    """
    S = _svdvals(A, "effective_rank")
    total = S.sum(-1, keepdim=True)
    p = S / total.clamp_min(torch.finfo(S.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # 0·log 0 = 0
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank(A: torch.Tensor) -> torch.Tensor:
    """Stable (numerical) rank ``‖A‖_F² / ‖A‖₂² = Σᵢ σᵢ² / σ₁²`` (Rudelson & Vershynin 2007).

    At most ``rank(A)`` and insensitive to tiny singular values. ``A`` (..., M, N) -> (...);
    0 for the zero matrix.
    """
    return _over_largest(_svdvals(A, "stable_rank")).square().sum(-1)  # 0 for all-zero S


def energy_rank(S: torch.Tensor, *, energy: float = 0.9) -> torch.Tensor:
    """Smallest ``k`` with ``Σ_{i<=k} σᵢ² >= energy · Σᵢ σᵢ²``: the rank that keeps a
    fraction ``energy`` of the squared Frobenius norm (Eckart–Young: the best rank-k
    approximation then has relative error ``sqrt(1 - energy)`` or less).

    Args:
        S: singular values (..., K), non-negative, in any order.
        energy: fraction in (0, 1].
    Returns:
        int64 tensor (...), in ``[1, K]`` (0 for an all-zero ``S``).
    """
    fn = "energy_rank"
    S = as_tensor(S, "S", fn)
    if S.ndim < 1 or S.shape[-1] == 0:
        raise ShapeError(
            f"{fn}: argument 'S' must be a non-empty tensor (..., K); got shape {tuple(S.shape)}"
        )
    check_dtype(S.dtype, "S", fn)
    if not bool(torch.isfinite(S).all()) or bool((S < 0).any()):
        raise ShapeError(f"{fn}: argument 'S' must hold finite non-negative singular values")
    energy = check_float(energy, "energy", fn, low=0.0, high=1.0, low_open=True)
    S = torch.sort(S.double(), dim=-1, descending=True).values
    S = _over_largest(S)
    e = S.square().cumsum(-1)
    total = e[..., -1:]
    # Relative slack absorbs rounding in the cumulative sum (energy=1 must give the rank).
    reached = e >= energy * total * (1 - 1e-12)
    k = reached.int().argmax(-1) + 1
    return torch.where(total.squeeze(-1) > 0, k, torch.zeros_like(k)).long()


__all__ = ["effective_rank", "energy_rank", "nuclear_norm", "stable_rank"]
