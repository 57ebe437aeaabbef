"""Bone: block-affine 'bat', MiSS shard and 'mini' variants; PEFT's MiSS format both ways."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ConvNet,
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
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "up_proj"]  # (out, in) = (64, 64), (32, 64), (128, 64)


def _shapes(model):
    return [(layer.view.out_features, layer.view.in_features) for layer in adapted_layers(model).values()]


@pytest.mark.parametrize(
    ("options", "per_layer"),
    [
        ({"variant": "bat", "rank": 16}, lambda out, inp: out * 16),  # (out/b)·b·b
        ({"variant": "miss", "rank": 24}, lambda out, inp: 24 * out),  # b·out
        ({"variant": "mini", "rank": 16, "mini_r": 8}, lambda out, inp: 16 * 8),  # b·mini_r
    ],
)
def test_parameter_count_matches_the_formula(options, per_layer):
    model = llama()
    plan = attach(model, "bone", TARGETS, **options)
    assert plan.parameters == sum(per_layer(o, i) for o, i in _shapes(model))


def test_bat_is_the_block_affine_map_of_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False)).double()
    w = model[0].weight.detach().clone()
    attach(model, "bone", "0", rank=2, variant="bat", alpha=4.0)  # s = 2
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.bone_block.normal_()
    expected = torch.zeros_like(w)
    for i in range(3):
        for j in range(4):
            blk = w[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            bi = ad.bone_block[i]
            expected[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = 2 * (blk @ bi + bi)
    torch.testing.assert_close(ad.delta_weight().double(), expected.float().double(), atol=1e-5, rtol=0)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (w + expected).T)


def test_miss_tiles_one_shard_along_the_input_with_a_partial_last_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 3, bias=False)).double()
    w = model[0].weight.detach().clone()
    attach(model, "bone", "0", rank=4, variant="miss")  # 10 = 4 + 4 + 2
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.bone_block.normal_()
    d = ad.bone_block.detach()  # (4, 3)
    expected = torch.cat([d.T, d.T, d.T[:, :2]], dim=1)
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (w + expected).T)
    torch.testing.assert_close(ad.delta_weight().double(), expected.float().double())


@pytest.mark.parametrize("variant", ["bat", "miss", "mini"])
def test_lm_loss_drops_and_merged_equals_unmerged(variant):
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    before = logits(model, x)
    attach(model, "bone", "all-linear", rank=16, variant=variant, mini_r=16)
    assert torch.equal(logits(model, x), before)  # zero blocks: unchanged start
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    attach(model, "bone", TARGETS, name="second", rank=8, variant="bat")
    make_trained(model, name="second", std=0.05)
    from rankwise.adapters import set_active

    set_active(model, ["default", "second"])
    assert_merge_round_trip(model, x)


def test_bat_on_transposed_conv1d_merges_exactly():
    model = gpt2()
    x = tokens(vocab=97)
    attach(model, "bone", ["c_attn", "c_fc"], rank=8, variant="bat")
    make_trained(model, std=0.05)
    assert_merge_round_trip(model, x)


def test_native_round_trip_on_conv1d(tmp_path):
    model = gpt2()
    x = tokens(vocab=97)
    attach(model, "bone", ["c_attn", "c_proj"], rank=8, variant="bat")
    make_trained(model, std=0.05)
    want = logits(model, x)
    save_adapter(model, tmp_path)  # PEFT's MiSS has no Conv1D: rankwise format
    assert (tmp_path / "adapter.safetensors").is_file()
    fresh = gpt2()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("variant", "options"),
    [("miss", {"rank": 24}), ("bat", {"rank": 16, "alpha": 32.0}), ("mini", {"rank": 16, "mini_r": 16})],
)
def test_peft_loads_ours_with_the_same_outputs(tmp_path, variant, options):
    peft = pytest.importorskip("peft")
    model = llama()
    x = tokens(vocab=200)
    attach(model, "bone", TARGETS, variant=variant, **options)
    make_trained(model, std=0.05)
    want = logits(model, x)
    save_adapter(model, tmp_path, format="peft")
    peft_model = peft.PeftModel.from_pretrained(llama(), tmp_path)
    assert type(peft_model.peft_config["default"]).__name__ == "MissConfig"
    torch.testing.assert_close(logits(peft_model, x), want, atol=1e-5, rtol=0)
    fresh = llama()  # and our own PEFT folder loads back here
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("init", "r"), [(True, 24), ("bat", 16), ("mini", 16)])
def test_peft_miss_folder_loads_here_with_the_same_outputs(tmp_path, init, r):
    peft = pytest.importorskip("peft")
    x = tokens(vocab=200)
    cfg = peft.MissConfig(r=r, mini_r=16, init_weights=init, target_modules=TARGETS)
    peft_model = peft.get_peft_model(llama(), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    model = llama()
    load_adapter(model, tmp_path)
    expected_variant = {True: "miss", "bat": "bat", "mini": "mini"}[init]
    assert all(
        layer.adapters["default"].config.variant == expected_variant
        for layer in adapted_layers(model).values()
    )
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("make", "targets", "options", "needles"),
    [
        (llama, ["q_proj"], {"rank": 24, "variant": "bat"}, ["q_proj", "rank=24", "[1, 2, 4, 8, 16, 32, 64]"]),
        (llama, ["up_proj"], {"rank": 4, "variant": "mini", "mini_r": 5}, ["up_proj", "mini_r=5", "valid mini_r"]),
        (llama, ["q_proj"], {"rank": 65, "variant": "miss"}, ["q_proj", "rank=65", "1..64"]),
        (ConvNet, ["conv2"], {"rank": 2}, ["conv2", "Conv2d", "nn.Linear"]),
    ],
)
def test_bad_layer_limits_raise_before_anything_is_attached(make, targets, options, needles):
    model = make()
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        attach(model, "bone", targets, **options)
    for needle in needles:
        assert needle in str(err.value)
    assert not adapted_layers(model)
    assert_same_state(model, before)


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="variant must be one of"):
        attach(llama(), "bone", ["q_proj"], rank=8, variant="block")
