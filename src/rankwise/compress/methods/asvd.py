"""``asvd``: activation-aware SVD (ASVD, Yuan et al. 2023, Sec. 3.2).

Input channels with large activations matter more. With ``s = mean|x|^α`` per input channel
(shape ``(in,)``), take the SVD of ``W diag(s)`` and fold ``diag(s)⁻¹`` back into ``V``:
``Ŵ = U_r Σ_r (V_rᵀ diag(s)⁻¹)``, which minimises ``‖(W − Ŵ) diag(s)‖_F``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.compress.base import CompressionMethod, Decomposition, register_method, weighted_svd
from rankwise.compress.calibrate import LayerStats
from rankwise.errors import ConfigError


@register_method
@dataclass(frozen=True)
class ActivationAwareSVD(CompressionMethod):
    """SVD of ``W diag(mean|x|^alpha)``; ``alpha`` (0.5 in the paper) sets the scaling strength."""

    alpha: float = 0.5

    name = "asvd"
    summary = "activation-aware SVD: scale input channels by mean|x|^alpha (ASVD 2023)"
    needs = frozenset({"abs_mean"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"asvd alpha must be in [0, 2]; got {self.alpha}")

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        if stats is None:
            raise ConfigError("asvd needs calibration statistics (abs_mean); none were given")
        scale = stats.abs_mean.to(weight).pow(self.alpha)  # (in,)
        floor = scale[scale > 0].min() if bool((scale > 0).any()) else torch.ones((), dtype=weight.dtype)
        return weighted_svd(weight, right=scale.clamp(min=float(floor) * 1e-3))
