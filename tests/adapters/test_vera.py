"""VeRA: shared frozen random A, B scaled by two trained vectors; PEFT's format both ways."""

from __future__ import annotations

import json

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
from rankwise.errors import ConfigError

TARGETS = ["q_proj", "up_proj", "down_proj"]  # in 64 and 128, out 64 and 128


def test_parameter_count_is_out_plus_r_and_one_shared_pair_of_matrices():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    plan = attach(model, "vera", TARGETS, rank=96)  # r above the layer width is fine
    layers = adapted_layers(model)
    assert plan.parameters == sum(ly.view.out_features + 96 for ly in layers.values())
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    q = [ly.adapters["default"] for p, ly in layers.items() if p.endswith("q_proj")]
    assert q[0]._bases.get("a", "cpu", torch.float32) is q[1]._bases.get("a", "cpu", torch.float32)
    assert set(q[0].state_dict()) == {"vera_lambda_b", "vera_lambda_d"}


@pytest.mark.parametrize("make", [llama, gpt2])
def test_loss_drops_and_merge_round_trip(make):
    model = make()
    x = tokens(n=4, length=16, vocab=97 if make is gpt2 else 200)
    attach(model, "vera", "all-linear", rank=32)
    # VeRA trains few parameters and wants a larger step than LoRA (the paper's advice)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=0.1, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_rankwise_format_round_trip(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "vera", TARGETS, rank=16, seed=2)
    make_trained(model)
    want = logits(model, x)
    save_adapter(model, tmp_path, format="rankwise")
    names = {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "adapter.safetensors")}
    assert names == {"vera_lambda_b", "vera_lambda_d"}
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_peft_loads_ours_with_equal_outputs(tmp_path):
    from peft import PeftModel

    model = llama()
    x = tokens(vocab=200)
    attach(model, "vera", TARGETS, rank=16, seed=4)
    make_trained(model, std=0.5)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VERA"
    theirs = PeftModel.from_pretrained(llama(), str(tmp_path))
    torch.testing.assert_close(logits(theirs, x), want, atol=1e-5, rtol=0)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    assert all(ly.adapters["default"]._bases.from_file is None for ly in adapted_layers(fresh).values())


def test_we_load_peft_with_equal_outputs_and_write_it_back(tmp_path):
    from peft import PeftModel, VeraConfig, get_peft_model

    x = tokens(vocab=200)
    peft_model = get_peft_model(llama(), VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = llama()
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, x), want, atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "back")
    back = PeftModel.from_pretrained(llama(), str(tmp_path / "back"))
    torch.testing.assert_close(logits(back, x), want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="format='peft'"):
        save_adapter(ours, tmp_path / "native", format="rankwise")


@pytest.mark.parametrize(
    ("targets", "options", "match"),
    [
        (["embed_tokens"], {}, "embed_tokens: vera adapts linear layers.*valid targets"),
        (["q_proj"], {"d_initial": float("nan")}, "d_initial must be a finite number"),
    ],
)
def test_bad_config_raises_before_anything_is_attached(targets, options, match):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        attach(model, "vera", targets, **{"rank": 8, **options})
    assert_same_state(model, before)
    assert not adapted_layers(model)
