"""rankwise.layers.greenformers: the Low-Rank Transformer (LowRankTransformerLinear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.greenformers import LowRankTransformerLinear, block_part, low_rank_transformer
from rankwise.models import count_parameters, tiny_llama


def _linear(n_in: int = 16, n_out: int = 12) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out)


def test_svd_init_at_full_rank_equals_the_original_and_forward_is_the_dense_weight():
    linear = _linear()
    layer = LowRankTransformerLinear.from_linear(linear, rank=12)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    low = LowRankTransformerLinear.from_linear(linear, rank=3)
    torch.testing.assert_close(low(x), x @ low.dense_weight().T + low.bias, atol=1e-5, rtol=1e-5)


def test_parameter_count_formula():
    layer = LowRankTransformerLinear.from_linear(_linear(), rank=3)
    assert count_parameters(layer) == 3 * (16 + 12) + 12


def test_random_init_has_the_variance_of_nn_linear():
    torch.manual_seed(0)
    layer = LowRankTransformerLinear.from_linear(nn.Linear(256, 384), rank=32, init="random")
    var = layer.dense_weight().detach().var().item()
    assert 0.9 < var * 3 * 256 < 1.1


@pytest.mark.parametrize(
    ("path", "part"),
    [
        ("model.layers.0.self_attn.q_proj", "attention"),
        ("model.layers.0.mlp.down_proj", "feed_forward"),
        ("encoder.layer.0.attention.self.query", "attention"),
        ("encoder.layer.0.attention.output.dense", "attention"),
        ("encoder.layer.0.intermediate.dense", "feed_forward"),
        ("encoder.layer.0.output.dense", "feed_forward"),
    ],
)
def test_block_part(path, part):
    assert block_part(path) == part


def test_low_rank_transformer_converts_the_chosen_parts_of_every_block():
    model, _ = tiny_llama(seed=0, layers=2, hidden=32)
    dense = count_parameters(model)
    new = low_rank_transformer(model, 4, parts=("attention",))
    assert sorted({p.rsplit(".", 1)[-1] for p in new}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(new) == 8 and isinstance(model.lm_head, nn.Linear)
    saved = sum(m.in_features * m.out_features - 4 * (m.in_features + m.out_features) for m in new.values())
    assert count_parameters(model) == dense - saved
    model, _ = tiny_llama(seed=0, layers=2, hidden=32)
    new = low_rank_transformer(model, 4, parts="feed_forward")
    assert sorted({p.rsplit(".", 1)[-1] for p in new}) == ["down_proj", "gate_proj", "up_proj"]


def test_a_low_rank_transformer_trained_from_scratch_lowers_the_loss():
    torch.manual_seed(0)
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    low_rank_transformer(model, 4, init="random")
    model.train()
    ids = torch.randint(0, 64, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_convert_by_name():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    new = L.convert(model, "greenformers", rank=4, targets="q_proj")
    assert list(new) == ["model.layers.0.self_attn.q_proj"]
    assert isinstance(new["model.layers.0.self_attn.q_proj"], LowRankTransformerLinear)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"rank": 13}, ["LowRankTransformerLinear", "rank", "[1, 12]"]),
        ({"rank": 4, "init": "zeros"}, ["LowRankTransformerLinear", "init", "svd, random"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_layer_and_valid_values(options, words):
    with pytest.raises(ConfigError) as err:
        LowRankTransformerLinear.from_linear(_linear(), **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_parts_name_the_valid_ones_and_leave_the_model_unchanged():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    with pytest.raises(ConfigError, match="attention, feed_forward"):
        low_rank_transformer(model, 4, parts=("attn",))
    with pytest.raises(ConfigError, match=r"rank must be in \[1, 32\] for a 32x32 layer; got 0"):
        low_rank_transformer(model, 0)
    assert not any(isinstance(m, LowRankTransformerLinear) for m in model.modules())


def test_a_rank_above_a_layers_full_rank_caps_it_with_a_warning():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    with pytest.warns(UserWarning, match=r"rank=17 is above the full rank of .*k_proj \(16x32: 16\)"):
        new = low_rank_transformer(model, 17)  # k_proj is 16x32
    assert {p.rsplit(".", 1)[-1]: m.rank for p, m in new.items()}["k_proj"] == 16
