"""TeRA: the update as a random Tucker tensor network whose only trainable parts are vectors.

The weight update ``ΔW`` (out, in) is tensorized into a 4-way tensor ``(o₁, o₂, i₁, i₂)``
(``out = o₁o₂``, ``in = i₁i₂``, each split as close to square as the size allows) and
written as a Tucker network::

    ΔW[(a, b), (c, d)] = s·κ · Σ G[p, q, m, n] (U₁Λ₁)[a, p] (U₂Λ₂)[b, q] (U₃Λ₃)[c, m] (U₄Λ₄)[d, n]

The core ``G`` (r, r, r, r) and the factors ``U_k`` (n_k, r) are frozen random tensors
generated from ``seed`` and shared by every layer with the same mode sizes
(:mod:`rankwise.adapters.random_bases`); only the diagonals ``Λ_k = diag(λ_k)`` train:
``4r`` parameters per layer, while the rank of ``ΔW`` can reach ``min(r², out, in)``
(LoRA's rank for ``r(out + in)`` parameters). ``κ = 1/(r²·√in)`` keeps ``ΔW x`` at unit
scale for unit-variance entries. ``λ₁`` starts at zero (the model starts unchanged), the
others at one. "TeRA: Vector-based Random Tensor Network for High-Rank Adaptation of
Large Language Models", Gu et al. 2025. Choices where the abstract leaves them open: a
4-way tensorization, one Tucker rank ``r`` for every mode, diagonals on the rank side.

The forward contracts ``x`` mode by mode (``T·(in + out)·r + T·r⁴`` multiply-adds for T
tokens; ``ΔW`` is never formed). Linear and transposed-linear (GPT-2 ``Conv1D``) layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import (
    Adapter,
    AdapterConfig,
    LayerView,
    not_linear_reason,
    register_method,
)
from rankwise.adapters.random_bases import SharedBasis
from rankwise.errors import ConfigError

MAX_RANK = 64  # the core is rank⁴ (64⁴ = 16.8M entries)


def split_mode(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = n``, ``a ≤ b`` and ``a`` the largest divisor of ``n`` up to ``√n``."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


@dataclass(frozen=True)
class TeraConfig(AdapterConfig):
    """TeRA options: ``rank`` (the Tucker rank of every mode), ``seed`` (of the frozen
    tensors), alpha, dropout."""

    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.rank > MAX_RANK:
            raise ConfigError(
                f"tera rank={self.rank} is too large: the shared core has rank⁴ = "
                f"{self.rank**4:,} entries; valid: 1..{MAX_RANK}"
            )


@register_method("tera")
class TeraAdapter(Adapter):
    """``ΔW = s·κ·G ×₁ U₁Λ₁ ×₂ U₂Λ₂ ×₃ U₃Λ₃ ×₄ U₄Λ₄``; trains the four diagonals ``λ_k`` (r,)."""

    summary = "TeRA: random Tucker network with trainable diagonals only, high rank (Gu et al. 2025)"
    config_class = TeraConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        reason = not_linear_reason("tera", layer)
        if reason is not None:
            return reason
        return None

    def build(self) -> None:
        r, seed, dev, dt = self.config.rank, self.config.seed, self.layer.device, self.param_dtype
        self.modes = (*split_mode(self.layer.out_features), *split_mode(self.layer.in_features))
        self._factors = [
            SharedBasis((n, r), seed=seed, kind=f"tera_u{k}") for k, n in enumerate(self.modes)
        ]
        self._core = SharedBasis((r, r, r, r), seed=seed, kind="tera_core")
        self.tera_lambda = nn.Parameter(torch.empty(4, r, device=dev, dtype=dt))
        self.kappa = 1.0 / (r * r * math.sqrt(self.layer.in_features))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.tera_lambda.fill_(1.0)
            self.tera_lambda[0].zero_()

    def _scaled(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The core (r², r²) and the four ``U_k Λ_k`` (n_k, r) with the current diagonals."""
        p = self.tera_lambda
        core = self._core.get(p.device, p.dtype)
        r = self.config.rank
        us = [f.get(p.device, p.dtype) * p[k] for k, f in enumerate(self._factors)]
        return core.reshape(r * r, r * r), us

    def apply_update(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale·ΔW x / s`` for ``x`` (..., in), contracted mode by mode (one token-sized
        GEMM per side; the rest are r-sized batched products)."""
        core, (u1, u2, u3, u4) = self._scaled()
        o1, o2, i1, i2 = self.modes
        r = self.config.rank
        lead = x.shape[:-1]
        h = (x.reshape(-1, i2) @ u4).reshape(-1, i1, r)  # over d: (T, i1, r_n)
        h = torch.matmul(u3.t(), h)  # over c: (T, r_m, r_n)
        z = h.reshape(-1, r * r) @ (core.t() * (self.kappa * scale))  # (T, r_p·r_q)
        z = torch.matmul(z.reshape(-1, r, r), u2.t())  # over q: (T, r_p, o2)
        return torch.matmul(u1, z).reshape(*lead, o1 * o2)  # over p: (T, o1, o2)

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.apply_update(x, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        eye = torch.eye(self.layer.in_features, device=self.tera_lambda.device)
        return self.apply_update(eye.to(self.tera_lambda.dtype), self.scaling).float().t()
