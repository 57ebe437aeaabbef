"""SaRA's training rules: a nuclear-norm penalty on the sparse update, and progressive reselection.

"SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
Adaptation", Hu et al. 2024 (the adapter is ``methods/sara.py``; this rule comes on with it).

- Low-rank constraint: the loss gets ``λ ||ΔW||_*`` per layer. Its (sub)gradient with respect
  to ``ΔW`` is ``U Vᵀ`` over the non-zero singular values of ``ΔW = U Σ Vᵀ``, and ``ΔW``
  holds ``values`` at ``index``, so after backward the rule adds ``λ (U Vᵀ)[index]`` to the
  values' gradient (:meth:`SaraRule.after_backward`; every ``svd_every`` steps).
- Progressive adjustment: after ``progressive_at`` of the steps every adapter reselects
  (:meth:`~rankwise.adapters.methods.sara.SaraAdapter.reselect`: what was learned stays,
  frozen; the now-smallest ``|W + ΔW|`` entries train next, their optimizer state reset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.adapters.base import Adapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class SaraRuleConfig(RuleConfig):
    """``nuclear_weight``: λ; ``svd_every``: steps between penalty gradients (1: every step);
    ``progressive_at``: the share of the steps after which to reselect (None: never)."""

    nuclear_weight: float = 1e-3
    svd_every: int = 1
    progressive_at: float | None = 0.5

    def validate(self) -> None:
        if not (math.isfinite(self.nuclear_weight) and self.nuclear_weight >= 0):
            raise ConfigError(f"sara: nuclear_weight must be >= 0, got {self.nuclear_weight!r}")
        if self.svd_every < 1:
            raise ConfigError(f"sara: svd_every must be >= 1, got {self.svd_every!r}")
        if self.progressive_at is not None and not 0 < self.progressive_at < 1:
            raise ConfigError(
                f"sara: progressive_at must be in (0, 1) or None (no reselection), got "
                f"{self.progressive_at!r}"
            )


def nuclear_subgradient(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """``U Vᵀ`` over the singular values above ``rtol · σ_max``: a subgradient of ``||·||_*``
    (zero for a zero matrix)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return torch.zeros_like(matrix, dtype=torch.float32)
    keep = s > rtol * s[0]
    return u[:, keep] @ vh[keep]


def nuclear_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.float(), ord="nuc"))


@register_rule("sara")
class SaraRule(TrainingRule):
    """SaRA: nuclear-norm penalty on the sparse update, progressive reselection (Hu et al. 2024)"""

    config_class = SaraRuleConfig
    works_with = "method 'sara' only (switched on with it)"
    implied_by = ("sara",)

    def applies_to(self, adapter: Adapter) -> str | None:
        if adapter.method != "sara":
            return "it penalises and reselects SaRA's sparse update"
        return None

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        at = self.config.progressive_at
        self.reselect_after = None if at is None else max(1, round(at * steps))
        self.reselected = False

    def after_backward(self, step: int) -> None:
        lam = self.config.nuclear_weight
        if lam == 0 or step % self.config.svd_every:
            return
        for adapter in self.adapters.values():
            values = adapter.values
            if values.grad is None:
                continue
            sub = nuclear_subgradient(adapter.delta_weight()).flatten()[adapter.index.long()]
            values.grad.add_(sub.to(values.grad.dtype), alpha=lam)

    def after_optimizer_step(self, step: int) -> None:
        if self.reselected or self.reselect_after is None or step + 1 != self.reselect_after:
            return
        for adapter in self.adapters.values():
            adapter.reselect()
            if self.optimizer is not None:
                self.optimizer.state.pop(adapter.values, None)  # fresh moments for new entries
        self.reselected = True

    def state_dict(self) -> dict:
        return {"reselected": self.reselected}

    def load_state_dict(self, state) -> None:
        self.reselected = bool(state.get("reselected", False))
