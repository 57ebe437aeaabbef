"""rankwise.layers.convert: swap linear layers of any model, validated before any change."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.models import count_parameters, tiny_llama


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))


def test_names_lists_the_registered_types_and_every_class_is_importable():
    assert "lowrank" in L.names()
    for name in L.names():
        cls = L.TRAINABLE.get(name)
        assert issubclass(cls, L.StructuredLinear) and cls.method == name
        assert getattr(L, cls.__name__) is cls


def test_lowrank_at_full_rank_equals_the_dense_model():
    model = _mlp()
    x = torch.randn(5, 12)
    before = model(x)
    new = L.convert(model, "lowrank", rank=8)
    assert sorted(new) == ["0", "2"] and all(isinstance(m, L.LowRankLinear) for m in new.values())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_lowrank_is_the_best_rank_r_approximation():
    linear = nn.Linear(20, 30)
    layer = L.LowRankLinear.from_linear(linear, rank=3)
    S = torch.linalg.svdvals(linear.weight.detach())
    err = torch.linalg.matrix_norm(linear.weight.detach() - layer.dense_weight().detach())
    torch.testing.assert_close(err, S[3:].norm(), rtol=1e-4, atol=1e-5)
    assert count_parameters(layer) == 3 * (20 + 30) + 30


def test_default_targets_skip_the_output_head_and_patterns_select():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    new = L.convert(model, "lowrank", rank=4)
    assert len(new) == 7 and "lm_head" not in new and isinstance(model.lm_head, nn.Linear)
    model, _ = tiny_llama(seed=0, layers=2, hidden=32)
    assert sorted(L.convert(model, "lowrank", rank=4, targets=["q_proj", "layers.1.mlp.*"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj",
    ]  # fmt: skip
    model, _ = tiny_llama(seed=0, layers=2, hidden=32)
    assert list(L.convert(model, "lowrank", rank=4, targets=re.compile(r".*0\.self_attn\.k_proj"))) == [
        "model.layers.0.self_attn.k_proj"
    ]


def _unchanged(model: nn.Module, call) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    call()
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_unknown_name_lists_the_valid_ones_and_changes_nothing():
    model = _mlp()
    with pytest.raises(ConfigError, match=r"'lowrnk' is not registered; valid: .*lowrank"):
        _unchanged(model, lambda: L.convert(model, "lowrnk", rank=2))


def test_misspelled_option_lists_the_valid_options():
    class Opt(L.StructuredLinear):
        @classmethod
        def from_linear(cls, linear, *, rank, density=0.1, seed=0):
            raise AssertionError("never built")

        def dense_weight(self):
            raise AssertionError

    model = _mlp()
    with L.TRAINABLE.temporary("opt-test", Opt):
        Opt.method = "opt-test"
        with pytest.raises(ConfigError, match=r"no option\(s\) \['densty'\]; did you mean 'density'.*options are: density, seed"):
            _unchanged(model, lambda: L.convert(model, "opt-test", rank=2, densty=0.1))


def test_a_rank_above_a_layers_full_rank_gives_it_full_rank_with_one_warning():
    model = _mlp()  # full ranks: 8 and 8
    x = torch.randn(5, 12)
    want = model(x)
    with pytest.warns(UserWarning, match=r"rank=10 is above the full rank of 2 layer\(s\).*0 \(8x12: 8\)") as seen:
        new = L.convert(model, "lowrank", rank=10)
    assert len(seen) == 1
    assert [m.rank for m in new.values()] == [8, 8]
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_a_bad_rank_changes_no_layer():
    model = _mlp()
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(ConfigError, match="LowRankLinear: rank must be in"):
            L.convert(model, "lowrank", rank=bad)


def test_a_target_matching_nothing_suggests_names_and_changes_nothing():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    with pytest.raises(ConfigError, match=r"target 'q_prj' matched no nn.Linear module; did you mean \['q_proj'"):
        _unchanged(model, lambda: L.convert(model, "lowrank", rank=2, targets=["k_proj", "q_prj"]))
    with pytest.raises(ConfigError, match="targets is empty"):
        L.convert(model, "lowrank", rank=2, targets=[])
    with pytest.raises(ConfigError, match="no nn.Linear layer to convert"):
        L.convert(nn.Sequential(nn.ReLU()), "lowrank", rank=2)


def test_converted_model_state_dict_round_trips():
    model = _mlp()
    L.convert(model, "lowrank", rank=4)
    fresh = _mlp()
    L.convert(fresh, "lowrank", rank=4)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x))


def test_linear_parts_of_structured_layers_are_left_alone():
    base = nn.Linear(8, 8)
    model = nn.Sequential(L.CompensatedLinear(base, 2), nn.Linear(8, 8))
    assert list(L.convert(model, "lowrank", rank=2)) == ["1"]
    assert model[0].base is base


def test_after_optimizer_step_reaches_every_structured_layer():
    model = _mlp()
    L.convert(model, "lowrank", rank=4)
    seen = []

    class Probe(L.LowRankLinear):
        def after_optimizer_step(self, step, optimizer=None):
            seen.append((step, optimizer))

    model[0].__class__ = Probe
    marker = object()
    assert L.after_optimizer_step(model, 3, marker) == 2
    assert seen == [(3, marker)]  # the other layer runs the base class's no-op


@pytest.mark.parametrize("name", ["maestro", "trp"])
def test_penalty_is_the_weighted_regulariser_and_none_at_weight_zero(name):
    model = _mlp()
    L.convert(model, name, rank=4)
    assert L.penalty(model) is None  # default weight 0: train without it
    model = _mlp()
    new = L.convert(model, name, rank=4, penalty_weight=0.5)
    raw = {"maestro": lambda m: m.group_lasso(), "trp": lambda m: m.nuclear_penalty()}[name]
    want = 0.5 * sum(raw(m) for m in new.values())
    torch.testing.assert_close(L.penalty(model), want)
    L.penalty(model).backward()
    assert all(p.grad is not None for m in new.values() for p in m.parameters() if p.dim() == 2)
    with pytest.raises(ConfigError, match="penalty_weight must be a number >= 0; got -1"):
        L.convert(_mlp(), name, rank=4, penalty_weight=-1)
