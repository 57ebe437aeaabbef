"""LoLDU: frozen LDU factors of W; only the diagonal (r) and a scale train."""

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
from rankwise.adapters.methods.loldu import ldu_head
from rankwise.errors import ConfigError, ModelError


def test_ldu_head_is_exact_at_full_rank_and_the_first_pivots_below():
    w = torch.randn(12, 7, dtype=torch.float64)
    lower, d, upper = ldu_head(w, 7)
    torch.testing.assert_close(lower @ torch.diag(d) @ upper, w)
    torch.testing.assert_close(torch.diagonal(upper), torch.ones(7, dtype=torch.float64))
    with pytest.raises(ModelError, match="pivots include a zero"):
        ldu_head(torch.zeros(4, 4), 2)


def test_parameter_count_is_r_plus_one_and_the_model_starts_unchanged():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    plan = attach(model, "loldu", "all-linear", rank=8)
    assert plan.parameters == (8 + 1) * len(plan.layers)
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    for layer in adapted_layers(model).values():
        ad = layer.adapters["default"]
        w = layer.base_layer.weight.double()
        head = ad.loldu_L.double() @ torch.diag(ad.loldu_D.double()) @ ad.loldu_U.double()
        # the kept terms are W's first 8 elimination steps: the residual has rank out/in - 8
        rest = torch.linalg.matrix_rank(w - head, rtol=1e-4)
        assert int(rest) == min(w.shape) - 8


def test_loss_drops_and_merge_round_trip():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    attach(model, "loldu", "all-linear", rank=8)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=5e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_conv_layers_and_save_load_round_trip(tmp_path):
    model = ConvNet().eval()
    idx = tokens(n=3, length=5, vocab=20)
    attach(model, "loldu", ["conv1", "conv2", "head"], rank=2)
    make_trained(model)
    want = model(idx)
    assert_merge_round_trip(model, idx)
    save_adapter(model, tmp_path)
    fresh = ConvNet().eval()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(idx), want, atol=1e-6, rtol=0)


def test_bad_rank_raises_naming_the_layer_before_anything_is_attached():
    model = nn.Sequential(nn.Linear(6, 4))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"0: rank=5 exceeds min\(out, in\) = min\(4, 6\) = 4"):
        attach(model, "loldu", "0", rank=5)
    assert_same_state(model, before)
