"""M-FAC: matrix-free inverse-Fisher-vector products ("M-FAC: Efficient Matrix-Free
Approximations of Second-Order Information", Frantar, Kurtic & Alistarh, 2021).

The empirical Fisher of ``m`` gradients ``g_i`` (d each), dampened,

    F = λ I + (1/m) Σ_i g_i g_iᵀ,

is never formed (d can be millions). Applying Sherman–Morrison once per gradient gives
``F⁻¹ = I/λ − Σ_i v_i v_iᵀ / (m + g_iᵀ v_i)`` with ``v_i = F_{i-1}⁻¹ g_i``; every ``v_i`` is a
combination of the gradients, ``V = B G`` with ``B`` lower-triangular (m × m), and ``B``
follows from the m × m Gram matrix ``K = G Gᵀ`` alone. So:

- :meth:`MFAC.ifvp` ``F⁻¹ x`` costs ``O(d m + m²)``;
- :meth:`MFAC.update` (the paper's dynamic algorithm: a sliding window of the last ``m``
  gradients) replaces the oldest gradient: one row of ``K`` in ``O(d m)``, ``B`` in ``O(m³)``;
- :meth:`MFAC.inverse_diagonal` ``diag(F⁻¹)`` costs ``O(d m)`` (the Optimal-Brain-Surgeon
  saliency ``w_j² / (2 [F⁻¹]_jj)`` of each weight needs it);
- :meth:`MFAC.quadratic_form` ``xᵀ F x = λ‖x‖² + ‖G x‖² / m`` costs ``O(d m)`` (the
  second-order loss increase ``½ xᵀ F x`` of a perturbation ``x``; the ``mfac`` rank
  allocator of :mod:`rankwise.compress.allocate` reads it).

The order of the gradients does not change ``F``, so the window is a ring buffer.
Everything is computed in float64.
"""

from __future__ import annotations

import torch

from rankwise.errors import ConfigError, ShapeError


class MFAC:
    """Inverse of the dampened empirical Fisher of a window of gradients, applied matrix-free.

    ``MFAC(grads, damp=1e-4)`` with ``grads`` (m, d) fills the window at once; ``MFAC(dim=d,
    window=m)`` starts empty and :meth:`update` adds gradients one at a time.
    """

    def __init__(
        self,
        grads: torch.Tensor | None = None,
        *,
        damp: float = 1e-4,
        window: int | None = None,
        dim: int | None = None,
    ) -> None:
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
            raise ConfigError(f"damp must be a positive number (the λ of λI + F), got {damp!r}")
        if grads is not None:
            if not isinstance(grads, torch.Tensor) or grads.ndim != 2 or grads.numel() == 0:
                got = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
                raise ShapeError(f"MFAC: grads must be a non-empty (m, d) tensor of gradients, got {got}")
            window = grads.shape[0] if window is None else window
            dim = grads.shape[1]
        if window is None or dim is None:
            raise ConfigError("MFAC needs grads (m, d), or both window= and dim= to start empty")
        for name, value in (("window", window), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MFAC: {name} must be a positive integer, got {value!r}")
        self.damp = float(damp)
        self.G = torch.zeros(window, dim, dtype=torch.float64)
        self.K = torch.zeros(window, window, dtype=torch.float64)
        self.count = 0  # gradients in the window (<= window)
        self._next = 0  # ring-buffer slot the next gradient replaces
        self._B: torch.Tensor | None = None
        self._denom: torch.Tensor | None = None
        if grads is not None:
            if grads.shape[0] > window:
                raise ConfigError(f"MFAC: {grads.shape[0]} gradients do not fit a window of {window}")
            self._check_vector(grads, "grads")
            n = grads.shape[0]
            self.G[:n] = grads.double()
            self.K[:n, :n] = self.G[:n] @ self.G[:n].T
            self.count = n
            self._next = n % window
            self._refresh()

    @property
    def window(self) -> int:
        return self.G.shape[0]

    @property
    def dim(self) -> int:
        return self.G.shape[1]

    def _check_vector(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"MFAC: {name} must have last dimension {self.dim}, got {got}")
        if not bool(torch.isfinite(x).all()):
            raise ShapeError(f"MFAC: {name} holds NaN or Inf values")

    def _refresh(self) -> None:
        """Recompute ``B`` and the Sherman–Morrison denominators from ``K`` (O(m³))."""
        n, lam = self.count, self.damp
        K = self.K[:n, :n]
        B = torch.zeros(n, n, dtype=torch.float64)
        denom = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            coeffs = (B[:i] @ K[:, i]) / denom[:i]  # v_jᵀ g_i / (m + g_jᵀ v_j), j < i
            B[i] = -(coeffs @ B[:i])
            B[i, i] += 1.0 / lam
            denom[i] = n + B[i] @ K[:, i]
        self._B, self._denom = B, denom

    def update(self, grad: torch.Tensor) -> None:
        """Add one gradient (d,), replacing the oldest once the window is full."""
        self._check_vector(grad, "grad")
        if grad.ndim != 1:
            raise ShapeError(f"MFAC.update takes one gradient (d,), got {tuple(grad.shape)}")
        slot = self._next
        g = grad.double()
        self.G[slot] = g
        self.count = min(self.count + 1, self.window)
        row = self.G[: self.count] @ g  # O(d m)
        self.K[slot, : self.count] = row
        self.K[: self.count, slot] = row
        self._next = (slot + 1) % self.window
        self._refresh()

    def ifvp(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x`` for ``x`` (..., d), in x's dtype."""
        self._check_vector(x, "x")
        xd = x.double()
        out = xd / self.damp
        if self.count:
            G = self.G[: self.count]
            q = xd @ G.T  # (..., n) = G x
            r = (q @ self._B.T) / self._denom  # (..., n) = (B G x) / denom
            out = out - (r @ self._B) @ G
        return out.to(x.dtype) if x.is_floating_point() else out

    def quadratic_form(self, x: torch.Tensor) -> torch.Tensor:
        """``xᵀ F x`` for every vector of ``x`` (..., d): shape ``x.shape[:-1]``, float64."""
        self._check_vector(x, "x")
        xd = x.double()
        out = self.damp * xd.square().sum(-1)
        if self.count:
            out = out + (xd @ self.G[: self.count].T).square().sum(-1) / self.count
        return out

    def inverse_diagonal(self) -> torch.Tensor:
        """``diag(F⁻¹)`` (d,), float64."""
        diag = torch.full((self.dim,), 1.0 / self.damp, dtype=torch.float64)
        if self.count:
            V = self._B @ self.G[: self.count]  # (n, d) the v_i
            diag -= (V.square() / self._denom[:, None]).sum(0)
        return diag

    def dense(self) -> torch.Tensor:
        """The Fisher ``λI + (1/m) Gᵀ G`` as a dense (d, d) matrix (small d only: for checks)."""
        G = self.G[: self.count]
        n = max(self.count, 1)
        return torch.eye(self.dim, dtype=torch.float64) * self.damp + G.T @ G / n


__all__ = ["MFAC"]
