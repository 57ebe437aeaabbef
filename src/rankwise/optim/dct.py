"""DCT projection: an SVD-free GaLore whose subspace is a set of DCT-II basis columns.

"SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models" (2025): the
orthonormal DCT-II basis of each size is built once and shared by every layer; a refresh
costs one product and a top-k (the columns most aligned with the gradient, chosen by
:func:`rankwise.linalg.dct_select`), and each layer stores only the chosen column indices.
"""

from __future__ import annotations

import torch

from rankwise.linalg.dct import dct_basis, dct_select
from rankwise.optim.base import ProjectedAdamW, Projector, register_projector

# (n, dtype, device) -> the (n, n) DCT-II basis, shared by every layer and optimizer.
_BASES: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def shared_basis(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The (n, n) orthonormal DCT-II basis, built once per size, dtype and device."""
    key = (n, dtype, str(device))
    if key not in _BASES:
        _BASES[key] = dct_basis(n, dtype=dtype, device=device)
    return _BASES[key]


@register_projector("dct")
class DCTProjector(Projector):
    """The ``rank`` DCT-II columns carrying most of the gradient's energy (adaptive)."""

    def has_basis(self) -> bool:
        return all(f"proj_{side}_idx" in self.state for side in self.sides)

    def _full(self, side: str, like: torch.Tensor) -> torch.Tensor:
        d = self.shape[0] if side == "left" else self.shape[1]
        return shared_basis(d, like.dtype, like.device)

    def _renew(self, grad: torch.Tensor, step: int) -> None:
        for side in self.sides:
            sel = dct_select(grad, self.rank, side=side, basis=self._full(side, grad))
            self.state[f"proj_{side}_idx"] = sel.indices

    def basis(self, side: str, like: torch.Tensor) -> torch.Tensor:
        return self._full(side, like).index_select(1, self.state[f"proj_{side}_idx"])


class DCTAdamW(ProjectedAdamW):
    """AdamW with DCT projection (projector ``"dct"``); see :class:`ProjectedAdamW`.

    :meth:`state_bytes` counts the shared bases once (they replace GaLore's per-layer P).
    """

    default_projector = "dct"

    def _shared_bytes(self) -> int:
        sizes = {(d, p.dtype, str(p.device)) for p in self._rank for d in p.shape}
        return sum(_BASES[k].numel() * _BASES[k].element_size() for k in sizes if k in _BASES)


__all__ = ["DCTAdamW", "DCTProjector", "shared_basis"]
