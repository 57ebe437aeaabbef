"""LOST (2025): low-rank part from the top of the spectrum + channel-wise sparse complement."""

from __future__ import annotations

import math

import pytest
import torch
from layer_checks import (
    assert_forward_is_dense_weight,
    assert_state_dict_round_trip,
    fit_random_map,
    linear,
)

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.models import count_parameters


def test_forward_equals_the_dense_weight():
    assert_forward_is_dense_weight(L.LOSTLinear.from_linear(linear(24, 16), rank=4, density=0.25))


@pytest.mark.parametrize("rank,density", [(16, 0.05), (3, 1.0)])
def test_equals_the_original_layer_at_full_rank_or_with_every_channel(rank, density):
    dense = linear(24, 16)
    layer = L.LOSTLinear.from_linear(dense, rank=rank, density=density)
    torch.testing.assert_close(layer.dense_weight(), dense.weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_parts_come_from_the_svd_as_the_paper_describes():
    dense = linear(40, 30, bias=False)
    layer = L.LOSTLinear.from_linear(dense, rank=5, density=0.2)
    W = dense.weight.detach()
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.B @ layer.A, (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5, rtol=1e-4)
    rest = W - (U[:, :5] * S[:5]) @ Vh[:5]  # the remaining spectrum
    kept = layer.channels.long()
    assert kept.numel() == layer.kept == 8 and bool((kept[1:] > kept[:-1]).all())
    assert set(kept.tolist()) == set(rest.norm(dim=0).topk(8).indices.tolist())
    torch.testing.assert_close(layer.C, rest[:, kept], atol=1e-5, rtol=1e-4)
    assert int((layer.sparse_part().abs().sum(0) > 0).sum()) == 8  # only 8 channels non-zero
    # the sparse part adds what the low-rank part misses: closer to W than the rank-5 part alone
    assert (W - layer.dense_weight()).norm() < rest.norm()


def test_parameter_count():
    layer = L.LOSTLinear.from_linear(linear(40, 30), rank=5, density=0.1)
    assert layer.kept == math.ceil(0.1 * 40) == 4
    assert count_parameters(layer) == 5 * (40 + 30) + 30 * 4 + 30


def test_training_lowers_the_loss():
    layer = L.LOSTLinear.from_linear(linear(24, 16), rank=3, density=0.25)
    channels = layer.channels.clone()
    first, last = fit_random_map(layer)
    assert last < 0.5 * first and torch.equal(layer.channels, channels)


def test_state_dict_round_trip():
    layer = L.LOSTLinear.from_linear(linear(24, 16, seed=0), rank=3, density=0.25)
    assert_state_dict_round_trip(layer, L.LOSTLinear.from_linear(linear(24, 16, seed=1), rank=3, density=0.25))


def test_bad_rank_and_density_name_the_layer_and_valid_values():
    with pytest.raises(ConfigError, match=r"LOSTLinear: rank must be in \[1, 16\] for a 16x24 layer; got 0"):
        L.LOSTLinear.from_linear(linear(24, 16), rank=0)
    with pytest.raises(ConfigError, match=r"LOSTLinear: density must be a number in \(0, 1\]; got 2"):
        L.LOSTLinear.from_linear(linear(24, 16), rank=2, density=2)


def test_convert_by_name():
    model = torch.nn.Sequential(linear(12, 8), torch.nn.ReLU(), linear(8, 6, seed=1))
    x = torch.randn(3, 12)
    before = model(x)
    new = L.convert(model, "lost", rank=6, density=1.0)
    assert all(isinstance(m, L.LOSTLinear) for m in new.values())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
