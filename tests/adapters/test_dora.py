"""DoRA: factored row norm, agreement with PEFT's DoRA, merge, memory behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gpt2, llama, logits, make_trained, tokens

from rankwise.adapters import adapted_layers, attach, merge, unmerge
from rankwise.adapters.methods.dora import _factored_row_norm


@pytest.mark.parametrize(
    ("m", "n", "r", "s"), [(7, 5, 2, 0.5), (32, 48, 8, 2.0), (64, 16, 16, 1.0)]
)
def test_factored_norm_equals_dense_float64(m, n, r, s):
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    dense = torch.linalg.vector_norm(w + s * b @ a, dim=1)
    factored = _factored_row_norm(w, w.square().sum(1), a, b, s)
    torch.testing.assert_close(factored, dense, atol=1e-12, rtol=1e-12)


def test_fresh_dora_leaves_outputs_unchanged_and_magnitude_is_row_norm(tiny):
    x = tokens()
    before = logits(tiny, x)
    attach(tiny, "dora", targets=["q_proj", "v_proj"], rank=4)
    torch.testing.assert_close(logits(tiny, x), before, atol=1e-6, rtol=1e-5)
    layer = tiny.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(
        layer.adapters["default"].lora_magnitude, layer.base_layer.weight.norm(dim=1)
    )


def test_norm_cache_follows_factor_updates(tiny):
    attach(tiny, "dora", targets="q_proj", rank=4)
    ad = tiny.model.layers[0].self_attn.q_proj.adapters["default"]
    n0 = ad.weight_norm().clone()
    with torch.no_grad():
        ad.lora_B.add_(0.3)
    n1 = ad.weight_norm()
    w = ad.layer.weight_matrix()
    torch.testing.assert_close(n1, (w + ad.scaling * ad.lora_B @ ad.lora_A).norm(dim=1))
    assert (n1 - n0).abs().max() > 1e-3


def _peft_dora_pair(build, targets, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    base = build()
    ours = copy.deepcopy(base)
    attach(ours, "dora", targets=targets, rank=4, alpha=8, dropout=dropout)
    make_trained(ours, std=0.2)
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, use_dora=True,
            lora_dropout=dropout, fan_in_fan_out=build is gpt2,
        ),
    )  # fmt: skip
    pairs = []
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                ad = adapted_layers(ours)[name.removeprefix("base_model.model.")].adapters[
                    "default"
                ]
                module.lora_A["default"].weight.copy_(ad.lora_A)
                module.lora_B["default"].weight.copy_(ad.lora_B)
                module.lora_magnitude_vector["default"].weight.copy_(ad.lora_magnitude)
                pairs.append((ad, module))
    return ours, theirs, pairs


@pytest.mark.parametrize(
    ("build", "targets"),
    [(llama, ["q_proj", "v_proj", "down_proj"]), (gpt2, ["c_attn", "c_proj"])],
    ids=["llama", "gpt2-conv1d"],
)
def test_outputs_and_gradients_match_peft_dora(build, targets):
    ours, theirs, pairs = _peft_dora_pair(build, targets)
    x = tokens()
    y_ours, y_theirs = logits(ours, x), logits(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    for ad, module in pairs:
        assert ad.lora_magnitude.grad.abs().max() > 0
        torch.testing.assert_close(ad.lora_A.grad, module.lora_A["default"].weight.grad)
        torch.testing.assert_close(ad.lora_B.grad, module.lora_B["default"].weight.grad)
        torch.testing.assert_close(
            ad.lora_magnitude.grad, module.lora_magnitude_vector["default"].weight.grad
        )


def test_training_with_dropout_matches_peft_dora():
    ours, theirs, _ = _peft_dora_pair(llama, ["q_proj", "o_proj"], dropout=0.3)
    ours.train()
    theirs.train()
    x = tokens()
    torch.manual_seed(5)
    y_ours = logits(ours, x)
    torch.manual_seed(5)
    y_theirs = logits(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)


def test_two_dora_adapters_on_one_layer_merge_exactly():
    model = gpt2()
    attach(model, "dora", targets="c_attn", rank=3, name="a")
    attach(model, "dora", targets="c_attn", rank=2, name="b")
    make_trained(model, "a", std=0.3)
    make_trained(model, "b", std=0.3, seed=4)
    x = tokens()
    weights = {p: layer.base_layer.weight.clone() for p, layer in adapted_layers(model).items()}
    with torch.no_grad():
        y = logits(model, x)
        merge(model)
        torch.testing.assert_close(logits(model, x), y, atol=2e-5, rtol=1e-4)
        unmerge(model)
    for p, layer in adapted_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[p], atol=1e-6, rtol=1e-5)


def test_backward_saves_a_single_activation_for_the_combination():
    """Only t = base + s·lora (tokens × out) is saved by the fused step, not base and lora."""
    layer_model = torch.nn.Sequential(torch.nn.Linear(32, 48))
    attach(layer_model, "dora", targets="0", rank=4)
    make_trained(layer_model)
    x = torch.randn(10, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer_model(x).sum().backward()
    full = [s for s in saved if tuple(s) == (10, 48)]
    assert len(full) == 1
