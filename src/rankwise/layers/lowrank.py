"""``LowRankLinear``: ``y = U (V x) + b``, the rank-``r`` layer compression writes and
``convert(model, "lowrank", rank=r)`` builds (truncated SVD of the dense weight, Eckart–Young)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ShapeError
from rankwise.layers.base import StructuredLinear, linear_bias, register_trainable
from rankwise.linalg import truncated_svd


def balanced_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r^½ (out, r), S_r^½ Vh_r (r, in))``: the best rank-``r`` factors of ``weight``,
    computed in float32 (or float64 if ``weight`` is), returned in ``weight``'s dtype."""
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    U, S, Vh = truncated_svd(work, rank)
    root = S.sqrt()
    return (U * root).to(weight.dtype), (root[:, None] * Vh).to(weight.dtype)


@register_trainable("lowrank")
class LowRankLinear(StructuredLinear):
    """``y = U (V x) + b``: a rank-``r`` replacement for ``nn.Linear(in, out)``.

    ``U`` has shape ``(out, r)`` and ``V`` shape ``(r, in)``; the forward is two small
    matmuls (``r (in + out)`` multiply-adds per token instead of ``in · out``), never a
    re-densified weight. Parameter names ``U``, ``V``, ``bias`` are what checkpoints store.
    Parameters: ``r (in + out)`` (+ ``out`` bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.check_rank(rank, in_features, out_features)
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.V = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from ``up (out, r)``, ``down (r, in)`` and an optional ``bias (out,)``."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ShapeError(f"factors must be (out, r) and (r, in); got {tuple(up.shape)}, {tuple(down.shape)}")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, dtype=up.dtype, device=up.device)
        with torch.no_grad():
            layer.U.copy_(up)
            layer.V.copy_(down)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear`` (balanced SVD factors)."""
        cls.check_rank(rank, linear.in_features, linear.out_features)
        return cls.from_factors(*balanced_factors(linear.weight, rank), linear_bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``U V``, shape ``(out, in)``."""
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"


__all__ = ["LowRankLinear", "balanced_factors"]
