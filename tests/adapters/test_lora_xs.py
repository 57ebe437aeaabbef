"""LoRA-XS: frozen B = U S and A = Vᵀ from the weight's SVD, a trainable r×r R between."""

from __future__ import annotations

import torch
from conftest import assert_merge_round_trip, llama, logits, make_trained, tokens, train
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter


def test_parameter_count_is_r_squared_per_layer():
    model = llama()
    plan = attach(model, "lora_xs", "all-linear", rank=4)
    assert plan.parameters == 16 * len(plan.layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_R") for n in trainable)


def test_frozen_factors_are_the_truncated_svd_of_w():
    model = llama().double()
    weights = {p: m.weight.detach().clone() for p, m in model.named_modules() if p.endswith("proj")}
    attach(model, "lora_xs", ["k_proj", "gate_proj"], rank=5, exact=True)
    for path, layer in adapted_layers(model).items():
        ad = layer.adapters["default"]
        U, S, Vh = torch.linalg.svd(weights[path], full_matrices=False)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, U[:, :5] * S[:5] @ Vh[:5])
        torch.testing.assert_close(ad.lora_A @ ad.lora_A.T, torch.eye(5, dtype=torch.float64))
        assert not ad.lora_R.any()


def test_training_fits_an_update_inside_the_top_subspaces():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16, bias=False)).double()
    w = model[0].weight.detach().clone()
    U, S, Vh = torch.linalg.svd(w)
    g = torch.Generator().manual_seed(2)
    r_star = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3
    target = w + U[:, :4] * S[:4] @ r_star @ Vh[:4]
    x = torch.randn(256, 24, generator=g, dtype=torch.float64)
    y = x @ target.T
    attach(model, "lora_xs", "0", rank=4, exact=True)
    losses = train(model, lambda: (model(x) - y).square().mean(), steps=150, lr=0.05)
    assert losses[-1] < 1e-3 * losses[0]
    torch.testing.assert_close(model[0].adapters["default"].lora_R, r_star, atol=1e-3, rtol=0)


def test_lm_loss_drops_and_merged_equals_unmerged():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    before = logits(model, x)
    attach(model, "lora_xs", "all-linear", rank=8, alpha=64)
    assert torch.equal(logits(model, x), before)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=5e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_save_load_round_trip(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "lora_xs", ["v_proj", "up_proj"], rank=4)
    make_trained(model, std=0.5)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
