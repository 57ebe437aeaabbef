"""GaLore: Adam moments in the span of the gradient's leading singular vectors.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al.,
2024). The subspace of each matrix is renewed every ``update_proj_gap`` steps from the
current gradient by :func:`leading_subspace`, a randomized subspace iteration on the one side
GaLore projects, instead of galore-torch's full ``torch.linalg.svd`` of the whole gradient.
Parameter-group options are galore-torch's (``rank``, ``update_proj_gap``, ``scale``,
``proj_type``), so ``from rankwise.optim import GaLoreAdamW`` replaces
``from galore_torch import GaLoreAdamW``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rankwise.errors import ConfigError
from rankwise.optim.base import ProjectedAdamW, Projector, register_projector

OVERSAMPLE = 10  # sketch columns beyond the rank
ENERGY_RTOL = 1e-3  # stop iterating when one more step adds less than this of the captured energy
MAX_POWER_ITERS = 8


GRAM_SHARE = 0.5  # use the exact Gram path when the sketch is at least this share of the side
METHODS = ("auto", "iteration", "gram")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a refresh on one thread: at its sizes (products of at most a few hundred by ~1000
    by ~140, factorizations of a few hundred) threads gain little, and on a loaded CPU every
    parallel region waits for a descheduled thread (a 256×74 Householder QR measured 0.25 s on
    two busy threads, 0.2 ms on one; a whole 256×688 refresh 32 ms on two, 11 ms on one)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ritz(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (ascending) of the float64 Gram ``CᵀC`` (b × b)."""
    return torch.linalg.eigh((C.mT @ C).double())


def subspace_method(d: int, rank: int, oversample: int = OVERSAMPLE) -> str:
    """The path :func:`leading_subspace` takes for a side of size ``d``: ``"gram"`` (eigh of
    the d × d Gram, exact) when the sketch of ``rank + oversample`` columns is at least
    :data:`GRAM_SHARE` of ``d`` (a subspace iteration then costs more than the exact answer),
    else ``"iteration"``. Chosen from interleaved medians per shape (bench/optim.py's
    refresh-paths table: e.g. rank 64 of 128 wide, gram 1 ms vs iteration 2 ms; of 256 wide,
    iteration 8 ms vs gram 10 ms), and fixed, so a run and its resumed half take the same path."""
    return "gram" if rank + oversample >= GRAM_SHARE * d else "iteration"


def leading_subspace(
    grad: torch.Tensor,
    rank: int,
    side: str,
    *,
    generator: torch.Generator | None = None,
    oversample: int = OVERSAMPLE,
    rtol: float = ENERGY_RTOL,
    max_iters: int = MAX_POWER_ITERS,
    method: str = "auto",
) -> torch.Tensor:
    """Orthonormal (d, rank) basis of the leading singular subspace of one side of ``grad``
    (M, N): its left singular vectors (``side="left"``, d = M) or right ones (d = N).

    ``method="iteration"``: randomized subspace iteration ("Finding structure with randomness",
    Halko, Martinsson & Tropp 2011, Alg. 4.4) on that side only, with the Rayleigh-Ritz
    rotation from the float64 (b × b) Gram of the sketch, b = rank + oversample. It iterates
    until one more step adds less than ``rtol`` of the gradient energy the rank-``rank``
    subspace captures (one step for the steep spectra of real gradients; more for flat ones),
    at most ``max_iters``. Each step costs two products with b columns and small
    factorizations. ``method="gram"``: the top eigenvectors of the d × d Gram ``X Xᵀ`` (float64
    eigh), exact, cheaper when ``rank`` is a large share of ``d``. ``"auto"``:
    :func:`subspace_method`. Runs on one thread (:func:`_one_thread`). A projection needs the
    subspace and the energy it captures, not accurate singular values:
    :func:`rankwise.linalg.rsvd` answers that harder question (every triplet to a tolerance,
    rank-deficient blocks repaired), and at GaLore's sizes (rank 64-128 of 256-1376 wide) its
    fixed costs made a refresh about 2x slower than this (bench/optim.py).
    """
    if method not in METHODS:
        raise ConfigError(f"leading_subspace: method must be one of {', '.join(METHODS)}; got {method!r}")
    X = (grad if side == "left" else grad.mT).float()  # want the left singular vectors of X
    if method == "auto":
        method = subspace_method(X.shape[0], rank, oversample)
    with _one_thread():
        if method == "gram":
            _, V = torch.linalg.eigh((X @ X.mT).double())
            return V[:, -rank:].flip(-1).to(grad.dtype)
        return _iterate(X, rank, generator, oversample, rtol, max_iters).to(grad.dtype)


def _iterate(
    X: torch.Tensor, rank: int, generator: torch.Generator | None, oversample: int, rtol: float, max_iters: int
) -> torch.Tensor:
    """The subspace iteration of :func:`leading_subspace` on the float32 ``X`` (d, other)."""
    b = min(rank + oversample, X.shape[0])
    omega = torch.randn(X.shape[1], b, generator=generator, device=X.device, dtype=X.dtype)
    Q = torch.linalg.qr(X @ omega).Q  # (d, b)
    C = X.mT @ Q  # (other, b): QᵀX = Cᵀ
    w, V = _ritz(C)  # ascending Ritz values σ²
    captured = float(w[-rank:].sum())
    for _ in range(max_iters):
        Q = torch.linalg.qr(X @ C).Q  # one step of (X Xᵀ) on the basis
        C = X.mT @ Q
        w, V = _ritz(C)
        before, captured = captured, float(w[-rank:].sum())
        if captured - before <= rtol * captured:
            break
    return Q @ V[:, -rank:].flip(-1).to(Q.dtype)


@register_projector("svd")
class SVDProjector(Projector):
    """The top-``rank`` left and/or right singular vectors of the gradient
    (:func:`leading_subspace`, seeded per parameter and step)."""

    def _renew(self, grad: torch.Tensor, step: int) -> None:
        g = torch.Generator(device=grad.device).manual_seed(self.seed * 100_003 + step)
        for side in self.sides:
            self.state[f"proj_{side}"] = leading_subspace(grad, self.rank, side, generator=g).contiguous()


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore projection (projector ``"svd"``); see :class:`ProjectedAdamW`.

    Example::

        opt = GaLoreAdamW(model, lr=1e-3, rank=64, update_proj_gap=200, scale=0.25)
    """

    default_projector = "svd"


__all__ = ["GaLoreAdamW", "SVDProjector", "leading_subspace", "subspace_method"]
