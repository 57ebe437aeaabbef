"""intrinsic_dimension(): random-subspace training finds a task's known number of degrees of freedom."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.analysis import intrinsic_dimension
from rankwise.analysis.intrinsic import SubspaceModel
from rankwise.errors import ConfigError


def _regression(k: int, n: int = 20, samples: int = 200, seed: int = 0):
    """Least squares whose inputs span only k of n dimensions: the loss depends on k
    directions of the weights, so exactly k random directions are needed to solve it."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, k, generator=g))[0].T  # (k, n) orthonormal rows
    X = torch.randn(samples, k, generator=g) @ basis
    y = X @ torch.randn(n, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(n, 1, bias=False)

    def loss(m):
        return ((m(X).squeeze(-1) - y) ** 2).mean()

    def r2(m):
        return float(1 - loss(m) / y.var(unbiased=False))

    return model, loss, r2


def test_finds_the_known_dimension():
    k = 4
    model, loss, r2 = _regression(k)
    w0 = model.weight.detach().clone()
    result = intrinsic_dimension(model, loss, r2, dims=range(1, 8), steps=1500, lr=0.3, threshold=0.99)
    assert result.baseline > 0.999
    assert result.intrinsic_dimension == k
    assert all(m > 0.99 for d, m in zip(result.dims, result.metrics, strict=True) if d >= k)
    assert all(m < 0.99 for d, m in zip(result.dims, result.metrics, strict=True) if d < k)
    assert result.parameters == 20
    assert torch.equal(model.weight, w0)  # the model itself is not trained
    assert [r["dim"] for r in result.to_rows()] == list(range(1, 8))


def test_subspace_model_starts_at_the_initialisation_and_trains_only_z():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    sub = SubspaceModel(model, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 5)
    torch.testing.assert_close(sub(x), model(x))
    assert [n for n, p in sub.named_parameters()] == ["z"]
    torch.testing.assert_close(sub.P.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        sub.z.fill_(0.1)
    assert not torch.allclose(sub(x), model(x))


def test_bad_arguments():
    model, loss, r2 = _regression(2)
    with pytest.raises(ConfigError, match="dims"):
        intrinsic_dimension(model, loss, r2, dims=[0, 1])
    with pytest.raises(ConfigError, match="threshold"):
        intrinsic_dimension(model, loss, r2, dims=[1], threshold=1.5)
    with pytest.raises(ConfigError, match="too large.*sparse"):
        SubspaceModel(nn.Linear(5_000, 5_000, bias=False), 10, projection="dense")  # 2.5e8 entries


def test_sparse_projection_has_unit_columns_and_trains_only_the_selected_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 3))
    sub = SubspaceModel(model, 6, generator=torch.Generator().manual_seed(1), parameters="0.*", projection="sparse")
    assert sub.sparse and sub.P.is_sparse and sub.P.shape == (30 * 20 + 20, 6)
    dense = sub.P.to_dense()
    torch.testing.assert_close(dense.norm(dim=0), torch.ones(6))
    assert int((dense != 0).sum()) <= 6 * round((620) ** 0.5)  # ~√D entries per column
    x = torch.randn(4, 30)
    torch.testing.assert_close(sub(x), model(x))
    with torch.no_grad():
        sub.z.fill_(0.5)
    moved = sub.parameters_now()
    assert not torch.equal(moved["0.weight"], model[0].weight)
    assert torch.equal(moved["2.weight"], model[2].weight)  # not selected: fixed
    sub(x).sum().backward()
    assert sub.z.grad is not None and all(p.grad is None for p in model.parameters())


def test_parameter_selection_in_intrinsic_dimension():
    model, loss, r2 = _regression(3)
    result = intrinsic_dimension(model, loss, r2, dims=[1, 3], steps=800, lr=0.3, threshold=0.99, parameters="weight", projection="sparse")
    assert result.parameters == 20 and result.baseline > 0.99
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        intrinsic_dimension(model, loss, r2, dims=[1], parameters="nothing.*")
    with pytest.raises(ConfigError, match="projection"):
        SubspaceModel(model, 2, projection="fastfood")
    with pytest.raises(ConfigError, match="dims must be"):
        intrinsic_dimension(model, loss, r2, dims=["a"])
