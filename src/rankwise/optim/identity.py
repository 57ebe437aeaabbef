"""The identity projector: no projection at all (a baseline, and the exactness check that
the shared update is AdamW's; ``rank`` is ignored)."""

from __future__ import annotations

import torch

from rankwise.optim.base import Projector, register_projector


@register_projector("identity")
class IdentityProjector(Projector):
    """``project(G) = G``, ``project_back(U) = scale · U``; never refreshes."""

    def has_basis(self) -> bool:
        return True

    def _renew(self, grad: torch.Tensor, step: int) -> None:  # never due
        return None

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def lift(self, low: torch.Tensor) -> torch.Tensor:
        return low


__all__ = ["IdentityProjector"]
