"""RandLoRA: full-rank updates from shared random bases; PEFT's format both ways (real peft)."""

from __future__ import annotations

import json
import math

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
from rankwise.errors import CheckpointError, ConfigError

TARGETS = ["q_proj", "up_proj", "down_proj"]  # 64x64, 128x64 (out > in), 64x128 (out < in)


def test_parameter_count_is_n_times_r_plus_m_and_the_model_starts_unchanged():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    plan = attach(model, "randlora", TARGETS, rank=5)
    want = 0
    for layer in adapted_layers(model).values():
        m = min(layer.view.out_features, layer.view.in_features)
        n = math.ceil(m / 5)  # enough rank-5 bases for full rank
        want += n * (5 + m)  # Λ (r, n) and Γ (n, m)
    assert plan.parameters == want
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)


def test_bases_are_shared_never_saved_and_the_update_is_full_rank():
    model = llama().double()
    attach(model, "randlora", TARGETS, rank=4)
    make_trained(model, std=0.1)
    layers = adapted_layers(model)
    qs = [ly.adapters["default"] for p, ly in layers.items() if p.endswith("q_proj")]
    assert qs[0].bases()[1].data_ptr() == qs[1].bases()[1].data_ptr()
    for layer in layers.values():
        ad = layer.adapters["default"]
        assert set(ad.state_dict()) == {"randlora_lambda", "randlora_gamma"}
        a, b = ad.bases()
        dw = ad._dense(b, ad.scaled_basis(a))  # float64
        assert int(torch.linalg.matrix_rank(dw)) == min(dw.shape)


@pytest.mark.parametrize("tokens_", [2, 4096])  # factored and dense paths
def test_both_forward_paths_equal_x_times_delta_w(tokens_):
    model = llama().double()
    attach(model, "randlora", TARGETS, rank=4)
    make_trained(model, std=0.1)
    for layer in adapted_layers(model).values():
        ad = layer.adapters["default"]
        assert ad._cheaper_dense(tokens_) == (tokens_ > 2)
        x = torch.randn(tokens_, ad.layer.in_features, dtype=torch.float64)
        a, b = ad.bases()
        dw = ad._dense(b, ad.scaled_basis(a))
        torch.testing.assert_close(ad.delta(x, None), x @ dw.t())
        y = torch.randn(tokens_, ad.layer.out_features, dtype=torch.float64)
        torch.testing.assert_close(ad.compose(y, x, None), y + x @ dw.t())


@pytest.mark.parametrize("make", [llama, gpt2])
def test_loss_drops_and_merge_round_trip(make):
    model = make()
    x = tokens(n=4, length=16, vocab=97 if make is gpt2 else 200)
    targets = TARGETS if make is llama else "all-linear"
    attach(model, "randlora", targets, rank=8, alpha=160)  # alpha ~ 20·r as in PEFT's docs
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_rankwise_format_round_trip_regenerates_the_bases(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "randlora", TARGETS, rank=4, seed=11)
    make_trained(model, std=0.05)
    want = logits(model, x)
    save_adapter(model, tmp_path, format="rankwise")
    keys = load_file(tmp_path / "adapter.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"randlora_lambda", "randlora_gamma"}
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_peft_loads_ours_with_equal_outputs(tmp_path):
    from peft import PeftModel

    model = llama()
    x = tokens(vocab=200)
    attach(model, "randlora", TARGETS, rank=4, alpha=8, seed=3)
    make_trained(model, std=0.05)
    want = logits(model, x)
    save_adapter(model, tmp_path)  # auto: PEFT's format
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "RANDLORA" and cfg["projection_prng_key"] == 3
    with pytest.warns(UserWarning, match="missing adapter keys"):  # per-layer copies not written
        peft_model = PeftModel.from_pretrained(llama(), str(tmp_path))
    torch.testing.assert_close(logits(peft_model, x), want, atol=1e-5, rtol=0)
    fresh = llama()
    load_adapter(fresh, tmp_path)  # our own PEFT file: the seed's bases again
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    assert all(ly.adapters["default"]._bases.from_file is None for ly in adapted_layers(fresh).values())


def test_we_load_peft_with_equal_outputs_and_write_it_back(tmp_path):
    from peft import PeftModel, RandLoraConfig, get_peft_model

    x = tokens(vocab=200)
    cfg = RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS, projection_prng_key=5)
    peft_model = get_peft_model(llama(), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "randlora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = llama()
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, x), want, atol=1e-5, rtol=0)
    bases = [ly.adapters["default"]._bases.from_file["b"] for ly in adapted_layers(ours).values()]
    assert len({b.data_ptr() for b in bases}) == 2  # PEFT's per-layer copies: one per shape
    save_adapter(ours, tmp_path / "back")
    back = PeftModel.from_pretrained(llama(), str(tmp_path / "back"))
    torch.testing.assert_close(logits(back, x), want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="bases were read from a PEFT file.*format='peft'"):
        save_adapter(ours, tmp_path / "native", format="rankwise")


def test_unsupported_peft_options_are_refused_and_the_model_is_unchanged(tmp_path):
    model = llama()
    attach(model, "randlora", TARGETS, rank=4)
    make_trained(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "sparse": True}))
    fresh = llama()
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="sparse=true.*not supported; valid: false"):
        load_adapter(fresh, tmp_path)
    assert_same_state(fresh, before)


@pytest.mark.parametrize(
    ("targets", "options", "match"),
    [
        (["embed_tokens"], {}, "embed_tokens: randlora adapts linear layers.*valid targets"),
        (["q_proj"], {"rank": 65}, r"q_proj: rank=65 exceeds min\(out, in\)"),
        (["q_proj"], {"seed": "x"}, "option 'seed' must be int"),
    ],
)
def test_bad_config_raises_before_anything_is_attached(targets, options, match):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        attach(model, "randlora", targets, **{"rank": 4, **options})
    assert_same_state(model, before)
    assert not adapted_layers(model)
