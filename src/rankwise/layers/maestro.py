"""``MaestroLinear``: a trainable decomposition that learns its own rank ("Maestro: Uncovering
Low-Rank Structures via Trainable Decomposition", Horváth et al., 2023).

The layer is ``y = U (V x) + b`` (``U (out, r)``, ``V (r, in)``), trained with low-rank
ordered dropout (the paper's LoD): in training mode every forward samples a rank ``b``
uniformly from ``[min_rank, r]`` and uses only the first ``b`` components,
``y = U[:, :b] (V[:b] x) + b``. Leading components are used by every sample and trailing ones
rarely, which orders the components by importance (on linear maps with uniform data this
recovers the SVD). In eval mode the full rank is used.

The hierarchical group lasso :meth:`MaestroLinear.group_lasso`,
``Σ_b ‖(U[:, b:], V[b:])‖_F``, added to the loss (times a small ``λ``;
:func:`maestro_penalty` sums it over a model) shrinks the trailing components towards zero.
:meth:`MaestroLinear.effective_rank` then finds where the tail's norm falls below a threshold
and :meth:`MaestroLinear.prune` cuts it off, giving each layer its own rank.

Initialisation from a pretrained layer is its balanced SVD at ``rank`` (Eckart–Young): at
full rank ``min(in, out)`` the forward equals the original. Parameters: ``r (in + out)``
(+ ``out`` bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import check_weight, register_trainable
from rankwise.layers.lowrank import LowRankLinear, balanced_factors


def _check_threshold(layer: str, threshold: object) -> float:
    ok = isinstance(threshold, int | float) and not isinstance(threshold, bool) and threshold >= 0
    if not ok:
        raise ConfigError(f"{layer}: threshold must be a number >= 0 (a group norm); got {threshold!r}")
    return float(threshold)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with a zero (not infinite) gradient where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


@register_trainable("maestro")
class MaestroLinear(LowRankLinear):
    """``y = U (V x) + b`` trained with ordered dropout over its rank.

    Args:
        in_features, out_features, rank: as :class:`~rankwise.layers.LowRankLinear`.
        min_rank: the smallest rank ordered dropout samples (``1 <= min_rank <= rank``).
        ordered_dropout: sample a rank per training forward (``False``: always the full rank).
        seed: seed of the layer's own sampling generator.
        penalty_weight: λ of the group lasso that :meth:`penalty` gives a training loop
            (``rankwise.layers.penalty(model)``; ``rankwise pretrain`` adds it to the loss).
            0 (the default) trains without it; the paper's λ depends on the model.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        min_rank: int = 1,
        ordered_dropout: bool = True,
        seed: int = 0,
        penalty_weight: float = 0.0,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias=bias, dtype=dtype, device=device)
        name = type(self).__name__
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or not 1 <= min_rank <= rank:
            raise ConfigError(f"{name}: min_rank must be an integer in [1, rank={rank}]; got {min_rank!r}")
        if not isinstance(ordered_dropout, bool):
            raise ConfigError(f"{name}: ordered_dropout must be True or False; got {ordered_dropout!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{name}: seed must be an integer; got {seed!r}")
        self.min_rank, self.ordered_dropout = min_rank, ordered_dropout
        self.penalty_weight = check_weight(name, "penalty_weight", penalty_weight)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_rank = rank

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        min_rank: int = 1,
        ordered_dropout: bool = True,
        seed: int = 0,
        penalty_weight: float = 0.0,
    ) -> MaestroLinear:
        """The balanced rank-``rank`` SVD factors of ``linear`` (equal to it at full rank)."""
        cls.check_rank(rank, linear.in_features, linear.out_features)
        layer = cls.shaped_like(
            linear, rank, min_rank=min_rank, ordered_dropout=ordered_dropout, seed=seed,
            penalty_weight=penalty_weight,
        )  # fmt: skip
        up, down = balanced_factors(linear.weight, rank)
        with torch.no_grad():
            layer.U.copy_(up)
            layer.V.copy_(down)
        return layer

    def sample_rank(self) -> int:
        """A rank drawn uniformly from ``[min_rank, rank]`` (the ordered-dropout sample)."""
        span = self.rank - self.min_rank + 1
        return self.min_rank + int(torch.randint(span, (1,), generator=self.generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.sample_rank() if self.training and self.ordered_dropout else self.rank
        self.last_rank = b
        return F.linear(F.linear(x, self.V[:b]), self.U[:, :b], self.bias)

    # ------------------------------------------------------------------ learning the rank

    def tail_norms(self) -> torch.Tensor:
        """``(r,)``: entry ``b`` is ``‖(U[:, b:], V[b:])‖_F``, the norm of the tail from ``b`` on."""
        energy = self.U.pow(2).sum(0) + self.V.pow(2).sum(1)  # (r,) per component
        tails = energy.flip(0).cumsum(0).flip(0)
        return _safe_sqrt(tails)

    def group_lasso(self) -> torch.Tensor:
        """The hierarchical group lasso ``Σ_b ‖(U[:, b:], V[b:])‖_F`` (differentiable)."""
        return self.tail_norms().sum()

    def penalty(self) -> torch.Tensor | None:
        """``penalty_weight ·`` :meth:`group_lasso` (``None`` at weight 0)."""
        return self.penalty_weight * self.group_lasso() if self.penalty_weight else None

    def effective_rank(self, threshold: float = 0.0) -> int:
        """The rank left after cutting the longest tail whose norm is at most ``threshold``
        (at least 1)."""
        threshold = _check_threshold(type(self).__name__, threshold)
        kept = int((self.tail_norms().detach() > threshold).sum())
        return max(1, kept)

    @torch.no_grad()
    def truncate(self, rank: int) -> None:
        """Keep the first ``rank`` components (new, smaller parameters: rebuild the optimizer)."""
        rank = self.check_rank(rank, self.in_features, self.out_features, maximum=self.rank)
        self.U = nn.Parameter(self.U[:, :rank].clone())
        self.V = nn.Parameter(self.V[:rank].clone())
        self.rank, self.min_rank = rank, min(self.min_rank, rank)

    def prune(self, threshold: float) -> int:
        """Cut the trailing components whose tail norm is at most ``threshold``; the new rank."""
        self.truncate(self.effective_rank(threshold))
        return self.rank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_rank={self.min_rank}, ordered_dropout={self.ordered_dropout}"


def maestro_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of :meth:`MaestroLinear.group_lasso` over the Maestro layers of ``model``."""
    terms = [m.group_lasso() for m in model.modules() if isinstance(m, MaestroLinear)]
    if not terms:
        raise ConfigError("maestro_penalty: the model has no MaestroLinear layer; convert(model, 'maestro', ...) first")
    return torch.stack(terms).sum()


__all__ = ["MaestroLinear", "maestro_penalty"]
