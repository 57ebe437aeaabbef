"""``LOSTLinear``: low-rank and channel-wise sparse pretraining ("LOST: Low-rank and Sparse
Pre-training for Large Language Models", Li et al., 2025).

LOST splits a weight by its SVD ``W = U diag(σ) Vᵀ`` into two complementary parts that are
trained together:

- the low-rank part from the dominant spectrum: ``B = U_r σ_r^½ (out, r)``,
  ``A = σ_r^½ V_rᵀ (r, in)``;
- a channel-wise sparse part from the remaining spectrum: of the complement
  ``R = U_{r:} diag(σ_{r:}) V_{r:}ᵀ`` only the ``k = ⌈δ · in⌉`` input channels (columns) with
  the largest norm are kept, as a dense block ``C (out, k)`` and their channel indices.

``y = B (A x) + C x[channels] + b``: the sparse part reads only ``k`` input coordinates, so its
cost and memory are ``out · k``, without any mask. At initialisation ``W ≈ B A + R[:, channels]``;
it is exactly ``W`` when ``r = min(in, out)`` (``R = 0``) or ``δ = 1`` (every channel kept). For
training from scratch the SVD is that of the freshly initialised weight, as in the paper.

Parameters: ``r (in + out) + out · k`` (+ ``out`` bias).

Only the abstract was available when this was written: the channel axis (input channels) and
the selection rule (largest complement column norm) follow its description ("allocating the
remaining singular values to construct channel-wise sparse components"); the default ``δ``
is rankwise's choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.base import StructuredLinear, check_fraction, register_trainable
from rankwise.linalg import truncated_svd


def spectral_split(
    weight: torch.Tensor, rank: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LOST's initial parts of ``weight (out, in)``: ``(B (out, r), A (r, in), C (out, k),
    channels (k,))`` with ``B A`` the best rank-``r`` approximation and ``C`` the ``k`` columns
    of the complement with the largest norm (indices ascending). Computed in float32/float64."""
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    U, S, Vh = truncated_svd(work)
    root = S[:rank].sqrt()
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    rest = (U[:, rank:] * S[rank:]) @ Vh[rank:]
    chosen = rest.norm(dim=0).topk(channels).indices.sort().values
    return B, A, rest[:, chosen], chosen


@register_trainable("lost")
class LOSTLinear(StructuredLinear):
    """``y = B (A x) + C x[channels] + b``: low-rank plus channel-wise sparse (LOST 2025)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        density: float = 0.05,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.check_rank(rank, in_features, out_features)
        self.density = check_fraction(type(self).__name__, "density", density)
        kept = math.ceil(self.density * in_features)
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features, self.rank, self.kept = in_features, out_features, rank, kept
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.C = nn.Parameter(torch.zeros(out_features, kept, **kw))
        self.register_buffer("channels", torch.arange(kept, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, density: float = 0.05) -> LOSTLinear:
        """LOST's SVD split of ``linear``'s weight (:func:`spectral_split`), bias copied."""
        layer = cls.shaped_like(linear, rank, density=density)
        B, A, C, channels = spectral_split(linear.weight, rank, layer.kept)
        with torch.no_grad():
            layer.B.copy_(B)
            layer.A.copy_(A)
            layer.C.copy_(C)
            layer.channels.copy_(channels.to(torch.int32))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.A), self.B, self.bias)
        return low + F.linear(x.index_select(-1, self.channels.long()), self.C)

    def sparse_part(self) -> torch.Tensor:
        """The channel-sparse matrix ``S (out, in)``: ``C`` in the kept columns, zero elsewhere."""
        dense = self.C.new_zeros(self.out_features, self.in_features)
        return dense.index_copy(1, self.channels.long(), self.C)

    def dense_weight(self) -> torch.Tensor:
        """``B A + S``, shape ``(out, in)``."""
        return self.B @ self.A + self.sparse_part()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.kept}, bias={self.bias is not None}"


__all__ = ["LOSTLinear", "spectral_split"]
