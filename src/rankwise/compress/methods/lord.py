"""``lord``: one-shot low-rank decomposition by PCA of the layer outputs (LoRD, Kaushal et al.
2023, Sec. 3; the output-feature PCA of "atomic feature mimicking", Yu & Wu 2023).

For calibration inputs ``X (in, tokens)`` the layer outputs are ``Y = W X``. LoRD keeps the
top-``r`` principal directions of the outputs: ``U_r`` = top eigenvectors of
``Y Yᵀ = W G Wᵀ`` (``G = X Xᵀ``, the calibration Gram) and replaces ``W`` by the projection
``Ŵ = U_r U_rᵀ W`` — stored as ``up = U_r (out, r)``, ``down = U_rᵀ W (r, in)``. Among all
rank-``r`` ``Ŵ`` it minimises the output error ``‖(W − Ŵ) X‖_F``, and that error is
``Σ_{i>r} λ_i`` (the discarded output variance).

Relation to ``svdllm``: with ``G = L Lᵀ`` full rank, ``W L = P Σ Qᵀ`` gives ``W G Wᵀ = P Σ² Pᵀ``,
so LoRD's ``U_r = P_r`` and ``P_r P_rᵀ W = P_r Σ_r Q_rᵀ L⁻¹`` — the same matrix as SVD-LLM's
truncation, reached from the output side. The differences are numerical: LoRD never inverts
the whitening factor, so it needs no damping and stays exact when ``G`` is singular (fewer
tokens than channels, dead channels), where SVD-LLM's damped Cholesky perturbs the answer;
and it keeps ``down = U_rᵀ W`` in the original weight's row space. Here ``W L`` is formed with
``L = Q Λ^½`` from an eigendecomposition of ``G`` (so no Cholesky is needed and ``Y Yᵀ`` is
never squared), and its left singular vectors are the output principal directions.

The Decomposition contract (``W ≈ U diag(S) Vh``) holds with ``U = P``, ``S = √λ``,
``Vh = diag(S)⁻¹ Pᵀ W``; ``refine`` returns the un-scaled ``(P_r, P_rᵀ W)`` form. Outputs
are not mean-centred (the calibration keeps ``Σ x xᵀ`` but not ``Σ x``), so this is the
second-moment PCA; for zero-bias layers (every Llama projection) centring would need a bias
the compressed layer does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.compress.base import CompressionMethod, Decomposition, register_method
from rankwise.compress.calibrate import LayerStats
from rankwise.errors import ConfigError, ShapeError


def output_principal_directions(
    weight: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P (out, k), σ (k,))``: eigenvectors and root-eigenvalues of ``W G Wᵀ``, descending.

    Computed as the SVD of ``W Q Λ^½`` with ``G = Q Λ Qᵀ`` (negative round-off eigenvalues
    clamped to 0), float64; ``k = min(out, in)``.
    """
    if weight.ndim != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ShapeError(
            f"weight (out, in) and gram (in, in) do not fit: {tuple(weight.shape)}, {tuple(gram.shape)}"
        )
    g = gram.to(torch.float64)
    if not torch.isfinite(g).all():
        raise ShapeError("input Gram matrix contains NaN/Inf")
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    root = evecs * evals.clamp(min=0).sqrt()  # (in, in), root rootᵀ = G
    p, s, _ = torch.linalg.svd(weight.to(torch.float64) @ root, full_matrices=False)
    return p, s


@register_method
@dataclass(frozen=True)
class LoRD(CompressionMethod):
    """Output-PCA projection ``Ŵ = U_r U_rᵀ W``, ``U_r`` = top eigenvectors of ``W G Wᵀ``."""

    name = "lord"
    summary = (
        "LoRD: project W onto the top principal directions of its calibrated outputs (LoRD 2023)"
    )
    needs = frozenset({"gram"})

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        if stats is None or stats.gram is None:
            raise ConfigError("lord needs calibration statistics (gram); none were given")
        p, s = output_principal_directions(weight, stats.gram)
        coords = p.T @ weight  # (k, in): the weight in the output principal basis
        floor = float(s[0]) * 1e-12 if float(s[0]) > 0 else 1.0
        return Decomposition(p, s, coords / s.clamp(min=floor)[:, None])

    def refine(
        self, weight: torch.Tensor, stats: LayerStats | None, up: torch.Tensor, down: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        basis, _ = torch.linalg.qr(up.to(torch.float64))  # (out, r), spans P_r
        return basis, basis.T @ weight.to(torch.float64)
