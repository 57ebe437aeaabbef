"""ALLoRA: a per-row learning rate inversely proportional to the row's norm; no dropout, no scale.

"ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", Huang & Balestriero 2024. Each
row ``θ_i`` of every trainable adapter matrix (the ``r`` rows of ``A``, the ``out`` rows of
``B``) trains with its own learning rate, the optimizer's times::

    c_i = 1 / sqrt(||θ_i||² + 1/η²)

which is ``η`` for a zero row (so ``B`` escapes its zero start quickly) and ``≈ 1/||θ_i||``
once the row has grown (large rows slow down: the regulariser that replaces dropout). The
rule multiplies the optimizer's step on each row by ``c_i`` (the norm taken before the step):
with SGD that is the paper's gradient scaling; with Adam, which divides a scaled gradient's
scale back out, scaling the step is what keeps the per-row rate. Vectors (DoRA's magnitude,
SoRA's gate) keep the optimizer's rate.

ALLoRA is dropout-free and scaling-free: an adapter with ``dropout > 0`` or a scale other
than 1 (``alpha != rank``, or ``use_rslora``) is a ConfigError naming the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.adapters.base import Adapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class AlloraConfig(RuleConfig):
    """``eta``: the rate multiplier of a zero-norm row (the paper's η)."""

    eta: float = 1.0

    def validate(self) -> None:
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ConfigError(f"allora: eta must be a positive number, got {self.eta!r}")


def row_rates(matrix: torch.Tensor, eta: float) -> torch.Tensor:
    """``1 / sqrt(||row||² + 1/η²)`` for each row of ``matrix`` (any shape; rows = dim 0)."""
    sq = matrix.detach().float().reshape(matrix.shape[0], -1).square().sum(dim=1)
    return torch.rsqrt(sq + 1.0 / eta**2)


@register_rule("allora")
class AlloraRule(TrainingRule):
    """ALLoRA: per-row learning rate 1/sqrt(||row||² + 1/η²); no dropout, no scaling (Huang & Balestriero 2024)"""

    config_class = AlloraConfig
    works_with = (
        "methods with trainable factor matrices (lora, dora, dylora, sora, ...) at dropout=0 "
        "and scale 1 (alpha = rank, no use_rslora)"
    )

    def applies_to(self, adapter: Adapter) -> str | None:
        c = adapter.config
        if c.dropout > 0:
            return f"ALLoRA is dropout-free, the adapter has dropout={c.dropout}; set -o dropout=0"
        if not math.isclose(adapter.scaling, 1.0):
            return (
                f"ALLoRA is scaling-free, the adapter's scale is {adapter.scaling:g}; "
                "leave alpha at the rank (no --alpha) and use_rslora off"
            )
        if not self._matrices(adapter):
            return "it has no trainable matrix to give per-row learning rates"
        return None

    @staticmethod
    def _matrices(adapter: Adapter) -> list[torch.nn.Parameter]:
        return [p for p in adapter.parameters() if p.requires_grad and p.dim() >= 2]

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        self._params = [p for a in self.adapters.values() for p in self._matrices(a)]
        self._before: list[torch.Tensor] = []

    def before_optimizer_step(self, step: int, lr: float) -> None:
        self._before = [p.detach().clone() for p in self._params]

    def after_optimizer_step(self, step: int) -> None:
        eta = self.config.eta
        with torch.no_grad():
            for p, old in zip(self._params, self._before, strict=True):
                rate = row_rates(old, eta).to(p.dtype).view(-1, *(1,) * (p.dim() - 1))
                p.copy_(old + rate * (p - old))
        self._before = []
