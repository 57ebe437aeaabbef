"""``TRPLinear``: Trained Rank Pruning ("Trained Rank Pruning for Efficient Deep Neural
Networks", Xu et al., 2019).

TRP trains the dense weight and alternates two things with ordinary training steps:

- a low-rank projection every ``every`` steps (:meth:`TRPLinear.project`, called by
  :meth:`TRPLinear.after_optimizer_step`): the weight is substituted by its truncated SVD at the
  smallest rank keeping a fraction ``energy`` of ``Σ σ²`` (at most ``rank``), so training keeps
  the full capacity but stays close to low rank;
- a nuclear-norm regulariser, optimised by stochastic sub-gradient descent:
  :meth:`TRPLinear.nuclear_penalty` equals ``‖W‖_* = Σ σ`` and its gradient is the
  sub-gradient ``U Vᵀ`` of the current SVD (no back-propagation through the SVD). Add
  ``λ · nuclear_penalty(model)`` to the loss.

A TRP-trained layer is low-rank by construction, so :meth:`TRPLinear.to_low_rank` turns it
into a :class:`~rankwise.layers.LowRankLinear` with negligible loss and no fine-tuning.

At initialisation the layer equals the original (it holds the same dense weight). Parameters:
``in · out`` (+ ``out`` bias); after :meth:`~TRPLinear.to_low_rank` at rank ``k``:
``k (in + out)`` (+ bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import (
    StructuredLinear,
    check_fraction,
    check_weight,
    register_trainable,
)
from rankwise.layers.lowrank import LowRankLinear, balanced_factors
from rankwise.linalg import energy_rank, truncated_svd


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_trainable("trp")
class TRPLinear(StructuredLinear):
    """A dense ``y = W x + b`` trained with periodic low-rank projection and a nuclear norm.

    Args:
        in_features, out_features: the layer's shape.
        rank: the largest rank a projection keeps (``min(in, out)``: energy alone decides).
        energy: the fraction of ``Σ σ²`` a projection keeps, in ``(0, 1]``.
        every: steps between projections in :meth:`after_optimizer_step`.
        penalty_weight: λ of the nuclear norm that :meth:`penalty` gives a training loop
            (``rankwise.layers.penalty(model)``; ``rankwise pretrain`` adds it to the loss);
            0 (the default): projection only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        energy: float = 0.95,
        every: int = 20,
        penalty_weight: float = 0.0,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.check_rank(rank, in_features, out_features)
        self.energy = check_fraction(name, "energy", energy)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"{name}: every must be an integer >= 1 (steps between projections); got {every!r}")
        self.in_features, self.out_features, self.rank, self.every = in_features, out_features, rank, every
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.projected_rank: int | None = None  # the rank of the last projection
        self.penalty_weight = check_weight(name, "penalty_weight", penalty_weight)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, energy: float = 0.95, every: int = 20,
        penalty_weight: float = 0.0,
    ) -> TRPLinear:
        """A TRP layer holding ``linear``'s weight and bias (equal to it)."""
        layer = cls.shaped_like(linear, rank, energy=energy, every=every, penalty_weight=penalty_weight)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    # ------------------------------------------------------------------ TRP

    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return truncated_svd(self.weight.detach().to(_work_dtype(self.weight)))

    def penalty(self) -> torch.Tensor | None:
        """``penalty_weight ·`` :meth:`nuclear_penalty` (``None`` at weight 0)."""
        return self.penalty_weight * self.nuclear_penalty() if self.penalty_weight else None

    def nuclear_penalty(self) -> torch.Tensor:
        """``‖W‖_*`` whose gradient is the sub-gradient ``U Vᵀ`` (TRP's stochastic sub-gradient)."""
        U, _, Vh = self._svd()
        return (self.weight * (U @ Vh).to(self.weight.dtype)).sum()

    def energy_rank(self, energy: float | None = None) -> int:
        """The smallest rank keeping ``energy`` (default: the layer's) of ``Σ σ²``, at most ``rank``."""
        energy = self.energy if energy is None else check_fraction(type(self).__name__, "energy", energy)
        s = torch.linalg.svdvals(self.weight.detach().to(_work_dtype(self.weight)))
        return max(1, min(self.rank, int(energy_rank(s, energy=energy))))

    @torch.no_grad()
    def project(self, energy: float | None = None) -> int:
        """Substitute the weight by its truncated SVD at :meth:`energy_rank`; returns that rank."""
        k = self.energy_rank(energy)
        U, S, Vh = self._svd()
        self.weight.copy_((U[:, :k] * S[:k]) @ Vh[:k])
        self.projected_rank = k
        return k

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after optimizer step ``step`` (counted from 0): project after every
        ``every``-th step. (``optimizer`` is accepted for a uniform hook; TRP keeps its state.)"""
        if (step + 1) % self.every == 0:
            self.project()

    def to_low_rank(self, energy: float | None = None) -> LowRankLinear:
        """A :class:`~rankwise.layers.LowRankLinear` at :meth:`energy_rank` (the deployed layer)."""
        k = self.energy_rank(energy)
        bias = None if self.bias is None else self.bias.detach().clone()
        return LowRankLinear.from_factors(*balanced_factors(self.weight, k), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, energy={self.energy}, every={self.every}, bias={self.bias is not None}"


def nuclear_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of :meth:`TRPLinear.nuclear_penalty` over the TRP layers of ``model``."""
    terms = [m.nuclear_penalty() for m in model.modules() if isinstance(m, TRPLinear)]
    if not terms:
        raise ConfigError("nuclear_penalty: the model has no TRPLinear layer; convert(model, 'trp', ...) first")
    return torch.stack(terms).sum()


__all__ = ["TRPLinear", "nuclear_penalty"]
