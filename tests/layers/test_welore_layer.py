"""rankwise.layers.welore: WeLore's low-rank / non-low-rank split and conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.welore import (
    WeLoreLinear,
    is_low_rank,
    low_rank_components,
    normalized_spectrum,
    welore,
    welore_rank,
    welore_threshold,
)
from rankwise.models import count_parameters


def _low_rank_linear(rank: int = 3, n: int = 32) -> nn.Linear:
    linear = nn.Linear(n, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, rank) @ torch.randn(rank, n) / n)
    return linear


def _flat_linear(n: int = 32) -> nn.Linear:
    linear = nn.Linear(n, n)
    with torch.no_grad():
        linear.weight.copy_(torch.linalg.qr(torch.randn(n, n))[0] / 4)  # all singular values equal
    return linear


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_low_rank_linear(), nn.Tanh(), _flat_linear(), nn.Tanh(), _low_rank_linear(6))


def test_welore_rank_counts_singular_values_above_the_threshold():
    S = torch.tensor([4.0, 2.0, 1.0, 0.5])
    torch.testing.assert_close(normalized_spectrum(S), torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64))
    assert welore_rank(S, 0.25) == 3 and welore_rank(S, 0.9) == 1 and welore_rank(S, 0.0) == 4
    assert welore_rank(torch.zeros(3), 0.5) == 1
    assert is_low_rank(32, 32, 15) and not is_low_rank(32, 32, 16)


def test_a_low_rank_weight_becomes_trainable_factors_equal_to_it():
    torch.manual_seed(0)
    linear = _low_rank_linear(3)
    layer = WeLoreLinear.from_linear(linear, threshold=0.01)
    assert layer.low_rank and layer.rank == 3
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)
    assert count_parameters(layer) == 3 * (32 + 32) + 32
    assert all(p.requires_grad for p in layer.parameters())


def test_a_flat_spectrum_stays_dense_and_frozen():
    torch.manual_seed(0)
    linear = _flat_linear()
    layer = WeLoreLinear.from_linear(linear, threshold=0.5)
    assert not layer.low_rank
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.dense_weight(), linear.weight)
    assert count_parameters(layer) == 32 * 32 + 32
    assert not any(p.requires_grad for p in layer.parameters())


def test_rank_caps_the_kept_rank():
    torch.manual_seed(0)
    layer = WeLoreLinear.from_linear(_low_rank_linear(6), rank=2, threshold=0.0)
    assert layer.low_rank and layer.rank == 2


def test_welore_on_a_model_trains_only_the_low_rank_components():
    model = _model()
    x = torch.randn(8, 32)
    before = model(x)
    new = welore(model, threshold=0.01)
    assert low_rank_components(model) == ["0", "4"] and not new["2"].low_rank
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == (3 * 64 + 32) + (6 * 64 + 32)
    assert count_parameters(model) == (3 * 64 + 32) + (32 * 32 + 32) + (6 * 64 + 32)


def test_reduction_picks_the_smallest_threshold_that_reaches_it():
    torch.manual_seed(0)
    weights = {"a": torch.randn(24, 32), "b": torch.randn(24, 8) @ torch.randn(8, 32)}
    spectra = {n: torch.linalg.svdvals(w) for n, w in weights.items()}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    dense = sum(m * n for m, n in shapes.values())

    def cost(threshold: float) -> int:
        total = 0
        for name, s in spectra.items():
            m, n = shapes[name]
            k = welore_rank(s, threshold)
            total += k * (m + n) if is_low_rank(n, m, k) else m * n
        return total

    values = torch.cat([normalized_spectrum(s) for s in spectra.values()])
    for reduction in (0.2, 0.4, 0.6):
        theta = welore_threshold(spectra, shapes, reduction)
        assert cost(theta) <= (1 - reduction) * dense
        below = float(values[values < theta].max())  # the cost changes only at these values
        assert cost(below) > (1 - reduction) * dense  # any lower threshold keeps too much


def test_welore_with_a_reduction_target_reaches_it():
    model = _model()
    dense = 3 * 32 * 32
    welore(model, reduction=0.5)
    weights = sum(m.dense_weight().numel() if not m.low_rank else m.rank * 64 for m in model.modules() if isinstance(m, WeLoreLinear))
    assert weights <= 0.5 * dense


def test_finetuning_the_low_rank_components_lowers_the_loss():
    model = _model()
    target = _model()
    with torch.no_grad():
        target[0].weight.add_(0.05 * torch.randn(32, 32))
    welore(model, threshold=0.01)
    frozen = model[2].weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(100):
        x = torch.randn(32, 32)
        loss = (model(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert torch.equal(model[2].weight, frozen)  # the N-LRC did not move


def test_convert_by_name():
    model = _model()
    new = L.convert(model, "welore", rank=None, threshold=0.01, targets="0")
    assert list(new) == ["0"] and new["0"].low_rank


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"threshold": 1.5}, ["WeLoreLinear", "threshold", "[0, 1]"]),
        ({"threshold": "high"}, ["WeLoreLinear", "threshold", "[0, 1]"]),
        ({"rank": 0}, ["WeLoreLinear", "rank", "[1, 32]"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        WeLoreLinear.from_linear(_flat_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_welore_needs_exactly_one_of_threshold_and_reduction_and_a_reachable_target():
    model = _model()
    with pytest.raises(ConfigError, match="exactly one of threshold"):
        welore(model)
    with pytest.raises(ConfigError, match="exactly one of threshold"):
        welore(model, threshold=0.1, reduction=0.5)
    with pytest.raises(ConfigError, match="out of reach"):
        welore(model, reduction=0.99)
    assert not any(isinstance(m, WeLoreLinear) for m in model.modules())  # nothing changed
