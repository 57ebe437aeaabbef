"""TriAdaptLoRA: a triangular (L·U) core between LoRA's factors, and threshold-driven rank growth.

"TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning", Liang et al. 2025. Three parts, as rankwise implements them:

1. Triangular split: the update is ``ΔW = s · B_k (L_k U_k) A_k`` with a lower-triangular
   ``L`` and an upper-triangular ``U`` (both start as the identity, so the method starts as
   LoRA). The leading ``k × k`` block of ``L U`` depends only on the leading blocks of ``L``
   and ``U``: growing from rank ``k`` to ``k+1`` adds one row of ``L`` and one column of
   ``U`` and leaves everything learned so far exactly as it was.
2. Importance: each layer's normalised Frobenius norm ``||ΔW||_F / sqrt(out · in)``, divided by
   the largest over the layers, so scores lie in [0, 1] (no gradients needed).
3. Adaptive growth with a dynamic threshold: at each growth event the layers whose score is
   at least ``τ`` grow; ``τ`` falls from 1 towards 0 over the growth window
   (``threshold="linear"``, the paper's best, or ``"exponential"``), within the total budget
   ``target_rank × layers``. An event hands out ``ceil(budget left / events left)``
   components to the layers over ``τ``, one each in score order and again from the top while
   some are left, so the budget is reached by the end of the window (one component per layer
   per event could not reach it in a short run: the 40-step bench ended at 332 of 480).

The scale follows the active rank (``alpha / k``) and a growing layer's ``B`` is rescaled to
keep its output, as in IncreLoRA (``increlora.py``).

Growth runs in the ``rank_growth`` training rule (``rules/growth.py``), switched on with the
method. Saved in rankwise's format (PEFT has no TriAdaptLoRA), active ranks included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import register_method
from rankwise.adapters.methods.increlora import GrowingLoraAdapter, GrowthConfig, hand_out
from rankwise.errors import ConfigError

THRESHOLDS = ("linear", "exponential")


@dataclass(frozen=True)
class TriAdaptConfig(GrowthConfig):
    """``threshold``: how τ falls over the growth window, "linear" or "exponential"."""

    threshold: str = "linear"

    def validate(self) -> None:
        super().validate()
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"threshold must be one of {list(THRESHOLDS)}, got {self.threshold!r}")


def threshold_at(progress: float, kind: str) -> float:
    """τ at ``progress`` ∈ [0, 1] of the growth window: 1 → 0 linearly, or ``exp(-5 p)``."""
    return 1.0 - progress if kind == "linear" else math.exp(-5.0 * progress)


@register_method("triadapt")
class TriAdaptAdapter(GrowingLoraAdapter):
    """``ΔW = s · B_k L_k U_k A_k`` with rank k grown where the normalised update norm is high."""

    summary = "TriAdaptLoRA: LoRA with a triangular L·U core and threshold-driven rank growth (Liang et al. 2025)"
    config_class = TriAdaptConfig

    def build(self) -> None:
        super().build()
        r, dev, dt = self.config.rank, self.layer.device, self.param_dtype
        self.tri_L = nn.Parameter(torch.empty(r, r, device=dev, dtype=dt))
        self.tri_U = nn.Parameter(torch.empty(r, r, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.eye_(self.tri_L)
        nn.init.eye_(self.tri_U)

    def core(self, k: int) -> torch.Tensor:
        """``L_k U_k`` with the triangles enforced (entries outside them never train)."""
        return self.tri_L[:k, :k].tril() @ self.tri_U[:k, :k].triu()

    def parameters_in_use(self) -> int:
        """``k · (in + out)`` plus the two ``k × k`` triangles (``k (k + 1)``)."""
        k = self.active_rank
        return super().parameters_in_use() + k * (k + 1)

    @property
    def score(self) -> float:
        """``||ΔW||_F / sqrt(out · in)`` (before normalising across layers)."""
        with torch.no_grad():
            dw = self.delta_weight()
        return float(dw.norm()) / math.sqrt(dw.numel())

    @classmethod
    def plan_growth(
        cls, adapters: Mapping[str, GrowingLoraAdapter], budget: int, events_left: int, progress: float
    ) -> list[str]:
        """``ceil(budget / events_left)`` components for the layers whose max-normalised score
        is at least τ(progress): one each, highest first, again from the top while some are
        left and those layers have room."""
        if not adapters:
            return []
        scores = {p: a.score for p, a in adapters.items()}
        top = max(scores.values())
        if top <= 0:
            return []
        tau = threshold_at(progress, adapters[next(iter(adapters))].config.threshold)
        over = sorted((p for p, s in scores.items() if s / top >= tau), key=scores.get, reverse=True)
        return hand_out(adapters, over, math.ceil(budget / max(1, events_left)))
