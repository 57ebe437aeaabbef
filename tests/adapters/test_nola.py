"""NOLA: coefficients over shared fixed random bases; only coefficients and the seed are saved."""

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
from safetensors.torch import load_file

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.errors import ConfigError

OPTIONS = {"rank": 4, "num_basis_a": 16, "num_basis_b": 12}


def test_parameter_count_is_ka_plus_kb_and_the_model_starts_unchanged():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    plan = attach(model, "nola", "all-linear", **OPTIONS)
    assert plan.parameters == (16 + 12) * len(plan.layers)  # k_a + k_b per layer, any shape
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)


def test_layers_of_one_shape_share_one_basis_tensor():
    model = llama()
    attach(model, "nola", "all-linear", **OPTIONS)
    layers = adapted_layers(model)
    q = [ly.adapters["default"] for p, ly in layers.items() if p.endswith(("q_proj", "k_proj"))]
    bases = [ad._basis_a.get("cpu", torch.float32) for ad in q]
    assert len(bases) >= 2 and all(b is bases[0] for b in bases)
    for ad in q:
        assert set(ad.state_dict()) == {"nola_alpha", "nola_beta"}


def test_delta_matches_delta_weight_loss_drops_and_merge_round_trip():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    attach(model, "nola", "all-linear", **OPTIONS)
    make_trained(model, std=0.3)
    for layer in adapted_layers(model).values():
        ad = layer.adapters["default"]
        v = torch.randn(3, ad.layer.in_features)
        torch.testing.assert_close(ad.delta(v, None), v @ ad.delta_weight().t())
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=3e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_save_load_round_trip_stores_coefficients_and_seed_only(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "nola", ["q_proj", "down_proj"], seed=7, **OPTIONS)
    make_trained(model)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    names = {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "adapter.safetensors")}
    assert names == {"nola_alpha", "nola_beta"}
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    other_seed = llama()
    attach(other_seed, "nola", ["q_proj", "down_proj"], seed=8, **OPTIONS)
    make_trained(other_seed)
    assert not torch.allclose(logits(other_seed, x), want, atol=1e-3)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_basis_a": 0}, "num_basis_a must be a positive integer"),
        ({"num_basis_b": -3}, "num_basis_b must be a positive integer"),
        ({"rank": 65}, r"q_proj: rank=65 exceeds min\(out, in\)"),
    ],
)
def test_bad_config_raises_before_anything_is_attached(options, match):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        attach(model, "nola", "q_proj", **{**OPTIONS, **options})
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_conv_and_embedding_layers_and_two_adapters_on_one_layer_merge_exactly():
    model = ConvNet().eval()
    idx = tokens(n=3, length=5, vocab=20)
    attach(model, "nola", ["embed", "conv1", "conv2", "head"], name="a", **{**OPTIONS, "rank": 2})
    attach(model, "randlora", ["head"], name="b", rank=2)
    from rankwise.adapters import set_active

    set_active(model, ["a", "b"])
    make_trained(model, "a", std=0.3)
    make_trained(model, "b", std=0.05, seed=1)
    assert_merge_round_trip(model, idx)


@pytest.mark.parametrize(
    ("method", "options", "per_layer"),
    [
        ("nola", OPTIONS, lambda out, inp: 28),
        ("tera", {"rank": 4}, lambda out, inp: 16),
        ("loldu", {"rank": 4}, lambda out, inp: 5),
        ("randlora", {"rank": 4}, lambda out, inp: -(-min(out, inp) // 4) * (4 + min(out, inp))),
    ],
)
def test_dry_run_counts_the_formula_without_touching_the_model(method, options, per_layer):
    model = llama()
    before = snapshot(model)
    plan = attach(model, method, "all-linear", dry_run=True, **options)
    sizes = {p: m.weight.shape for p, m in model.named_modules() if p in plan.layers}
    assert plan.parameters == sum(per_layer(*s) for s in sizes.values())
    assert_same_state(model, before)
    assert not adapted_layers(model)
