"""SVFit: only the top-r singular values train; U and V are the weight's singular vectors."""

from __future__ import annotations

import pytest
import torch
from conftest import llama, logits, make_trained, tokens, train
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, merge, save_adapter, unmerge


def single_linear(out: int = 16, inp: int = 24, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, out, bias=False)).double()


def test_parameter_count_is_r_per_layer_and_only_sigma_trains():
    model = llama()
    plan = attach(model, "svfit", "all-linear", rank=4, n_iter=1)
    assert plan.parameters == 4 * len(plan.layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_sigma") for n in trainable)
    dry = attach(llama(), "svfit", "all-linear", rank=4, dry_run=True)  # shape-only: no SVD
    assert dry.parameters == plan.parameters


def test_factors_are_the_top_singular_vectors_and_sigma_shifts_the_singular_values():
    model = single_linear()
    w = model[0].weight.detach().clone()
    attach(model, "svfit", "0", rank=3, exact=True)
    ad = model[0].adapters["default"]
    U, S, Vh = torch.linalg.svd(w)
    torch.testing.assert_close(ad.lora_B * S[:3] @ ad.lora_A, U[:, :3] * S[:3] @ Vh[:3])
    with torch.no_grad():
        ad.lora_sigma.copy_(torch.tensor([0.5, 0.25, 0.1]))
    merge(model)
    got = torch.linalg.svdvals(model[0].base_layer.weight)
    want = torch.cat([S[:3] + ad.scaling * torch.tensor([0.5, 0.25, 0.1]), S[3:]])
    torch.testing.assert_close(got, want.sort(descending=True).values)


def test_training_fits_a_change_of_the_top_singular_values():
    model = single_linear()
    w = model[0].weight.detach().clone()
    U, S, Vh = torch.linalg.svd(w)
    target = w + U[:, :4] * torch.tensor([0.8, -0.5, 0.3, 0.6], dtype=w.dtype) @ Vh[:4]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 24, generator=g, dtype=torch.float64)
    y = x @ target.T
    attach(model, "svfit", "0", rank=4, exact=True)
    losses = train(model, lambda: (model(x) - y).square().mean(), steps=150, lr=0.05)
    assert losses[-1] < 1e-3 * losses[0]


def test_fresh_adapter_changes_nothing_and_merged_equals_unmerged():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    attach(model, "svfit", "all-linear", rank=4)
    assert torch.equal(logits(model, x), before)
    make_trained(model, std=0.5)
    adapted = logits(model, x)
    assert float((adapted - before).abs().max()) > 1e-3
    merge(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)


def test_save_load_round_trip_restores_vectors_and_values(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "svfit", ["q_proj", "down_proj"], rank=4, name="sv")
    make_trained(model, "sv", std=0.5)
    want = logits(model, x)
    save_adapter(model, tmp_path, "sv")
    fresh = llama()
    load_adapter(fresh, tmp_path, "sv")
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    for path, layer in adapted_layers(fresh).items():
        ours = adapted_layers(model)[path].adapters["sv"]
        assert torch.equal(layer.adapters["sv"].lora_B, ours.lora_B)


@pytest.mark.parametrize("bad", [{"n_iter": -2}, {"exact": "yes"}, {"seed": 1.5}])
def test_bad_svd_options_are_config_errors(bad):
    from rankwise.errors import ConfigError

    with pytest.raises(ConfigError):
        attach(llama(), "svfit", "q_proj", rank=2, **bad)
