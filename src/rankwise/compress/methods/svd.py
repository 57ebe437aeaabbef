"""``svd``: plain truncated SVD of the weight (Eckart–Young), the data-free baseline.

``W ≈ U_r Σ_r V_rᵀ`` minimises ``‖W − Ŵ‖_F``; it ignores which input directions the layer
actually sees, which is why it collapses on LLMs at moderate ratios (SVD-LLM 2024, Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.compress.base import CompressionMethod, Decomposition, register_method, weighted_svd
from rankwise.compress.calibrate import LayerStats


@register_method
@dataclass(frozen=True)
class TruncatedSVD(CompressionMethod):
    """Truncated SVD of the raw weight; needs no calibration data."""

    name = "svd"
    summary = "plain truncated SVD of W (data-free baseline)"
    needs = frozenset()

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        return weighted_svd(weight)
