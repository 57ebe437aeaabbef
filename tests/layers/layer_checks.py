"""Checks every trainable layer type's tests share (imported by tests/layers/test_*.py)."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers import StructuredLinear


def assert_forward_is_dense_weight(layer: StructuredLinear, *, atol: float = 1e-5) -> None:
    """The forward equals ``x Wᵀ + b`` with ``W = layer.dense_weight()``, batched inputs too."""
    x = torch.randn(3, 5, layer.in_features, dtype=layer.dense_weight().dtype)
    expected = x @ layer.dense_weight().T
    if layer.bias is not None:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=atol, rtol=1e-5)


def fit_random_map(layer: StructuredLinear, *, steps: int = 60, lr: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Train ``layer`` with Adam to imitate a fixed random linear map; ``(first, last)`` loss."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(layer.out_features, layer.in_features, generator=g) / layer.in_features**0.5
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, layer.in_features, generator=g)
        loss = (layer(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def assert_state_dict_round_trip(layer: StructuredLinear, fresh: StructuredLinear) -> None:
    """``fresh`` (same type and shapes, other values) computes what ``layer`` does once it
    loads ``layer``'s state dict (buffers such as sparse indices included)."""
    x = torch.randn(4, layer.in_features)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def linear(in_features: int, out_features: int, *, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)
