"""NOLA: LoRA's factors as learned linear combinations of fixed random matrices.

``ΔW = s · B A`` with ``A = Σ_{j<k_a} β_j A_j`` (r, in) and ``B = Σ_{i<k_b} α_i B_i``
(out, r). The random bases ``A_j``, ``B_i`` are frozen, generated from ``seed`` and shared
by every layer of the same shape (:mod:`rankwise.adapters.random_bases`); only the
``k_a + k_b`` coefficients train, whatever the rank and the layer size, and only they
and the seed are saved. ``α`` starts at zero (the model starts unchanged), ``β`` at
``1/√k_a`` (so ``A`` starts with unit-variance-per-input rows, like LoRA's ``A``).
"NOLA: Networks as Linear Combination of Low Rank Random Basis", Koohpayegani et al.
2023, eq. (2).

Per step ``A`` and ``B`` are formed once (``k·r·(in + out)`` multiply-adds, independent
of the token count), then applied like LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, register_method
from rankwise.adapters.random_bases import SharedBasis
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class NolaConfig(AdapterConfig):
    """NOLA options: ``rank`` (of ``B A``), ``num_basis_a``/``num_basis_b`` (random bases
    per factor = trainable coefficients per factor), ``seed`` (of the bases)."""

    num_basis_a: int = 1024
    num_basis_b: int = 1024
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for name in ("num_basis_a", "num_basis_b"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer (bases per factor), got {value!r}")


@register_method("nola")
class NolaAdapter(Adapter):
    """``ΔW = s · (Σ α_i B_i)(Σ β_j A_j)``, fixed shared random ``A_j``, ``B_i``; trains α, β."""

    summary = "NOLA: LoRA factors as learned mixes of fixed random bases (Koohpayegani et al. 2023)"
    config_class = NolaConfig

    def build(self) -> None:
        c, dev, dt = self.config, self.layer.device, self.param_dtype
        # (k, r, n) layouts: bases are prefixes along k (random_bases tiles dimension 0)
        self._basis_a = SharedBasis((c.num_basis_a, c.rank, self.layer.in_features),
                                    seed=c.seed, kind="nola_a")  # fmt: skip
        self._basis_b = SharedBasis((c.num_basis_b, c.rank, self.layer.out_features),
                                    seed=c.seed, kind="nola_b")  # fmt: skip
        self.nola_alpha = nn.Parameter(torch.empty(c.num_basis_b, device=dev, dtype=dt))
        self.nola_beta = nn.Parameter(torch.empty(c.num_basis_a, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.nola_alpha.zero_()
            self.nola_beta.fill_(1.0 / math.sqrt(self.config.num_basis_a))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (out, r), A (r, in))`` mixed from the bases with the current coefficients."""
        p = self.nola_alpha
        basis_a = self._basis_a.get(p.device, p.dtype)  # (k_a, r, in)
        basis_b = self._basis_b.get(p.device, p.dtype)  # (k_b, r, out)
        fan_a = 1.0 / math.sqrt(self.layer.in_features)  # unit-variance entries -> rows ~ 1/√in
        fan_b = 1.0 / math.sqrt(self.config.rank)
        a = torch.einsum("k,krn->rn", self.nola_beta, basis_a) * fan_a
        b = torch.einsum("k,kro->or", self.nola_alpha, basis_b) * fan_b
        return b, a

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        b, a = self.factors()
        return self.layer.project_out(self.layer.project_in(x, a), b) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        b, a = self.factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return (b.float() @ a.float()) * self.scaling
