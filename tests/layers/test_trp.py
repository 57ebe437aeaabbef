"""rankwise.layers.trp: Trained Rank Pruning (TRPLinear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.trp import TRPLinear, nuclear_penalty
from rankwise.models import count_parameters, tiny_llama


def _linear(n_in: int = 16, n_out: int = 12) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out)


def test_equals_the_original_and_forward_is_the_dense_weight():
    linear = _linear()
    layer = TRPLinear.from_linear(linear, rank=12)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias)


def test_parameter_count_formula_dense_and_deployed():
    layer = TRPLinear.from_linear(_linear(), rank=12)
    assert count_parameters(layer) == 16 * 12 + 12
    low = layer.to_low_rank(energy=0.5)
    k = low.rank
    assert count_parameters(low) == k * (16 + 12) + 12


def test_nuclear_penalty_is_the_nuclear_norm_with_its_subgradient():
    layer = TRPLinear.from_linear(_linear(), rank=12)
    W = layer.weight.detach()
    value = layer.nuclear_penalty()
    torch.testing.assert_close(value, torch.linalg.matrix_norm(W, "nuc"), rtol=1e-5, atol=1e-5)
    value.backward()
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.weight.grad, U @ Vh, rtol=1e-4, atol=1e-5)
    model = nn.Sequential(layer, nn.ReLU(), TRPLinear.from_linear(nn.Linear(12, 4), rank=4))
    torch.testing.assert_close(nuclear_penalty(model), value + model[2].nuclear_penalty())


def test_project_keeps_the_energy_rank_and_is_the_truncated_svd():
    layer = TRPLinear.from_linear(_linear(), rank=12, energy=0.8)
    W = layer.weight.detach().clone()
    S = torch.linalg.svdvals(W)
    energy = S.pow(2).cumsum(0) / S.pow(2).sum()
    k = int((energy < 0.8).sum()) + 1  # the smallest k reaching 80%
    assert layer.project() == k == layer.projected_rank
    U, S2, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.weight.detach(), (U[:, :k] * S2[:k]) @ Vh[:k], atol=1e-5, rtol=1e-5)
    assert int(torch.linalg.matrix_rank(layer.weight.detach())) == k


def test_rank_caps_the_projection():
    layer = TRPLinear.from_linear(_linear(), rank=2, energy=1.0)
    assert layer.project() == 2


def test_hook_projects_every_every_steps():
    layer = TRPLinear.from_linear(_linear(), rank=12, energy=0.5, every=3)
    ranks = []
    for step in range(6):
        layer.after_optimizer_step(step)
        ranks.append(layer.projected_rank)
    assert ranks[:2] == [None, None] and ranks[2] is not None and ranks[3:5] == [ranks[2]] * 2


def test_training_with_projection_and_penalty_lowers_the_loss_and_ends_low_rank():
    torch.manual_seed(0)
    layer = TRPLinear.from_linear(_linear(), rank=12, energy=0.95, every=10)
    Q1, _ = torch.linalg.qr(torch.randn(12, 2))
    Q2, _ = torch.linalg.qr(torch.randn(16, 2))
    A = Q1 @ torch.diag(torch.tensor([2.0, 1.5])) @ Q2.T  # a rank-2 target
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for step in range(300):
        x = torch.randn(64, 16)
        loss = (layer(x) - x @ A.T).pow(2).mean()
        opt.zero_grad()
        (loss + 1e-3 * nuclear_penalty(layer)).backward()
        opt.step()
        layer.after_optimizer_step(step)
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.05 * sum(losses[:10]) / 10
    assert layer.projected_rank == 2
    low = layer.to_low_rank()
    assert low.rank == 2
    x = torch.randn(32, 16)
    torch.testing.assert_close(low(x), layer(x), atol=5e-3, rtol=1e-2)


def test_convert_on_a_tiny_llama_keeps_the_logits():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    ids = torch.randint(0, 200, (1, 8))
    before = model(ids).logits
    new = L.convert(model, "trp", rank=16, energy=0.9, targets="mlp.*")
    assert len(new) == 3 and all(isinstance(m, TRPLinear) for m in new.values())
    torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"rank": 13}, ["TRPLinear", "rank", "[1, 12]"]),
        ({"rank": 4, "energy": 0.0}, ["TRPLinear", "energy", "(0, 1]"]),
        ({"rank": 4, "energy": 1.5}, ["TRPLinear", "energy", "(0, 1]"]),
        ({"rank": 4, "every": 0}, ["TRPLinear", "every", ">= 1"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        TRPLinear.from_linear(_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_penalty_without_trp_layers_says_how_to_get_them():
    with pytest.raises(ConfigError, match="convert"):
        nuclear_penalty(nn.Sequential(_linear()))
