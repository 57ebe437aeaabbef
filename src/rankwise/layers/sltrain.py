"""``SLTrainLinear``: sparse plus low-rank pretraining ("SLTrain: a sparse plus low-rank approach
for parameter and memory efficient pretraining", Han et al., NeurIPS 2024).

``W = (α / r) B A + S``: ``B (out, r)``, ``A (r, in)`` trainable low-rank factors, and ``S`` a
sparse matrix whose support (``δ · out · in`` positions, drawn uniformly at random once) is
FIXED; only its values are trained. As in the paper, training starts from scratch: ``A`` is
Kaiming-uniform, ``B = 0``, the sparse values are uniform in ``[-1/√in, 1/√in]`` (so the layer
starts as ``W = S``); ``α`` and ``δ`` default to the paper's LLaMA settings (32 and 0.03).

Memory: the layer holds ``B``, ``A``, the values ``(nnz,)`` and their flat indices ``(nnz,)``
(int32 when ``out · in < 2³¹``) — never a dense mask. The forward builds the dense ``W`` as a
temporary and the backward rebuilds it instead of saving it (the paper's custom autograd
function), so a layer keeps no ``out × in`` tensor alive between forward and backward.

Parameters: ``r (in + out) + nnz`` (+ ``out`` bias), ``nnz = ⌊δ · out · in⌋``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import StructuredLinear, check_fraction, register_trainable


def _dense(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · B A`` with ``values`` added at the flat positions ``index``: ``(out, in)``."""
    weight = (B @ A) * scale
    return weight.view(-1).index_add(0, index, values).view_as(weight)


class _SparsePlusLowRank(torch.autograd.Function):
    """``y = x Wᵀ`` with ``W = scale · B A + S(values, index)``; the backward recomputes ``W``."""

    @staticmethod
    def forward(ctx, x, B, A, values, index, scale):
        ctx.save_for_backward(x, B, A, values, index)
        ctx.scale = scale
        return F.linear(x, _dense(B, A, values, index, scale))

    @staticmethod
    def backward(ctx, grad):
        x, B, A, values, index = ctx.saved_tensors
        scale = ctx.scale
        grad_x = grad_B = grad_A = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dense(B, A, values, index, scale)
        if any(ctx.needs_input_grad[1:4]):
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
            if ctx.needs_input_grad[1]:
                grad_B = (grad_w @ A.T) * scale
            if ctx.needs_input_grad[2]:
                grad_A = (B.T @ grad_w) * scale
            if ctx.needs_input_grad[3]:
                grad_values = grad_w.view(-1)[index]
        return grad_x, grad_B, grad_A, grad_values, None, None


@register_trainable("sltrain")
class SLTrainLinear(StructuredLinear):
    """``y = ((α/r) B A + S) x + b`` with a fixed random sparse support (SLTrain 2024)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        density: float = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.check_rank(rank, in_features, out_features)
        self.density = check_fraction(type(self).__name__, "density", density)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ConfigError(f"{type(self).__name__}: alpha must be a number > 0; got {alpha!r}")
        size = in_features * out_features
        nnz = int(self.density * size)
        if nnz < 1:
            raise ConfigError(
                f"{type(self).__name__}: density={density} gives no non-zero in a {out_features}x{in_features} "
                f"layer; use density >= {1 / size:.3g}"
            )
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(nnz, **kw))
        index_dtype = torch.int32 if size < 2**31 else torch.int64
        self.register_buffer("index", torch.zeros(nnz, dtype=index_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def scale(self) -> float:
        """``α / r``, the factor on ``B A``."""
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        generator: torch.Generator | None = None,
    ) -> SLTrainLinear:
        """A freshly initialised SLTrain layer of ``linear``'s shape, dtype and device (the paper
        trains from scratch: ``linear``'s weight is not used; its bias is copied).

        ``generator`` draws the support and the initial values (default: torch's global RNG).
        """
        layer = cls.shaped_like(linear, rank, density=density, alpha=alpha)
        with torch.no_grad():
            layer.reset_parameters(generator=generator)  # the bias stays linear's
        return layer

    @torch.no_grad()
    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Draw a new support and the paper's initial values (``A`` Kaiming-uniform, ``B = 0``)."""
        size = self.in_features * self.out_features
        support = torch.randperm(size, generator=generator)[: self.nnz].sort().values
        self.index.copy_(support.to(self.index.dtype))
        bound = 1 / math.sqrt(self.in_features)
        # kaiming_uniform_(a=√5) on (r, in) is U(-1/√in, 1/√in), drawn here from ``generator``
        self.A.copy_(torch.rand(self.A.shape, generator=generator).mul_(2 * bound).sub_(bound))
        self.B.zero_()
        self.values.copy_(torch.rand(self.nnz, generator=generator).mul_(2 * bound).sub_(bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SparsePlusLowRank.apply(x, self.B, self.A, self.values, self.index.long(), self.scale)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """``(α/r) B A + S``, shape ``(out, in)``."""
        return _dense(self.B, self.A, self.values, self.index.long(), self.scale)

    def sparse_part(self) -> torch.Tensor:
        """``S`` as a dense ``(out, in)`` matrix (zero off the support; for tests and analysis)."""
        flat = self.values.new_zeros(self.in_features * self.out_features)
        return flat.index_add(0, self.index.long(), self.values).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density}, alpha={self.alpha}, bias={self.bias is not None}"


__all__ = ["SLTrainLinear"]
