"""FLoRA: a Tucker core over the weight's own modes (Conv2d kernels stay 4-D)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ConvNet,
    assert_merge_round_trip,
    assert_same_state,
    llama,
    logits,
    make_trained,
    snapshot,
    tokens,
    train,
)
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.methods.flora import parameter_count
from rankwise.errors import ConfigError


def test_parameter_count_is_core_plus_factors():
    model = ConvNet()
    plan = attach(model, "flora", ["conv1", "conv2", "head"], rank=2, kernel_rank=2)
    # conv1 (8, 6, 3): core 2·2·2 + 8·2 + 6·2 + 3·2; conv2 (4, 2, 3, 3): 2·2·2·2 + 4·2 + 2·2 + 3·2 + 3·2
    # head (5, 16): 2·2 + 5·2 + 16·2
    expected = (8 + 16 + 12 + 6) + (16 + 8 + 4 + 6 + 6) + (4 + 10 + 32)
    assert plan.parameters == expected
    assert parameter_count((4, 2, 3, 3), (2, 2, 2, 2)) == 16 + 8 + 4 + 6 + 6


def test_conv2d_update_is_the_tucker_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, (3, 2), padding=1)).double()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    attach(model, "flora", "0", rank=2, kernel_rank=2, alpha=4.0)  # s = 2
    ad = model[0].adapters["default"]
    make_trained(model, std=0.5)
    u0, u1, u2, u3 = ad.flora_factors
    dw = 2 * torch.einsum("abcd,oa,ib,hc,wd->oihw", ad.flora_core, u0, u1, u2, u3)
    assert ad.flora_core.shape == (2, 2, 2, 2)
    torch.testing.assert_close(ad.delta_weight().double(), dw.reshape(5, -1).float().double(), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    ref = nn.functional.conv2d(x, w + dw, b, padding=1)
    torch.testing.assert_close(model(x), ref)


def test_linear_is_the_two_mode_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7, bias=False)).double()
    w = model[0].weight.detach().clone()
    attach(model, "flora", "0", rank=3)
    ad = model[0].adapters["default"]
    make_trained(model, std=0.5)
    u_out, u_in = ad.flora_factors
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (w + u_out @ ad.flora_core @ u_in.T).T)


def test_starts_unchanged_loss_drops_and_merges():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    before = logits(model, x)
    attach(model, "flora", "all-linear", rank=8, alpha=32)
    assert torch.equal(logits(model, x), before)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_conv_model_trains_and_merges():
    model = ConvNet()
    idx = torch.randint(0, 20, (16, 9), generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    attach(model, "flora", ["conv1", "conv2"], rank=2, alpha=8)
    losses = train(model, lambda: (model(idx) - target).square().mean(), steps=30, lr=3e-2)
    assert losses[-1] < 0.9 * losses[0]
    assert_merge_round_trip(model, idx)


def test_save_load_round_trip(tmp_path):
    model = ConvNet()
    idx = torch.randint(0, 20, (3, 7))
    attach(model, "flora", ["conv2", "head"], rank=2)
    make_trained(model, std=0.3)
    want = logits(model, idx)
    save_adapter(model, tmp_path)
    fresh = ConvNet()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, idx), want, atol=1e-6, rtol=0)


def test_a_layer_without_the_requested_nd_weight_is_refused_before_attaching():
    model = ConvNet()
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        attach(model, "flora", ["conv2", "head"], rank=2, ndim=4)
    msg = str(err.value)
    assert "head" in msg and "2-D weight" in msg and "valid ndim here: 2 or None" in msg
    assert not adapted_layers(model)
    assert_same_state(model, before)
    with pytest.raises(ConfigError, match=r"conv2: rank=3 exceeds min\(out, in channels\) = 2"):
        attach(model, "flora", ["conv2"], rank=3)
    with pytest.raises(ConfigError, match="kernel_rank must be a positive integer"):
        attach(model, "flora", ["conv2"], rank=1, kernel_rank=0)
