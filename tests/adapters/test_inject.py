"""The engine: targeting, several named adapters, activation, merge/unmerge, errors."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    ConvNet,
    assert_same_state,
    gpt2,
    llama,
    logits,
    make_trained,
    snapshot,
    tokens,
)
from torch import nn

from rankwise.adapters import (
    AdaptedLayer,
    active_adapters,
    adapted_layers,
    attach,
    delete,
    disable,
    merge,
    register_initialiser,
    set_active,
    trainable_parameters,
    unmerge,
)
from rankwise.adapters.base import INITIALISERS, METHODS
from rankwise.errors import ConfigError, ModelError


def test_targets_names_globs_regexes_and_all_linear(tiny):
    plan = attach(tiny, "lora", targets="q_proj", rank=2, dry_run=True)
    assert sorted(plan.layers) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    plan = attach(tiny, "lora", targets="layers.1.mlp.*_proj", rank=2, dry_run=True)
    assert sorted(plan.layers) == [
        f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]
    plan = attach(
        tiny, "lora", targets=re.compile(r".*\.0\.self_attn\.[kv]_proj"), rank=2, dry_run=True
    )
    assert sorted(plan.layers) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    plan = attach(tiny, "lora", targets="all-linear", rank=2, dry_run=True)
    assert len(plan.layers) == 14 and "lm_head" not in plan.layers
    # 4 q_proj-sized adapters of rank 2: r*(in+out) = 2*(64+64)
    assert attach(tiny, "lora", targets="q_proj", rank=2, dry_run=True).parameters == 2 * 256
    assert not adapted_layers(tiny)  # dry runs change nothing


def test_every_unmatched_pattern_is_an_error_with_suggestions(tiny):
    before = snapshot(tiny)
    with pytest.raises(ConfigError, match=r"'q_prj'.*did you mean.*q_proj"):
        attach(tiny, "lora", targets=["v_proj", "q_prj"], rank=2)
    with pytest.raises(ConfigError, match="cannot be adapted"):
        attach(tiny, "lora", targets="self_attn", rank=2)
    assert_same_state(tiny, before)
    assert not adapted_layers(tiny)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"method": "nope"}, ConfigError, r"'nope' is not registered; valid: .*\bdora, .*\blora\b"),
        ({"rank": 0}, ConfigError, "positive integer"),
        ({"rank": 65}, ConfigError, "exceeds min"),
        ({"dropout": 1.5}, ConfigError, "dropout"),
        ({"dropout": "abc"}, ConfigError, r"option 'dropout' must be float, got 'abc' \(str\)"),
        ({"rank": 2.5}, ConfigError, "option 'rank' must be int"),
        ({"use_rslora": 1}, ConfigError, "option 'use_rslora' must be bool"),
        ({"alpha": "big"}, ConfigError, "option 'alpha' must be float or None"),
        ({"r": 4}, ConfigError, "got both rank=4 and r=4"),
        ({"bogus": 4}, ConfigError, "unknown option"),
        ({"name": "bad.name"}, ConfigError, "adapter name"),
        ({"init": "no-such-init"}, ConfigError, "unknown init"),
    ],
)
def test_bad_inputs_leave_the_model_unchanged(tiny, kwargs, error, pattern):
    before = snapshot(tiny)
    args = {"method": "lora", "targets": "q_proj", "rank": 4, **kwargs}
    with pytest.raises(error, match=pattern):
        attach(tiny, **args)
    assert_same_state(tiny, before)
    assert not adapted_layers(tiny)


def test_name_clash_is_an_error_and_changes_nothing(tiny):
    attach(tiny, "lora", targets="q_proj", rank=2, name="a")
    before = snapshot(tiny)
    with pytest.raises(ConfigError, match="already has an adapter named 'a'"):
        attach(tiny, "lora", targets=["q_proj", "k_proj"], rank=2, name="a")
    assert_same_state(tiny, before)


def test_several_adapters_activation_disable_and_trainability(tiny):
    x = tokens()
    base = logits(tiny, x)
    attach(tiny, "lora", targets=["q_proj", "v_proj"], rank=4, name="a")
    attach(tiny, "dora", targets=["q_proj", "up_proj"], rank=2, name="b")
    make_trained(tiny, "a")
    make_trained(tiny, "b", seed=1)
    assert active_adapters(tiny) == ["a", "b"]
    both = logits(tiny, x)
    set_active(tiny, "a")
    only_a = logits(tiny, x)
    set_active(tiny, ["b"])
    only_b = logits(tiny, x)
    for y in (both, only_a, only_b):
        assert (y - base).abs().max() > 1e-3
    assert (only_a - only_b).abs().max() > 1e-3
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    with disable(tiny):
        torch.testing.assert_close(logits(tiny, x), base)
    torch.testing.assert_close(logits(tiny, x), only_b)
    with pytest.raises(ConfigError, match="unknown adapter name"):
        set_active(tiny, "c")
    report = trainable_parameters(tiny)
    assert report.by_adapter["a"] == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)
    assert report.trainable == report.by_adapter["b"]


def test_adapters_are_additive_and_independent(tiny):
    """With a and b active, the change is the sum of each alone (each sees the base only)."""
    x = tokens()
    attach(tiny, "lora", targets="q_proj", rank=3, name="a")
    attach(tiny, "dora", targets="q_proj", rank=2, name="b")
    make_trained(tiny, "a")
    make_trained(tiny, "b", seed=2)
    layer = tiny.model.layers[0].self_attn.q_proj
    h = torch.randn(5, 64)
    base = layer.base_layer(h)
    set_active(tiny, "a")
    da = layer(h) - base
    set_active(tiny, "b")
    db = layer(h) - base
    set_active(tiny, ["a", "b"])
    torch.testing.assert_close(layer(h), base + da + db, atol=1e-6, rtol=1e-5)
    assert logits(tiny, x).isfinite().all()


@pytest.mark.parametrize(
    "build", [llama, gpt2, ConvNet], ids=["llama", "gpt2-conv1d", "conv+embedding"]
)
def test_merge_equals_unmerged_and_unmerge_restores(build):
    model = build()
    targets = "all-linear" if build is not ConvNet else ["embed", "conv1", "conv2", "head"]
    vocab = 20 if build is ConvNet else 97
    x = tokens(vocab=vocab)
    weights = snapshot(model)
    attach(model, "lora", targets=targets, rank=2, alpha=4, name="a")
    attach(model, "dora", targets=targets, rank=2, name="b")
    attach(model, "lora", targets=targets, rank=2, use_rslora=True, name="c")
    for i, n in enumerate("abc"):
        make_trained(model, n, std=0.2, seed=i)
    with torch.no_grad():
        unmerged = logits(model, x)
        assert (unmerged - logits(build(), x)).abs().max() > 1e-3
        merge(model)
        merged = logits(model, x)
        torch.testing.assert_close(merged, unmerged, atol=2e-5, rtol=1e-4)
        unmerge(model)
        torch.testing.assert_close(logits(model, x), unmerged, atol=2e-5, rtol=1e-4)
    for path, layer in adapted_layers(model).items():
        key = f"{path}.weight"
        torch.testing.assert_close(layer.base_layer.weight, weights[key], atol=1e-6, rtol=1e-5)


def test_transposed_conv1d_merge_writes_the_transposed_layout():
    model = gpt2()
    attach(model, "lora", targets="c_fc", rank=2)
    make_trained(model)
    layer = model.transformer.h[0].mlp.c_fc
    adapter = layer.adapters["default"]
    expected = layer.base_layer.weight + (adapter.lora_B @ adapter.lora_A).t() * adapter.scaling
    merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected.detach())


def test_merge_refuses_a_quantized_layer_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    attach(model, "lora", targets=["0", "1"], rank=2)
    make_trained(model)
    before = snapshot(model)
    with pytest.raises(ModelError, match="quantized"):
        merge(model)
    assert_same_state(model, before)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    with pytest.raises(ConfigError, match="quantized"):
        attach(model, "dora", targets="1", rank=2, name="d")


def test_merged_state_guards_and_delete_unwraps(tiny):
    attach(tiny, "lora", targets="q_proj", rank=2, name="a")
    make_trained(tiny, "a")
    merge(tiny)
    with pytest.raises(ModelError, match="unmerge"):
        set_active(tiny, "a")
    with pytest.raises(ModelError, match="unmerge"):
        delete(tiny, "a")
    with pytest.raises(ModelError, match="unmerge"):
        attach(tiny, "lora", targets="q_proj", rank=2, name="b")
    unmerge(tiny)
    delete(tiny, "a")
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not any(isinstance(m, AdaptedLayer) for m in tiny.modules())
    with pytest.raises(ConfigError, match="unknown adapter name"):
        delete(tiny, "a")


def test_dropout_applies_in_training_only(tiny):
    attach(tiny, "lora", targets="q_proj", rank=4, dropout=0.5)
    make_trained(tiny)
    x = tokens()
    tiny.eval()
    assert torch.equal(logits(tiny, x), logits(tiny, x))
    tiny.train()
    torch.manual_seed(0)
    a = logits(tiny, x)
    b = logits(tiny, x)
    assert (a - b).abs().max() > 1e-4


@pytest.fixture
def scratch_initialisers():
    """Names registered during a test are removed afterwards (no global leftovers)."""
    before = set(INITIALISERS.names())
    yield
    for name in set(INITIALISERS.names()) - before:
        INITIALISERS.unregister(name)


def test_initialiser_registry_runs_and_a_failing_one_rolls_back(tiny, scratch_initialisers):
    calls = []

    @register_initialiser("test-ones")
    def ones(adapter, *, value: float = 1.0):
        calls.append(adapter.layer.out_features)
        with torch.no_grad():
            adapter.lora_B.fill_(value)

    @register_initialiser("test-broken")
    def broken(adapter):
        raise RuntimeError("boom")

    with pytest.raises(ConfigError, match="already registered"):
        register_initialiser("test-ones")(broken)
    attach(tiny, "lora", targets="q_proj", rank=2, init="test-ones", init_options={"value": 0.5})
    assert calls == [64, 64]
    assert torch.all(tiny.model.layers[0].self_attn.q_proj.adapters["default"].lora_B == 0.5)
    before = snapshot(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        attach(tiny, "lora", targets=["q_proj", "k_proj"], rank=2, name="x", init="test-broken")
    assert_same_state(tiny, before)
    assert isinstance(tiny.model.layers[0].self_attn.k_proj, nn.Linear)


def test_a_name_holds_one_adapter_method_and_config(tiny):
    attach(tiny, "lora", targets=["q_proj"], name="a", rank=4)
    before = snapshot(tiny)
    with pytest.raises(
        ConfigError,
        match="name 'a' already holds a lora adapter with another config.*choose another name",
    ):
        attach(tiny, "dora", targets=["v_proj"], name="a", rank=4)
    with pytest.raises(ConfigError, match="already holds a lora adapter"):
        attach(tiny, "lora", targets=["v_proj"], name="a", rank=8)
    assert_same_state(tiny, before)
    attach(tiny, "lora", targets=["v_proj"], name="a", r=4)  # same method + config: more layers
    assert sum("a" in layer.adapters for layer in adapted_layers(tiny).values()) == 4


def test_r_is_an_alias_of_rank(tiny):
    plan = attach(tiny, "lora", targets="q_proj", r=2, dry_run=True)
    assert plan.config.rank == 2 and plan.parameters == 2 * 256


def test_method_registry_refuses_duplicates_and_tests_leave_nothing_behind():
    from rankwise.adapters import get_method, method_names, register_method
    from rankwise.adapters.methods.lora import LoraAdapter

    with pytest.raises(ConfigError, match="'lora' is already registered"):
        register_method("lora")(type("Other", (LoraAdapter,), {}))
    with pytest.raises(ConfigError, match="must subclass"):
        register_method("not-an-adapter")(int)
    assert get_method("lora") is LoraAdapter
    names = method_names()
    with METHODS.temporary("lora-copy", LoraAdapter):
        assert "lora-copy" in method_names()
    assert method_names() == names


def test_frozen_adapters_stay_frozen_when_activated(tiny):
    attach(tiny, "lora", targets="q_proj", name="a", rank=2, trainable=False)
    attach(tiny, "lora", targets="q_proj", name="b", rank=2)
    set_active(tiny, ["a", "b"])
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


def test_a_method_missing_part_of_the_contract_cannot_be_built():
    from rankwise.adapters.base import Adapter

    class Incomplete(Adapter):
        def build(self): ...

        def reset_parameters(self): ...

        def delta(self, x, base):
            return x

    with pytest.raises(TypeError, match="delta_weight"):
        Incomplete(None, None, dtype=torch.float32)
