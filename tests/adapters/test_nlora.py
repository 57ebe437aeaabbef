"""NLoRA: B M A started from a Nyström sketch with the residual as base; IntTune trains M only."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_merge_round_trip, llama, logits, make_trained, tokens, train
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.init import residual_to_lora


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: m.weight.detach().clone() for p, m in model.named_modules() if p.endswith("proj")}


def test_nystrom_start_keeps_the_model_with_orthonormal_outer_factors():
    model = llama().double()
    w0 = weights(model)
    x = tokens(vocab=200)
    before = logits(model, x)
    attach(model, "nlora", "all-linear", rank=4, alpha=8)
    torch.testing.assert_close(logits(model, x), before, atol=1e-10, rtol=0)
    eye = torch.eye(4, dtype=torch.float64)
    for path, layer in adapted_layers(model).items():
        ad = layer.adapters["default"]
        bma = ad.scaling * ad.lora_B @ ad.lora_R @ ad.lora_A
        torch.testing.assert_close(layer.base_layer.weight + bma, w0[path], atol=1e-12, rtol=0)
        torch.testing.assert_close(ad.lora_B.T @ ad.lora_B, eye)
        torch.testing.assert_close(ad.lora_A @ ad.lora_A.T, eye)
        # the start captures far more of W than a random rank-4 piece would
        share = (4 / min(w0[path].shape)) ** 0.5  # a random rank-4 piece's norm share
        assert float(bma.detach().norm()) > 0.3 * share * float(w0[path].norm())


def test_nystrom_start_is_exact_on_a_rank_r_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(12, 3, dtype=torch.float64) @ torch.randn(3, 20).double())
    w = model[0].weight.detach().clone()
    attach(model, "nlora", "0", rank=3)
    ad = model[0].adapters["default"]
    torch.testing.assert_close(ad.scaling * ad.lora_B @ ad.lora_R @ ad.lora_A, w)
    assert float(model[0].base_layer.weight.abs().max()) < 1e-10


@pytest.mark.parametrize("int_tune", [False, True])
def test_parameter_counts_and_what_trains(int_tune):
    model = llama()
    plan = attach(model, "nlora", "all-linear", rank=4, int_tune=int_tune)
    layers = adapted_layers(model)
    want = sum(
        16 + (0 if int_tune else 4 * (ly.view.out_features + ly.view.in_features))
        for ly in layers.values()
    )
    assert plan.parameters == want
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"lora_R"} if int_tune else {"lora_A", "lora_B", "lora_R"})


@pytest.mark.parametrize("int_tune", [False, True])
def test_loss_drops_and_merged_equals_unmerged(int_tune):
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    attach(model, "nlora", "all-linear", rank=4, int_tune=int_tune)
    frozen = {p: ly.adapters["default"].lora_A.clone() for p, ly in adapted_layers(model).items()}
    lr = 3e-2 if int_tune else 1e-2  # r² parameters need a bigger step to move as far
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=lr, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    for path, layer in adapted_layers(model).items():
        assert torch.equal(layer.adapters["default"].lora_A, frozen[path]) == int_tune
    assert_merge_round_trip(model, x)


def test_save_load_round_trip_on_the_residual_base(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "nlora", ["q_proj", "up_proj"], rank=4, int_tune=True)
    make_trained(model, std=0.1)
    want = logits(model, x)
    residual_base = copy.deepcopy(model)  # the saved adapter is relative to W_res
    save_adapter(model, tmp_path, format="rankwise")
    fresh = llama()
    fresh.load_state_dict(
        {
            k.replace(".base_layer", ""): v
            for k, v in residual_base.state_dict().items()
            if "adapters" not in k
        }  # fmt: skip
    )
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_converts_to_a_plain_lora_on_the_original_weights():
    model = llama()
    w0 = weights(model)
    x = tokens(vocab=200)
    attach(model, "nlora", ["k_proj", "down_proj"], rank=4)
    make_trained(model, std=0.1)
    want = logits(model, x)
    assert set(residual_to_lora(model).values()) == {8}
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=0)
    for path, layer in adapted_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, w0[path], atol=1e-6, rtol=0)
