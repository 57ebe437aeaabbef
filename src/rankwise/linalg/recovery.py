"""Low-rank recovery from linear measurements ``y = A(X*) (+ outliers)`` with factored models.

Two first-order methods on over-parameterised factors ``X = F G^T`` (or ``U U^T``):

* :func:`recover_subgradient` - sub-gradient method on the l1 loss, robust to sparse gross
  corruptions ("Global Convergence of Sub-gradient Method for Robust Matrix Recovery",
  Ma & Fattahi, 2022).
* :func:`recover_sensing` - gradient descent on the squared loss with the asymmetric,
  imbalanced parameterisation that keeps linear convergence when the rank is
  over-estimated ("How Over-Parameterization Slows Down Gradient Descent in Matrix
  Sensing", Xiong, Ding, Du, 2023).

The measurement operator is either a ``(m, n1, n2)`` tensor of sensing matrices
(``y_i = <A_i, X>``) or a :class:`SensingOperator` with ``forward``/``adjoint`` callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import (
    as_tensor,
    check_choice,
    check_dtype,
    check_finite,
    check_float,
    check_generator,
    check_int,
    check_rank,
    check_shape_pair,
    check_vector,
    pow2_scale,
    working_dtype,
)


class SensingOperator(NamedTuple):
    """A linear measurement operator ``A: R^{n1 x n2} -> R^m`` given as two callables.

    Attributes:
        forward: ``X (n1, n2) -> (m,)``, ``A(X)_i = <A_i, X>``.
        adjoint: ``r (m,) -> (n1, n2)``, ``A*(r) = sum_i r_i A_i``.
        shape: ``(n1, n2)``.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    adjoint: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, int]


class RecoveryResult(NamedTuple):
    """Result of :func:`recover_subgradient` and :func:`recover_sensing`: ``X ~ L @ R.T``.

    Attributes:
        L: ``(n1, k)`` left factor.
        R: ``(n2, k)`` right factor (the same tensor as ``L`` for a symmetric model).
        history: ``(n_iter,)`` float64 loss per iteration: the mean absolute residual
            ``mean |A(X) - y|`` (sub-gradient) or the relative residual
            ``||A(X) - y|| / ||y||`` (sensing).
        n_iter: iterations run.
        converged: whether ``tol`` stopped the loop (else ``max_iter`` did).
    """

    L: torch.Tensor
    R: torch.Tensor
    history: torch.Tensor
    n_iter: int
    converged: bool

    @property
    def X(self) -> torch.Tensor:
        """The recovered ``(n1, n2)`` matrix ``L @ R.T``."""
        return self.L @ self.R.mT


