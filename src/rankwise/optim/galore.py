"""GaLore: Adam moments in the span of the gradient's leading singular vectors.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al.,
2024). The subspace of each matrix is renewed every ``update_proj_gap`` steps from the
current gradient with :func:`rankwise.linalg.rsvd` (randomized block Krylov, stopping when
one more block would add less than 0.1% of the captured gradient energy) instead of
galore-torch's full ``torch.linalg.svd``.
Parameter-group options are galore-torch's (``rank``, ``update_proj_gap``, ``scale``,
``proj_type``), so ``from rankwise.optim import GaLoreAdamW`` replaces
``from galore_torch import GaLoreAdamW``.
"""

from __future__ import annotations

import torch

from rankwise.linalg import rsvd
from rankwise.optim.base import ProjectedAdamW, Projector, register_projector

# A refresh needs the gradient energy the subspace captures, not each singular value: rsvd
# stops when one more Krylov block would add less than this fraction of it.
ENERGY_RTOL = 1e-3


@register_projector("svd")
class SVDProjector(Projector):
    """The top-``rank`` left and/or right singular vectors of the gradient (by rsvd)."""

    def _renew(self, grad: torch.Tensor, step: int) -> None:
        g = torch.Generator(device=grad.device).manual_seed(self.seed * 100_003 + step)
        U, _, Vh = rsvd(grad.float(), self.rank, accuracy="energy", rtol=ENERGY_RTOL, generator=g)
        if "left" in self.sides:
            self.state["proj_left"] = U.to(grad.dtype).contiguous()
        if "right" in self.sides:
            self.state["proj_right"] = Vh.mT.to(grad.dtype).contiguous()


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore projection (projector ``"svd"``); see :class:`ProjectedAdamW`.

    Example::

        opt = GaLoreAdamW(model, lr=1e-3, rank=64, update_proj_gap=200, scale=0.25)
    """

    default_projector = "svd"


__all__ = ["GaLoreAdamW", "SVDProjector"]
