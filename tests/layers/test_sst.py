"""rankwise.layers.sst: Sparse Spectral Training (SSTLinear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.sst import SSTLinear
from rankwise.models import count_parameters, tiny_llama


def _linear(n_in: int = 12, n_out: int = 8) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out)


def test_equals_the_original_at_init_and_forward_is_the_dense_weight():
    linear = _linear()
    layer = SSTLinear.from_linear(linear, rank=3)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer.dense_weight(), linear.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)


def test_parameter_count_formula():
    n_in, n_out, r = 12, 8, 3
    layer = SSTLinear.from_linear(_linear(n_in, n_out), rank=r)
    K = min(n_in, n_out)
    # stored: frozen U, Vh, all of s, the active copies, the bias
    assert count_parameters(layer) == K * (n_in + n_out + 1) + r * (n_in + n_out) + n_out
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == K + r * (n_in + n_out) + n_out


def test_only_the_sampled_directions_and_all_singular_values_train():
    layer = SSTLinear.from_linear(_linear(), rank=2)
    U0, Vh0, s0 = layer.U.clone(), layer.Vh.clone(), layer.s.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(16, 12)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(layer.s.detach(), s0)  # every singular value moves
    assert bool((layer.s.detach() != s0).all())
    layer.sync()
    others = [i for i in range(8) if i not in layer.index.tolist()]
    assert torch.equal(layer.U[:, others], U0[:, others]) and torch.equal(layer.Vh[others], Vh0[others])
    assert not torch.equal(layer.U[:, layer.index], U0[:, layer.index])


def test_sampling_is_proportional_to_the_singular_values():
    layer = SSTLinear(4, 4, 1, bias=False, seed=3)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([6.0, -3.0, 1.0, 0.0]))  # |s| weights; a zero is never picked
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[layer.resample()] += 1
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.03, rtol=0)
    assert counts[3] == 0


def test_resample_draws_distinct_directions():
    layer = SSTLinear.from_linear(_linear(), rank=5)
    for _ in range(20):
        idx = layer.resample()
        assert len(set(idx.tolist())) == 5


def test_resvd_keeps_the_function_and_restores_orthonormal_factors():
    layer = SSTLinear.from_linear(_linear(), rank=3, resample_every=1)
    target = nn.Linear(12, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.2)
    for step in range(5):
        opt.zero_grad()
        x = torch.randn(16, 12)
        (layer(x) - target(x).detach()).pow(2).mean().backward()
        opt.step()
        layer.after_optimizer_step(step)
    x = torch.randn(4, 12)
    before = layer(x).detach()
    assert (layer.U.T @ layer.U - torch.eye(8)).abs().max() > 1e-3  # training broke orthogonality
    layer.resvd()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.Vh @ layer.Vh.T, torch.eye(8), atol=1e-5, rtol=0)
    s = layer.s.detach()
    assert bool((s >= 0).all()) and bool((s[:-1] >= s[1:]).all())


def test_enhanced_gradient_drops_the_singular_value_factor():
    x = torch.randn(16, 12)
    grads = {}
    for enhanced in (True, False):
        layer = SSTLinear.from_linear(_linear(), rank=3, enhanced_gradient=enhanced, seed=5)
        layer(x).pow(2).sum().backward()
        grads[enhanced] = (layer.U_active.grad, layer.V_active.grad, layer.s.detach()[layer.index])
    (u_e, v_e, s), (u_d, v_d, _) = grads[True], grads[False]
    torch.testing.assert_close(u_e * s, u_d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_e * s[:, None], v_d, atol=1e-5, rtol=1e-4)


def test_hook_schedules_resvd_and_resampling_and_clears_the_optimizer_state():
    layer = SSTLinear.from_linear(_linear(), rank=2, every=3, resample_every=2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    calls = []
    layer.resvd = lambda: calls.append("svd")  # type: ignore[method-assign]
    original = layer.resample
    layer.resample = lambda: calls.append("sample") or original()  # type: ignore[method-assign]
    for step in range(6):
        opt.zero_grad()
        layer(torch.randn(4, 12)).sum().backward()
        opt.step()
        assert layer.U_active in opt.state
        layer.after_optimizer_step(step, opt)
        if (step + 1) % 2 == 0:
            assert layer.U_active not in opt.state and layer.s in opt.state
    assert calls == ["sample", "svd", "sample", "svd", "sample"]


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    layer = SSTLinear.from_linear(_linear(), rank=3, every=25)
    target = nn.Linear(12, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for step in range(150):
        x = torch.randn(32, 12)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.after_optimizer_step(step, opt)
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10


def test_convert_on_a_tiny_llama_keeps_the_logits():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    ids = torch.randint(0, 200, (1, 8))
    before = model(ids).logits
    new = L.convert(model, "sst", rank=4)
    assert len(new) == 7 and all(isinstance(m, SSTLinear) for m in new.values())
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"rank": 0}, ["SSTLinear", "rank", "[1, 8]"]),
        ({"rank": 9}, ["SSTLinear", "[1, 8]"]),
        ({"rank": 2, "every": 0}, ["SSTLinear", "every", ">= 1"]),
        ({"rank": 2, "resample_every": 1.5}, ["SSTLinear", "resample_every", ">= 1"]),
        ({"rank": 2, "enhanced_gradient": "yes"}, ["SSTLinear", "enhanced_gradient", "True or False"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        SSTLinear.from_linear(_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_convert_lists_the_valid_options_of_sst():
    with pytest.raises(ConfigError, match="every"):
        L.convert(nn.Sequential(_linear()), "sst", rank=2, evry=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_keeps_the_dtype_and_trains_in_it(dtype):
    linear = _linear().to(dtype)
    layer = SSTLinear.from_linear(linear, rank=2, every=1)
    assert {p.dtype for p in layer.parameters()} == {dtype} and layer.U.dtype == dtype
    x = torch.randn(4, 12, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(layer(x), linear(x), atol=tol, rtol=tol)
    layer(x).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=1e-3).step()
    layer.after_optimizer_step(0)  # re-SVD (computed in float32 for bf16) and resample
    assert layer.s.dtype == dtype and bool(torch.isfinite(layer(x)).all())


def test_state_dict_round_trip_restores_the_spectrum_and_the_active_directions():
    layer = SSTLinear.from_linear(_linear(), rank=3, seed=1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 12)).pow(2).mean().backward()
    opt.step()
    layer.after_optimizer_step(0)
    fresh = SSTLinear.from_linear(_linear(), rank=3, seed=2)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(fresh.index, layer.index)
    torch.testing.assert_close(fresh(x), layer(x))