def _operator(
    y: object, A: object, fn: str
) -> tuple[torch.Tensor, Callable, Callable, int, int, float]:
    """Validate ``y`` and ``A``; return ``(c y, forward, adjoint, n1, n2, unscale)``.

    Magnitudes: ``y`` and a tensor ``A`` are scaled by exact powers of two (``c``, ``a``)
    bringing their largest entries to ~1, so no square or step size overflows or
    underflows for data near 1e±30; the scaled problem's solution is ``(c / a) X*``, and
    factors are multiplied by ``unscale = sqrt(a / c)`` (an exact power of two) on return.
    """
    y = check_vector(y, "y", fn)
    if isinstance(A, np.ndarray):
        A = as_tensor(A, "A", fn)
    m = y.numel()
    c = float(pow2_scale(y))
    a = 1.0
    if isinstance(A, torch.Tensor):
        check_dtype(A.dtype, "A", fn)
        if A.ndim != 3 or A.shape[0] != m or A.shape[1] == 0 or A.shape[2] == 0:
            raise ShapeError(
                f"{fn}: argument 'A' must have shape (m, n1, n2) with m = len(y) = {m}; "
                f"got {tuple(A.shape)}"
            )
        check_finite(A, "A", fn)
        a = float(pow2_scale(A))
        Aw = A.to(device=y.device, dtype=working_dtype(y.dtype)) * a
        n1, n2 = A.shape[1], A.shape[2]
        flat = Aw.reshape(m, n1 * n2)  # (m, n1 n2)
        y, unscale = _scaled(y, c, a)
        return (
            y,
            lambda X: flat @ X.reshape(-1),
            lambda r: (r @ flat).reshape(n1, n2),
            n1,
            n2,
            unscale,
        )
    if isinstance(A, SensingOperator):
        n1, n2 = check_shape_pair(A.shape, "A.shape", fn, "(n1, n2)")

        def forward(X: torch.Tensor) -> torch.Tensor:
            out = A.forward(X)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (m,):
                raise ShapeError(
                    f"{fn}: argument 'A': forward(X) must return a tensor of shape ({m},) "
                    f"(= y's); got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out

        def adjoint(r: torch.Tensor) -> torch.Tensor:
            out = A.adjoint(r)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n1, n2):
                raise ShapeError(
                    f"{fn}: argument 'A': adjoint(r) must return a tensor of shape ({n1}, {n2}); "
                    f"got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out

        y, unscale = _scaled(y, c, a)
        return y, forward, adjoint, n1, n2, unscale
    raise ShapeError(
        f"{fn}: argument 'A' must be a (m, n1, n2) tensor of sensing matrices or a "
        f"SensingOperator; got {type(A).__name__}"
    )


def _scaled(y: torch.Tensor, c: float, a: float) -> tuple[torch.Tensor, float]:
    """``(c' y, sqrt(a / c'))`` with ``c'`` = ``c`` or ``2c`` so that ``a / c'`` is an even
    power of two (its square root, the factors' scale, is then exact)."""
    if math.frexp(a / c)[1] % 2 == 0:  # a / c = 2^(e - 1): make e - 1 even
        c *= 2
    return y * c, math.sqrt(a / c)


def _result(L, R, symmetric, history, converged, unscale, dtype) -> RecoveryResult:
    """Pack factors (scaled back, in the caller's dtype) and the loss history."""
    L = (L * unscale).to(dtype)
    return RecoveryResult(
        L,
        L if symmetric else (R * unscale).to(dtype),
        torch.tensor(history, dtype=torch.float64),
        len(history),
        converged,
    )


def _scales(y, forward, n1, n2, dtype, generator):
    """Robust estimates of ``||X*||_F`` and of the operator's per-entry variance ``s^2``.

    A probe ``P`` with i.i.d. N(0, 1) entries gives ``A(P)_i ~ N(0, ||A_i||^2)``; for
    isotropic ``A_i`` also ``y_i ~ N(0, s^2 ||X*||^2)``, so the ratio of medians of
    ``|y|`` and ``|A(P)|`` estimates ``||X*||_F / ||P||_F``, unaffected by a minority of
    outliers.
    """
    P = torch.randn(n1, n2, dtype=dtype, device=y.device, generator=generator)
    ap = forward(P).to(dtype)
    med_p = float(ap.abs().median())
    if med_p == 0.0:
        raise ShapeError("the measurement operator A maps a random matrix to zero")
    s2 = (med_p / 0.6744897501960817) ** 2 / (n1 * n2)  # ~ mean ||A_i||^2 / (n1 n2)
    x_norm = float(y.abs().median()) / med_p * float(P.norm())
    return max(x_norm, torch.finfo(dtype).tiny), s2


def _common(rank, n1, n2, symmetric, max_iter, tol, generator, y, fn):
    rank = check_rank(rank, n1, n2, fn)
    if not isinstance(symmetric, bool):
        raise ConfigError(f"{fn}: argument 'symmetric' must be a bool; got {symmetric!r}")
    if symmetric and n1 != n2:
        raise ShapeError(f"{fn}: symmetric=True needs square matrices; A maps from {n1} x {n2}")
    max_iter = check_int(max_iter, "max_iter", fn, low=1)
    tol = check_float(tol, "tol", fn, low=0.0)
    check_generator(generator, fn, y.device)
    return rank, max_iter, tol


def _small_init(n, k, scale, dtype, device, generator):
    return scale * torch.randn(n, k, dtype=dtype, device=device, generator=generator)


def recover_subgradient(
    y: torch.Tensor,
    A: torch.Tensor | SensingOperator,
    rank: int,
    *,
    symmetric: bool = False,
    init_scale: float = 1e-9,
    schedule: Literal["adaptive", "geometric"] = "adaptive",
    step: float = 0.5,
    decay: float = 0.98,
    max_iter: int = 1000,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
) -> RecoveryResult:
    """Robust low-rank recovery with the sub-gradient method on the l1 loss.

    Minimises ``f(L, R) = (1/m) ||A(L R^T) - y||_1`` (or ``L L^T`` when ``symmetric``) with
    ``y = A(X*) + s``, ``s`` sparse gross outliers of any size, and ``rank`` ``k`` possibly
    larger than the true rank. Following Ma & Fattahi (2022), Algorithm 1:

    * small random initialisation, ``||L0 R0^T||_F ~ init_scale * ||X*||_F`` (``||X*||_F``
      estimated robustly from the medians of ``|y|`` and of ``|A(P)|`` for a random probe
      ``P``); small initialisation makes the method agnostic to over-parameterisation;
    * the sub-gradient ``D = A*(sign(A(L R^T) - y))`` (symmetrised if ``symmetric``),
      normalised to unit Frobenius norm, and the update
      ``L <- L - eta_t D R``, ``R <- R - eta_t D^T L``.
    * step sizes: ``schedule="geometric"`` is the paper's ``eta_t = step * decay^t``;
      ``schedule="adaptive"`` (default) uses ``eta_t = step * min(1, med_t / med_0)`` with
      ``med_t = median_i |A(X_t) - y|_i``, which for a clean majority of measurements is
      proportional to ``||X_t - X*||_F``. It keeps full steps while the small factors grow
      and shrinks them geometrically only as the error does, so it needs no tuned
      ``decay`` (several times fewer iterations in our tests; same fixed points).

    Stops when the relative change of the factors falls below ``tol`` or after ``max_iter``.
    Recovery needs the corrupted fraction well below one half and enough generic (e.g.
    Gaussian) measurements. With ``rank`` above the true rank the final error shrinks with
    ``init_scale`` (the paper's small-initialisation effect), so keep it small.

    Args:
        y: ``(m,)`` measurements (finite).
        A: ``(m, n1, n2)`` sensing matrices or a :class:`SensingOperator`.
        rank: ``k``, columns of the factors (an over-estimate of the true rank is fine).
        symmetric: fit ``X = L L^T`` (square, symmetric ``X*``) instead of ``L R^T``.
        init_scale: relative size of the random initialisation.
        schedule: ``"adaptive"`` or ``"geometric"`` step sizes (see above).
        step, decay: base step, and the geometric factor ``0 < decay <= 1`` (geometric only).
        max_iter, tol: iteration cap and relative-change tolerance.
        generator: randomness of the probe and the initialisation.

    Returns:
        :class:`RecoveryResult` ``(L, R, history, n_iter, converged)``; ``history`` is
        ``mean |A(X_t) - y|``; ``result.X`` is ``L @ R.T``.
    """
    fn = "recover_subgradient"
    y, forward, adjoint, n1, n2, unscale = _operator(y, A, fn)
    rank, max_iter, tol = _common(rank, n1, n2, symmetric, max_iter, tol, generator, y, fn)
    init_scale = check_float(init_scale, "init_scale", fn, low=0.0, low_open=True)
    step = check_float(step, "step", fn, low=0.0, low_open=True)
    decay = check_float(decay, "decay", fn, low=0.0, high=1.0, low_open=True)
    check_choice(schedule, "schedule", fn, ("adaptive", "geometric"))

    dtype = working_dtype(y.dtype)
    yw = y.to(dtype)
    x_norm, _ = _scales(yw, forward, n1, n2, dtype, generator)
    # entries N(0, c^2): ||L R^T||_F ~ c^2 sqrt(n1 n2 k)
    c = (init_scale * x_norm / (n1 * n2 * rank) ** 0.5) ** 0.5
    L = _small_init(n1, rank, c, dtype, y.device, generator)
    R = L if symmetric else _small_init(n2, rank, c, dtype, y.device, generator)

    history: list[float] = []
    converged = False
    eta = step
    med0 = max(float(yw.abs().median()), torch.finfo(dtype).tiny)
    for _ in range(max_iter):
        resid = forward(L @ R.mT).to(dtype) - yw
        history.append(float(resid.abs().mean()))
        D = adjoint(torch.sign(resid)).to(dtype)  # (n1, n2)
        if symmetric:
            D = 0.5 * (D + D.mT)
        dn = float(D.norm())
        if dn == 0.0:  # exactly at a point where the sub-gradient vanishes
            converged = True
            break
        D = D / dn
        if schedule == "adaptive":
            eta = step * min(1.0, float(resid.abs().median()) / med0)
        if symmetric:
            dL = D @ L
            L_new = L - eta * dL
            R_new = L_new
            change = float(dL.norm()) * eta / max(float(L.norm()), 1e-300)
        else:
            dL, dR = D @ R, D.mT @ L
            L_new, R_new = L - eta * dL, R - eta * dR
            change = (
                eta
                * (float(dL.norm()) + float(dR.norm()))
                / max(float(L.norm()) + float(R.norm()), 1e-300)
            )
        L, R = L_new, R_new
        if schedule == "geometric":
            eta *= decay
        if change <= tol:
            converged = True
            break
    return _result(L, R, symmetric, history, converged, unscale, y.dtype)


def recover_sensing(
    y: torch.Tensor,
    A: torch.Tensor | SensingOperator,
    rank: int,
    *,
    method: Literal["asymmetric", "symmetric"] = "asymmetric",
    lr: float = 0.5,
    init_scale: float = 1e-3,
    imbalance: float = 0.5,
    max_iter: int = 2000,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> RecoveryResult:
    """Matrix sensing by gradient descent on factors, fast at an over-estimated rank.

    Minimises ``f = (1 / (2 m s^2)) ||A(X) - y||^2`` (``s^2`` the operator's estimated
    per-entry variance, so the gradient in ``X`` is about ``X - X*``) over factors with
    ``k = rank`` columns, possibly more than the true rank ``r``:

    * ``method="symmetric"``: ``X = U U^T``, small random init (scale ``init_scale``),
      plain GD. With ``k > r`` this converges only at a sublinear ``Omega(1/T^2)`` rate
      (Xiong, Ding, Du, 2023, Theorem 1), the "curse of symmetry".
    * ``method="asymmetric"``: ``X = F G^T`` with an imbalanced initialisation,
      ``F0`` of size ``imbalance * sqrt(||X*||)`` and ``G0`` tiny (``init_scale``). The
      imbalance ``F^T F - G^T G`` is (nearly) conserved by GD and damps the spurious
      over-parameterised directions, giving linear convergence at ``exp(-Omega(a^2 T))``
      with ``a`` the imbalance (their Theorem 3); applied to a symmetric ``X*`` it replaces
      the sublinear rate by a linear one.

    Steps are ``lr / sigma_1`` with ``sigma_1`` the top singular value of the spectral
    estimate ``A*(y) / (m s^2)``. Stops when ``||A(X) - y|| / ||y|| <= tol``.

    Args:
        y: ``(m,)`` measurements (finite).
        A: ``(m, n1, n2)`` sensing matrices or a :class:`SensingOperator`.
        rank: ``k``, columns of the factors.
        method: ``"asymmetric"`` (the fix) or ``"symmetric"`` (plain ``U U^T``; needs a
            square operator and a symmetric PSD ``X*``).
        lr: step size relative to ``1 / sigma_1``.
        init_scale: relative size of the small initial factor(s).
        imbalance: relative size of ``F0`` for ``method="asymmetric"``.
        max_iter, tol: iteration cap and relative-residual tolerance.
        generator: randomness of the probe and the initialisation.

    Returns:
        :class:`RecoveryResult`; ``history`` is the relative residual per iteration.
    """
    fn = "recover_sensing"
    y, forward, adjoint, n1, n2, unscale = _operator(y, A, fn)
    check_choice(method, "method", fn, ("asymmetric", "symmetric"))
    symmetric = method == "symmetric"
    rank, max_iter, tol = _common(rank, n1, n2, symmetric, max_iter, tol, generator, y, fn)
    lr = check_float(lr, "lr", fn, low=0.0, low_open=True)
    init_scale = check_float(init_scale, "init_scale", fn, low=0.0, low_open=True)
    imbalance = check_float(imbalance, "imbalance", fn, low=0.0, low_open=True)

    dtype = working_dtype(y.dtype)
    yw = y.to(dtype)
    m = yw.numel()
    x_norm, s2 = _scales(yw, forward, n1, n2, dtype, generator)
    sigma1 = float(torch.linalg.matrix_norm(adjoint(yw).to(dtype) / (m * s2), ord=2))
    sigma1 = max(sigma1, torch.finfo(dtype).tiny)
    eta = lr / sigma1
    y_norm = float(yw.norm()) or 1.0

    def grad_x(X: torch.Tensor) -> tuple[torch.Tensor, float]:
        resid = forward(X).to(dtype) - yw
        return adjoint(resid).to(dtype) / (m * s2), float(resid.norm()) / y_norm

    small = (init_scale * x_norm / (n1 * n2 * rank) ** 0.5) ** 0.5
    if symmetric:
        L = _small_init(n1, rank, small, dtype, y.device, generator)
        R = L
    else:
        big = imbalance * (sigma1 / n1) ** 0.5  # columns of F0 of norm ~ imbalance sqrt(sigma1)
        L = _small_init(n1, rank, big, dtype, y.device, generator)
        R = _small_init(n2, rank, small * small / big, dtype, y.device, generator)

    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        D, rel = grad_x(L @ R.mT)
        history.append(rel)
        if rel <= tol:
            converged = True
            break
        if symmetric:
            L = L - eta * (D + D.mT) @ L
            R = L
        else:
            L, R = L - eta * D @ R, R - eta * D.mT @ L
    return _result(L, R, symmetric, history, converged, unscale, y.dtype)


__all__ = ["RecoveryResult", "SensingOperator", "recover_sensing", "recover_subgradient"]
