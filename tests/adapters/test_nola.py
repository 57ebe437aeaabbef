"""NOLA: coefficients over shared fixed random bases; only coefficients and the seed are saved."""

from __future__ import annotations

import json

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
from torch import nn

from rankwise.adapters import (
    adapted_layers,
    attach,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from rankwise.adapters.methods.nola import NolaConfig
from rankwise.adapters.random_bases import random_basis
from rankwise.errors import CheckpointError, ConfigError

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
    make_trained(model, std=0.1)  # ‖ΔW‖ up to 2.4x ‖W‖ (β starts at 1/√in = 0.125)
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


# ----------------------------------------------------------------------------- step size vs k


def _adam_factor_step(k: int, format_version: int) -> tuple[float, float]:
    """RMS change of ``B`` and ``A`` per unit learning rate in one Adam step (α non-zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    attach(model, "nola", ["0"], rank=8, num_basis_a=k, num_basis_b=k, format_version=format_version)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.nola_alpha.normal_(generator=torch.Generator().manual_seed(1))
    x, target = torch.randn(32, 64), torch.randn(32, 48)
    b0, a0 = (t.detach().clone() for t in ad.factors())
    lr = 1e-3
    opt = torch.optim.Adam(ad.parameters(), lr=lr)
    ((model(x) - target) ** 2).mean().backward()
    opt.step()
    b1, a1 = ad.factors()
    return ((b1 - b0).pow(2).mean().sqrt() / lr).item(), ((a1 - a0).pow(2).mean().sqrt() / lr).item()


def test_an_adam_step_moves_each_factor_entry_by_the_learning_rate_whatever_the_bases():
    # LoRA's Adam step moves every factor entry by lr; NOLA's mixture scale keeps its factors'
    # step there for 16 to 4096 bases (k below and far above the r·n = 384..512 entries)
    for k in (16, 256, 4096):
        b_step, a_step = _adam_factor_step(k, format_version=2)
        assert 0.8 < b_step < 1.25 and 0.8 < a_step < 1.25, (k, b_step, a_step)
    # the unnormalised mixture of format 1 grew with k: 66 lr per entry of B at k=4096
    assert _adam_factor_step(4096, format_version=1)[0] > 5


def _loss_drop(method: str, lr: float, **options) -> float:
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    attach(model, method, ["q_proj", "v_proj"], rank=8, **options)
    losses = train(model, lambda: model(x, labels=x).loss, steps=20, lr=lr)
    return losses[0] - losses[-1]


def test_loss_drops_like_loras_at_4096_bases_and_loras_learning_rate():
    lr = 3e-2
    lora = _loss_drop("lora", lr)
    nola = _loss_drop("nola", lr, num_basis_a=4096, num_basis_b=4096)
    assert lora > 0.3
    assert nola > 0.75 * lora, (nola, lora)
    # format 1's parametrization (the one before format versions) did not: 0.12 against 0.53
    old = _loss_drop("nola", lr, num_basis_a=4096, num_basis_b=4096, format_version=1)
    assert old < 0.5 * lora, (old, lora)


# ----------------------------------------------------------------------------- format versions


def _format_1_delta(ad) -> torch.Tensor:
    """ΔW as NOLA computed it before format versions: B = Σ α_i B_i / √r, A = Σ β_j A_j / √in."""
    c = ad.config
    basis_a = random_basis((c.num_basis_a, c.rank, ad.layer.in_features), seed=c.seed, kind="nola_a")
    basis_b = random_basis((c.num_basis_b, c.rank, ad.layer.out_features), seed=c.seed, kind="nola_b")
    a = torch.einsum("k,krn->rn", ad.nola_beta.detach(), basis_a) / ad.layer.in_features**0.5
    b = torch.einsum("k,kro->or", ad.nola_alpha.detach(), basis_b) / c.rank**0.5
    return b @ a * ad.scaling


def test_saved_config_records_format_version_2(tmp_path):
    model = llama()
    attach(model, "nola", ["q_proj"], **OPTIONS)
    make_trained(model)
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path)["config"]["format_version"] == 2
    fresh = llama()
    load_adapter(fresh, tmp_path)
    assert adapted_layers(fresh)["model.layers.0.self_attn.q_proj"].adapters["default"].config.format_version == 2


def test_a_file_from_before_format_versions_loads_with_its_own_scales(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "nola", ["q_proj", "down_proj"], seed=3, format_version=1, **OPTIONS)
    make_trained(model)
    for layer in adapted_layers(model).values():  # format 1 computes what the old code did
        ad = layer.adapters["default"]
        torch.testing.assert_close(ad.delta_weight(), _format_1_delta(ad))
    want = logits(model, x)
    save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["config"]["format_version"]  # as files written before versions existed
    cfg_path.write_text(json.dumps(cfg))
    fresh = llama()
    load_adapter(fresh, tmp_path)
    loaded = adapted_layers(fresh)["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert loaded.config.format_version == 1
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    # a new adapter given no version is format 2, which reads the same numbers differently
    assert NolaConfig.from_dict({"rank": 4})[0].format_version == 2


def test_a_file_of_an_unknown_format_version_fails_naming_it(tmp_path):
    model = llama()
    attach(model, "nola", ["q_proj"], **OPTIONS)
    make_trained(model)
    save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["format_version"] = 3
    cfg_path.write_text(json.dumps(cfg))
    fresh = llama()
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"format_version=3 is not one this rankwise reads.*upgrade rankwise"):
        load_adapter(fresh, tmp_path)
    assert_same_state(fresh, before)
    assert not adapted_layers(fresh)
    with pytest.raises(ConfigError, match="format_version=0"):
        attach(fresh, "nola", ["q_proj"], format_version=0, **OPTIONS)
