"""FRUGAL: Adam inside the projected subspace, state-free signSGD on the rest.

"FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training"
(Zmushko et al., 2024): the gradient is split into its projection ``P Pᵀ G`` (updated by
Adam, whose moments live in the subspace as in GaLore) and the residual ``G - P Pᵀ G``,
updated by signSGD, which needs no state. The update is full-rank at GaLore's memory.
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim.base import ProjectedAdamW


class FrugalAdamW(ProjectedAdamW):
    """GaLore-style projected AdamW plus ``lr · free_scale · sign(residual)``.

    ``free_scale`` (a parameter-group option, default 1.0) scales the state-free step
    relative to ``lr``. With the identity projector the residual is zero and this is AdamW.
    """

    default_projector = "svd"
    extra_options = {"free_scale": 1.0}

    def _write(
        self,
        p: torch.Tensor,
        update: torch.Tensor,
        step_size: float,
        state: dict,
        group: dict,
        **context: Any,
    ) -> None:
        super()._write(p, update, step_size, state, group)
        residual = context["grad"] - context["proj"].lift(context["low"])
        p.add_(residual.sign_(), alpha=-group["lr"] * group["free_scale"])


__all__ = ["FrugalAdamW"]
