"""LoRA-SB: B, R, A from the first full fine-tuning update; training R follows its projection."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
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
from rankwise.errors import ConfigError

TARGETS = ["q_proj", "down_proj"]


def weight_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain autograd: d(LM loss)/dW for every q_proj/down_proj weight of ``model``."""
    model = copy.deepcopy(model)
    named = {p: m.weight for p, m in model.named_modules() if p.endswith(tuple(TARGETS))}
    loss = model(x, labels=x).loss
    return dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))


def test_init_is_the_best_rank_r_fit_of_the_first_adam_step_and_restores_flags():
    model = llama().double()
    x = tokens(n=2, length=16, vocab=200)
    grads = weight_grads(model, x)
    attach(model, "lora_sb", TARGETS, rank=4, alpha=2,
           init_options={"inputs": x, "lr": 1e-3, "exact": True})  # fmt: skip
    for path, layer in adapted_layers(model).items():
        ad = layer.adapters["default"]
        update = -1e-3 * torch.sign(grads[path])
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        got = ad.scaling * ad.lora_B @ ad.lora_R @ ad.lora_A
        torch.testing.assert_close(got, U[:, :4] * S[:4] @ Vh[:4], atol=1e-12, rtol=0)
        eye = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(ad.scaling * ad.lora_B.T @ ad.lora_B, eye)
        torch.testing.assert_close(ad.scaling * ad.lora_A @ ad.lora_A.T, eye)
        assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None
        assert ad.lora_R.requires_grad


def test_training_r_moves_w_by_the_projected_full_gradient_whatever_alpha():
    x = tokens(n=2, length=16, vocab=200)
    induced = []
    for alpha in (1.0, 16.0):
        model = llama().double()
        attach(model, "lora_sb", TARGETS, rank=4, alpha=alpha,
               init_options={"inputs": x, "exact": True})  # fmt: skip
        layers = adapted_layers(model)
        bases = [layer.base_layer.weight.requires_grad_(True) for layer in layers.values()]
        rs = [layer.adapters["default"].lora_R for layer in layers.values()]
        grads = torch.autograd.grad(model(x, labels=x).loss, bases + rs)
        # the gradient wrt the base weight is the gradient wrt the adapted W + s·B R A
        full = dict(zip(layers, grads[: len(bases)], strict=True))
        g_r = dict(zip(layers, grads[len(bases) :], strict=True))
        step = {}
        for path, layer in adapted_layers(model).items():
            ad = layer.adapters["default"]
            g = g_r[path]
            step[path] = ad.scaling * ad.lora_B @ g @ ad.lora_A  # the W-space step R induces
            pu, pv = ad.scaling * ad.lora_B @ ad.lora_B.T, ad.scaling * ad.lora_A.T @ ad.lora_A
            torch.testing.assert_close(step[path], pu @ full[path] @ pv, atol=1e-12, rtol=1e-8)
        induced.append(step)
    for path in induced[0]:
        torch.testing.assert_close(induced[0][path], induced[1][path], atol=1e-12, rtol=1e-8)


def test_parameter_count_loss_drops_and_merged_equals_unmerged():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    plan = attach(model, "lora_sb", "all-linear", rank=4, init_options={"inputs": x, "lr": 1e-2})
    assert plan.parameters == 16 * len(plan.layers)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora_sb", {}),  # no inputs
        ("lora_sb", {"inputs": tokens(vocab=200), "optimizer": "lion"}),
        ("lora_sb", {"inputs": tokens(vocab=200), "lr": -1.0}),
        ("lora", {"inputs": tokens(vocab=200)}),  # lora has no R
    ],
)
def test_failures_leave_the_model_unchanged(method, options):
    model = llama()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError):
        attach(model, method, TARGETS, rank=4, init="lora_sb", init_options=options)
    assert_same_state(model, before)
    assert not adapted_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_custom_loss_and_sgd_update():
    model = llama()
    x = tokens(n=2, length=8, vocab=200)
    calls = []

    def loss_fn(m, batch):
        calls.append(batch.shape)
        return m(batch).logits.square().mean()

    attach(model, "lora_sb", "q_proj", rank=2,
           init_options={"inputs": x, "loss_fn": loss_fn, "optimizer": "sgd"})  # fmt: skip
    assert calls == [torch.Size([2, 8])]
    assert all(layer.adapters["default"].lora_R.any() for layer in adapted_layers(model).values())


def test_save_load_round_trip(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "lora_sb", TARGETS, rank=4, init_options={"inputs": x})
    make_trained(model, std=0.1)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_lora_xs_takes_the_lora_sb_start_and_svfit_nlora_refuse_it():
    x = tokens(n=2, length=8, vocab=200)
    model = llama()
    attach(model, "lora_xs", TARGETS, rank=4, init="lora_sb", init_options={"inputs": x})
    ad = next(iter(adapted_layers(model).values())).adapters["default"]
    assert ad.lora_R.abs().sum() > 0  # R = diag(S) of the approximated update, not LoRA-XS's zero
    assert torch.count_nonzero(ad.lora_R - torch.diag(torch.diagonal(ad.lora_R))) == 0
    for method in ("svfit", "nlora"):
        with pytest.raises(ConfigError):
            attach(llama(), method, TARGETS, rank=4, init="lora_sb", init_options={"inputs": x})
