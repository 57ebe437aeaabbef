"""``fwsvd``: Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with
weighted low-rank factorization", Eq. 5–6).

The Fisher information of weight ``W_ij`` is estimated by squared gradients of the LM loss;
FWSVD sums it per output row, ``I_i = Σ_j (∂L/∂W_ij)²`` (shape ``(out,)``), and solves
``min ‖diag(√I) (W − Ŵ)‖_F`` by an SVD of ``diag(√I) W``, folding ``diag(√I)⁻¹`` into ``U``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.compress.base import CompressionMethod, Decomposition, register_method, weighted_svd
from rankwise.compress.calibrate import LayerStats
from rankwise.errors import ConfigError


@register_method
@dataclass(frozen=True)
class FisherWeightedSVD(CompressionMethod):
    """SVD of ``diag(√I) W`` with row-wise Fisher importance ``I`` from calibration gradients."""

    name = "fwsvd"
    summary = "Fisher-weighted SVD: rows weighted by squared LM-loss gradients (FWSVD 2022)"
    needs = frozenset({"fisher"})

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        if stats is None or stats.fisher_rows is None:
            raise ConfigError("fwsvd needs Fisher statistics (calibrate with 'fisher'); none were given")
        importance = stats.fisher_rows.to(weight).sqrt()  # (out,)
        if not bool((importance > 0).any()):
            raise ConfigError("fwsvd: every gradient of this layer is zero; the calibration loss did not reach it")
        floor = float(importance[importance > 0].min()) * 1e-3
        return weighted_svd(weight, left=importance.clamp(min=floor))
