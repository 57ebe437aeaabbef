"""``svdllm``: truncation-aware data whitening plus a closed-form update (SVD-LLM, Wang et al.
2024, Sec. 3.1 and Alg. 1–2; the least-squares update follows SVD-LLM v2's idea).

With the calibration Gram ``G = Σ x xᵀ = L Lᵀ`` (damped, float64, lower Cholesky ``L``),
``‖(W − Ŵ) X‖_F = ‖(W − Ŵ) L‖_F``, so the SVD ``W L = P Σ Qᵀ`` truncated at ``r`` is the
optimal rank-``r`` layer for the calibration inputs, and ``Σ[r:]`` gives its output error in
closed form (what the global allocator reads). ``Ŵ = (P_r Σ_r)(Q_rᵀ L⁻¹)``, with ``L⁻¹``
applied by a triangular solve.

Update (``update=True``): with ``V`` fixed, the ``U`` minimising ``‖W X − U V X‖_F`` is
``U = W G Vᵀ (V G Vᵀ)⁻¹`` (solved by Cholesky). For an undamped ``G`` it equals the
truncated ``P_r Σ_r``; it corrects the error the damping introduces when ``G`` is
ill-conditioned (fewer tokens than channels, near-dead channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.compress.base import (
    CompressionMethod,
    Decomposition,
    damped_cholesky,
    least_squares_up,
    register_method,
    weighted_svd,
)
from rankwise.compress.calibrate import LayerStats
from rankwise.errors import ConfigError


def _gram(stats: LayerStats | None) -> torch.Tensor:
    if stats is None or stats.gram is None:
        raise ConfigError("svdllm needs calibration statistics (gram); none were given")
    return stats.gram


@register_method
@dataclass(frozen=True)
class SVDLLM(CompressionMethod):
    """Whitened SVD of ``W L`` (``L Lᵀ = XᵀX + λI``) and an optional least-squares ``U`` update."""

    damp: float = 1e-4
    update: bool = True

    name = "svdllm"
    summary = "SVD-LLM: Cholesky-whitened SVD + closed-form U update (SVD-LLM 2024)"
    needs = frozenset({"gram"})

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"svdllm damp must be in (0, 1); got {self.damp}")

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        return weighted_svd(weight, right=damped_cholesky(_gram(stats), damp=self.damp))

    def refine(
        self, weight: torch.Tensor, stats: LayerStats | None, up: torch.Tensor, down: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.update:
            return up, down
        return least_squares_up(weight, down, _gram(stats)), down
