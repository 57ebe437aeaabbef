"""rankwise.layers.maestro: ordered-dropout trainable decomposition (MaestroLinear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.maestro import MaestroLinear, maestro_penalty
from rankwise.models import count_parameters, tiny_llama


def _linear(n_in: int = 16, n_out: int = 12) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out)


def test_full_rank_equals_the_original_and_forward_is_the_dense_weight():
    linear = _linear()
    layer = MaestroLinear.from_linear(linear, rank=12).eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)


def test_parameter_count_formula():
    layer = MaestroLinear.from_linear(_linear(), rank=5)
    assert count_parameters(layer) == 5 * (16 + 12) + 12
    layer.truncate(2)
    assert count_parameters(layer) == 2 * (16 + 12) + 12


def test_ordered_dropout_uses_a_sampled_prefix_in_training_only():
    layer = MaestroLinear.from_linear(_linear(), rank=8, min_rank=3, seed=4)
    x = torch.randn(5, 16)
    seen = set()
    for _ in range(60):
        y = layer(x)
        b = layer.last_rank
        seen.add(b)
        expected = x @ (layer.U[:, :b] @ layer.V[:b]).T + layer.bias
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert seen == set(range(3, 9))  # every rank in [min_rank, rank] is drawn
    layer.eval()
    layer(x)
    assert layer.last_rank == 8


def test_group_lasso_is_the_sum_of_tail_norms():
    layer = MaestroLinear(3, 2, 2, bias=False)
    with torch.no_grad():
        layer.U.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.V.copy_(torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0]]))
    # component energies 1 and 4 + 5 = 9: tails sqrt(10), sqrt(9)
    torch.testing.assert_close(layer.tail_norms(), torch.tensor([10**0.5, 3.0]))
    torch.testing.assert_close(layer.group_lasso(), torch.tensor(10**0.5 + 3.0))
    assert layer.effective_rank(3.0) == 1 and layer.effective_rank(2.9) == 2


def test_training_learns_the_rank_of_a_low_rank_map_and_prune_cuts_the_tail():
    torch.manual_seed(0)
    layer = MaestroLinear.from_linear(_linear(), rank=12)
    A = torch.randn(12, 2) @ torch.randn(2, 16) / 4  # the true map has rank 2
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(600):
        x = torch.rand(64, 16) * 2 - 1
        loss = (layer(x) - x @ A.T).pow(2).mean()
        opt.zero_grad()
        (loss + 1e-2 * maestro_penalty(layer)).backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.05 * sum(losses[:20]) / 20
    tails = layer.tail_norms().detach()
    assert layer.effective_rank(0.1 * float(tails[0])) == 2
    layer.eval()
    x = torch.rand(256, 16) * 2 - 1
    assert layer.prune(0.1 * float(tails[0])) == 2
    assert layer.U.shape[1] == layer.V.shape[0] == layer.rank
    assert (layer(x) - x @ A.T).pow(2).mean() < 0.02


def test_convert_on_a_tiny_llama_at_full_rank_keeps_the_logits():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    ids = torch.randint(0, 200, (1, 8))
    before = model(ids).logits
    new = L.convert(model, "maestro", rank=16, targets=["k_proj", "v_proj"])
    assert len(new) == 2 and all(isinstance(m, MaestroLinear) for m in new.values())
    model.eval()
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    assert maestro_penalty(model) > 0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"rank": 0}, ["MaestroLinear", "rank", "[1, 12]"]),
        ({"rank": 4, "min_rank": 5}, ["MaestroLinear", "min_rank", "[1, rank=4]"]),
        ({"rank": 4, "ordered_dropout": 1}, ["MaestroLinear", "ordered_dropout", "True or False"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        MaestroLinear.from_linear(_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_threshold_and_truncation_rank_raise():
    layer = MaestroLinear.from_linear(_linear(), rank=4)
    with pytest.raises(ConfigError, match="MaestroLinear: threshold must be a number >= 0"):
        layer.prune(-1.0)
    with pytest.raises(ConfigError, match=r"MaestroLinear: rank must be in \[1, 4\]"):
        layer.truncate(5)
    with pytest.raises(ConfigError, match="no MaestroLinear layer"):
        maestro_penalty(nn.Sequential(_linear()))
