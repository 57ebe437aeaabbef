"""GradNormLoRP: weight-normalised parameters, low-rank projected direction updates.

"Gradient Weight-normalized Low-rank Projection for Efficient LLM Training" (Huang et
al., 2024): each weight is reparametrised as ``W = g · V / ‖V‖`` (one magnitude per
output row, as ``torch.nn.utils.parametrizations.weight_norm`` with ``dim=0``), which
conditions the gradient better; the direction ``V`` is trained with GaLore's projected
Adam, the magnitudes ``g`` with plain Adam. Here the reparametrisation lives inside the
optimizer: the model keeps an ordinary ``W``, the state holds ``g`` and ``‖V‖`` (one
number per row each), and ``V = ‖V‖ · W / g`` is rebuilt when needed, so nothing in the
model changes and the state stays O(rows + rank).
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim.base import ProjectedAdamW, _moments, adam_direction


class GradNormLoRPAdamW(ProjectedAdamW):
    """GaLore on the direction of a weight-normalised matrix; Adam on its row norms.

    With the identity projector and full rank this is exactly AdamW on
    ``weight_norm(W)``'s two parameters ``(g, V)``.
    """

    default_projector = "svd"

    def _prepare(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        """∂L/∂V from ∂L/∂W: ``(g/‖V‖)(G - v̂ (v̂·G))`` per row; keeps ∂L/∂g = v̂·G."""
        if "wn_g" not in state:  # weight_norm's start: V = W, g = ‖W_row‖
            norm = torch.linalg.vector_norm(p, dim=1)
            state["wn_g"], state["wn_norm"] = norm.clone(), norm.clone()
        g = state["wn_g"]
        unit = p / _nonzero(g).unsqueeze(1)  # v̂ = W / g, rows of norm 1
        grad_g = (unit * grad).sum(1)
        state["_grad_g"] = grad_g  # consumed by _write in the same step
        return (g / _nonzero(state["wn_norm"])).unsqueeze(1) * (grad - unit * grad_g.unsqueeze(1))

    def _write(
        self,
        p: torch.Tensor,
        update: torch.Tensor,
        step_size: float,
        state: dict,
        group: dict,
        **context: Any,
    ) -> None:
        g, vnorm = state["wn_g"], state["wn_norm"]
        V = p * (vnorm / _nonzero(g)).unsqueeze(1)
        decay = 1 - group["lr"] * group["weight_decay"]
        V.mul_(decay).add_(update, alpha=-step_size)
        grad_g = state.pop("_grad_g")
        g.mul_(decay)
        direction, size_g = adam_direction(
            *_moments(state, g, "wn_g_"), grad_g, int(state["step"].item()), group
        )
        g.add_(direction, alpha=-size_g)
        vnorm.copy_(torch.linalg.vector_norm(V, dim=1))
        p.copy_(V * (g / _nonzero(vnorm)).unsqueeze(1))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with exact zeros replaced by the smallest normal number (a zero row stays zero)."""
    return torch.where(x == 0, torch.finfo(x.dtype).tiny, x)


__all__ = ["GradNormLoRPAdamW"]
