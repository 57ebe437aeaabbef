"""TeRA: a random Tucker network over the tensorized update; only four diagonals train."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_merge_round_trip,
    assert_same_state,
    gpt2,
    llama,
    logits,
    make_trained,
    snapshot,
    tokens,
    train,
)
from safetensors.torch import load_file

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.methods.tera import split_mode
from rankwise.errors import ConfigError


def test_split_mode_is_the_most_square_factor_pair():
    assert split_mode(64) == (8, 8)
    assert split_mode(128) == (8, 16)
    assert split_mode(97) == (1, 97)
    assert split_mode(2048) == (32, 64)


def test_parameter_count_is_4r_and_the_update_is_high_rank():
    model = llama().double()
    x = tokens(vocab=200)
    before = logits(model, x)
    plan = attach(model, "tera", "all-linear", rank=4)
    assert plan.parameters == 4 * 4 * len(plan.layers)  # four diagonals of size r
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    make_trained(model, std=0.5)
    for layer in adapted_layers(model).values():
        ad = layer.adapters["default"]
        eye = torch.eye(ad.layer.in_features, dtype=torch.float64)
        dw = ad.apply_update(eye, ad.scaling).t()  # ΔW in float64
        # rank r² = 16 from 16 parameters (LoRA: rank 1 needs out + in = 128+)
        assert int(torch.linalg.matrix_rank(dw, rtol=1e-9)) == 16
        v = torch.randn(3, ad.layer.in_features, dtype=torch.float64)
        torch.testing.assert_close(ad.delta(v, None), v @ dw.t())
        torch.testing.assert_close(ad.delta_weight(), dw.float())


def test_frozen_tensors_are_shared_and_not_saved(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "tera", ["q_proj", "k_proj", "up_proj"], rank=4, seed=3)
    ads = [ly.adapters["default"] for ly in adapted_layers(model).values()]
    cores = [ad._core.get("cpu", torch.float32) for ad in ads]
    assert all(c is cores[0] for c in cores)
    make_trained(model)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "adapter.safetensors")} == {
        "tera_lambda"
    }
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [llama, gpt2])
def test_loss_drops_and_merge_round_trip(make):
    model = make()
    vocab = 97 if make is gpt2 else 200
    x = tokens(n=4, length=16, vocab=vocab)
    attach(model, "tera", "all-linear", rank=4, alpha=16)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=0.1, train_mode=True)
    assert losses[-1] < losses[0] - (0.1 if make is llama else 0.05)  # 16 parameters a layer
    assert_merge_round_trip(model, x)


def test_non_linear_layer_is_refused_naming_it_before_anything_is_attached():
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"embed_tokens: tera adapts linear layers.*valid targets"):
        attach(model, "tera", ["q_proj", "embed_tokens"], rank=4)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_a_rank_whose_core_would_not_fit_is_refused():
    with pytest.raises(ConfigError, match=r"rank=65 is too large.*valid: 1\.\.64"):
        attach(llama(), "tera", "q_proj", rank=65)
