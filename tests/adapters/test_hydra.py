"""Hydra: a parallel LoRA branch plus a sequential low-rank map of the base features W x."""

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

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter, set_active
from rankwise.errors import ConfigError


def test_parameter_count_is_r_in_plus_out_plus_two_rs_out():
    model = llama()
    plan = attach(model, "hydra", "all-linear", rank=4, seq_rank=3)
    shapes = [(lay.view.out_features, lay.view.in_features) for lay in adapted_layers(model).values()]
    assert plan.parameters == sum(4 * (i + o) + 2 * 3 * o for o, i in shapes)


def test_output_is_parallel_plus_sequential_branch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    attach(model, "hydra", "0", rank=3, seq_rank=2, alpha=6.0)  # s = 2
    ad = model[0].adapters["default"]
    make_trained(model, std=0.3)
    x = torch.randn(7, 12, dtype=torch.float64)
    par = x @ ad.lora_A.T @ ad.lora_B.T
    seq = (x @ w.T) @ ad.seq_A.T @ ad.seq_B.T  # acts on the pre-trained features W x (no bias)
    torch.testing.assert_close(model(x), x @ w.T + b + 2 * (par + seq))
    dw = 2 * (ad.lora_B @ ad.lora_A + ad.seq_B @ ad.seq_A @ w)
    torch.testing.assert_close(ad.delta_weight().double(), dw.float().double(), atol=1e-5, rtol=0)


def test_lm_loss_drops_and_merged_equals_unmerged_with_two_adapters():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    before = logits(model, x)
    attach(model, "hydra", "all-linear", rank=4, alpha=16)
    assert torch.equal(logits(model, x), before)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    attach(model, "hydra", ["q_proj", "down_proj"], name="b", rank=2)
    make_trained(model, name="b", std=0.1)
    set_active(model, ["default", "b"])
    assert_merge_round_trip(model, x)


@pytest.mark.parametrize("make", [gpt2, ConvNet])
def test_merge_on_transposed_and_conv_layers(make):
    model = make()
    x = tokens(vocab=97) if make is gpt2 else torch.randint(0, 20, (3, 7))
    targets = ["c_attn", "c_fc"] if make is gpt2 else ["conv1", "conv2", "embed"]
    attach(model, "hydra", targets, rank=2)
    make_trained(model, std=0.2)
    assert_merge_round_trip(model, x)


def test_save_load_round_trip(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    attach(model, "hydra", ["v_proj", "up_proj"], rank=4, seq_rank=2)
    make_trained(model, std=0.2)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_seq_rank_beyond_the_output_width_is_refused_before_attaching():
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        attach(model, "hydra", ["q_proj", "k_proj"], rank=4, seq_rank=40)  # k_proj: out = 32
    assert "k_proj" in str(err.value) and "seq_rank=40" in str(err.value) and "1..32" in str(err.value)
    assert not adapted_layers(model)
    assert_same_state(model, before)
    with pytest.raises(ConfigError, match="seq_rank must be a positive integer"):
        attach(model, "hydra", ["q_proj"], rank=4, seq_rank=0)
