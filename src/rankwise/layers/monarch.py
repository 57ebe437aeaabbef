"""``MonarchLinear``: a Monarch-matrix layer ("Monarch: Expressive Structured Matrices for
Efficient and Accurate Training", Dao et al., 2022).

The weight is ``M = Pᵀ L P R`` with two block-diagonal factors, ``R (k, b_out, b_in)`` and
``L (b_out, k, k)`` (``k = nblocks``, ``in = k b_in``, ``out = k b_out``); the forward is two
batched block matmuls (:func:`rankwise.linalg.monarch_matmul`), ``out (k + b_in)`` parameters
instead of ``out · in`` (``2 n^1.5`` for ``n x n`` at ``k = √n``).

Initialisation (``init``):

- ``"project"`` (default, from a pretrained layer): the closest Monarch matrix to the dense
  weight in Frobenius norm (:func:`rankwise.linalg.monarch_project`, the paper's closed-form
  projection; exact when the weight already is Monarch). A general dense weight is *not*
  Monarch, so the forward equals the original only up to the projection error
  (:meth:`MonarchLinear.projection_error` says how much);
- ``"random"`` (training from scratch, as in the paper's end-to-end experiments): uniform
  factors scaled so every entry of ``M`` has the variance of ``nn.Linear``'s default init,
  ``1 / (3 in)``.

Monarch has no rank: its size is set by ``nblocks``, and ``convert`` is called with
``rank=None``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import StructuredLinear, register_trainable
from rankwise.linalg import monarch_dense, monarch_matmul, monarch_project

INITS = ("project", "random")


def common_divisors(a: int, b: int) -> list[int]:
    """Every ``k >= 1`` dividing both ``a`` and ``b`` (the valid ``nblocks`` of an ``a x b`` layer)."""
    g = math.gcd(a, b)
    return [k for k in range(1, g + 1) if g % k == 0]


@register_trainable("monarch")
class MonarchLinear(StructuredLinear):
    """``y = M x + b`` with ``M`` a Monarch matrix of ``nblocks`` blocks.

    Args:
        in_features, out_features: the layer's shape; ``nblocks`` must divide both.
        nblocks: ``k``, the number of blocks of ``R`` (and the size of ``L``'s blocks).
    Parameters: ``b_out k² + k b_out b_in = out (k + in / k)`` (+ ``out`` bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.check_nblocks(nblocks, in_features, out_features)
        k = nblocks
        self.in_features, self.out_features, self.nblocks = in_features, out_features, k
        b_in, b_out = in_features // k, out_features // k
        kw = {"dtype": dtype, "device": device}
        self.L = nn.Parameter(torch.zeros(b_out, k, k, **kw))
        self.R = nn.Parameter(torch.zeros(k, b_out, b_in, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def check_nblocks(cls, nblocks: object, in_features: int, out_features: int) -> int:
        """``nblocks`` if it divides both sizes, else a ConfigError listing the valid values."""
        valid = common_divisors(in_features, out_features)
        if isinstance(nblocks, bool) or nblocks not in valid:
            raise ConfigError(
                f"{cls.__name__}: nblocks must divide both sizes of a {out_features}x{in_features} "
                f"layer; got {nblocks!r}; valid: {', '.join(map(str, valid))}"
            )
        return int(nblocks)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: None = None, nblocks: int = 4, init: str = "project"
    ) -> MonarchLinear:
        """The Monarch layer replacing ``linear``: its projection (``init="project"``) or a
        random Monarch matrix (``init="random"``); the bias is copied either way."""
        if rank is not None:
            raise ConfigError(
                f"{cls.__name__}: a Monarch layer has no rank (its size is set by nblocks); "
                f"call convert(model, 'monarch', rank=None, nblocks=k); got rank={rank!r}"
            )
        if init not in INITS:
            raise ConfigError(f"{cls.__name__}: init must be one of {', '.join(INITS)}; got {init!r}")
        layer = cls.shaped_like(linear, nblocks)
        with torch.no_grad():
            if init == "project":
                L, R = monarch_project(linear.weight.detach(), nblocks)
                layer.L.copy_(L)
                layer.R.copy_(R)
            else:
                layer.reset_parameters()
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random factors with ``Var(M_ij) = Var(L) Var(R) = 1 / (3 in)``, like ``nn.Linear``:
        ``R ~ U(±1/√b_in)`` (variance ``1 / (3 b_in)``) and ``L ~ U(±√(3/k))`` (variance ``1/k``)."""
        b_in = self.R.shape[-1]
        self.R.uniform_(-1 / math.sqrt(b_in), 1 / math.sqrt(b_in))
        self.L.uniform_(-math.sqrt(3 / self.nblocks), math.sqrt(3 / self.nblocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch_matmul(x, self.L, self.R)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The dense Monarch matrix ``M (out, in)``."""
        return monarch_dense(self.L, self.R)

    def projection_error(self, weight: torch.Tensor) -> float:
        """``‖W - M‖_F / ‖W‖_F`` against a dense ``weight`` (e.g. the layer it replaced)."""
        W = weight.detach().float()
        return float((W - self.dense_weight().detach().float()).norm() / W.norm().clamp_min(1e-30))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, bias={self.bias is not None}"


__all__ = ["INITS", "MonarchLinear", "common_divisors"]
