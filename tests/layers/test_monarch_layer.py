"""rankwise.layers.monarch: Monarch layers (MonarchLinear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.monarch import MonarchLinear, common_divisors
from rankwise.linalg import monarch_dense, monarch_project
from rankwise.models import count_parameters, tiny_llama


def _linear(n_in: int = 16, n_out: int = 12) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out)


def test_forward_is_the_dense_monarch_matrix():
    layer = MonarchLinear.from_linear(_linear(), nblocks=4)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)


def test_a_monarch_weight_is_reproduced_exactly():
    linear = _linear()
    with torch.no_grad():
        linear.weight.copy_(monarch_dense(*monarch_project(linear.weight, 4)))
    layer = MonarchLinear.from_linear(linear, nblocks=4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    assert layer.projection_error(linear.weight) < 1e-5


def test_projection_is_the_closest_monarch_matrix():
    linear = _linear()
    layer = MonarchLinear.from_linear(linear, nblocks=4)
    best = layer.projection_error(linear.weight)
    assert 0 < best < 1
    torch.manual_seed(2)
    for _ in range(5):  # any other Monarch matrix (perturbed factors) is farther
        other = MonarchLinear.from_linear(linear, nblocks=4)
        with torch.no_grad():
            other.L.add_(0.05 * torch.randn_like(other.L))
            other.R.add_(0.05 * torch.randn_like(other.R))
        assert other.projection_error(linear.weight) > best


def test_parameter_count_formula():
    n_in, n_out, k = 16, 12, 4
    layer = MonarchLinear.from_linear(_linear(n_in, n_out), nblocks=k)
    assert count_parameters(layer) == n_out * (k + n_in // k) + n_out
    layer = MonarchLinear.from_linear(nn.Linear(256, 256, bias=False), nblocks=16)
    assert count_parameters(layer) == 2 * 256 * 16  # 2 n^1.5 at k = sqrt(n)


def test_random_init_has_the_variance_of_nn_linear():
    torch.manual_seed(0)
    layer = MonarchLinear.from_linear(nn.Linear(256, 512), nblocks=16, init="random")
    var = layer.dense_weight().detach().var().item()
    assert 0.9 < var * 3 * 256 < 1.1


def test_training_from_scratch_lowers_the_loss():
    torch.manual_seed(0)
    layer = MonarchLinear.from_linear(nn.Linear(16, 16), nblocks=4, init="random")
    target = MonarchLinear.from_linear(nn.Linear(16, 16), nblocks=4, init="random")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        x = torch.randn(32, 16)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:10]) / 10


def test_convert_on_a_tiny_llama():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    ids = torch.randint(0, 200, (1, 8))
    new = L.convert(model, "monarch", rank=None, nblocks=4)
    assert len(new) == 7 and all(isinstance(m, MonarchLinear) for m in new.values())
    assert torch.isfinite(model(ids).logits).all()


def test_common_divisors():
    assert common_divisors(12, 16) == [1, 2, 4]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"nblocks": 5}, ["MonarchLinear", "nblocks", "valid: 1, 2, 4"]),
        ({"nblocks": True}, ["MonarchLinear", "nblocks", "valid: 1, 2, 4"]),
        ({"init": "svd"}, ["MonarchLinear", "init", "project, random"]),
        ({"rank": 4}, ["MonarchLinear", "no rank", "nblocks"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        MonarchLinear.from_linear(_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)
