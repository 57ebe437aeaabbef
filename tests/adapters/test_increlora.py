"""IncreLoRA: every layer starts small; rank is added to the most important layers up to the budget."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_merge_round_trip, llama, tokens
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.adapters.rules.growth import total_rank
from rankwise.errors import ConfigError


def _all_adapters(model):
    """Every adapter (a loaded one is not trainable, so trainable_adapter_map skips it)."""
    return {p: layer.adapters["default"] for p, layer in adapted_layers(model).items()}


def _lm_loss(model, x):
    return lambda: model(input_ids=x, labels=x).loss


def _train_llama(method: str, steps: int, **options):
    torch.manual_seed(0)
    model = llama().train()
    attach(model, method, "all-linear", **options)
    adapters = trainable_adapter_map(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rules = TrainingRules(build_rules([], methods=[method]))
    rules.setup(model, adapters, opt, steps=steps)
    x = tokens(n=4, length=16, vocab=200)
    history = []
    for s in range(steps):
        rules.train_step(s, _lm_loss(model, x), opt)
        history.append(total_rank(adapters))
    return model.eval(), adapters, history


def test_total_rank_grows_from_init_to_the_budget():
    model, adapters, history = _train_llama(
        "increlora", 20, rank=6, init_rank=1, target_rank=3, grow_every=2, grow_until=0.8
    )
    layers = len(adapters)
    assert history[0] == layers  # init_rank 1 everywhere before the first growth event
    assert history == sorted(history)
    assert history[-1] == 3 * layers  # the budget, exactly
    assert history[15] == 3 * layers  # reached by grow_until (16 of 20 steps)
    ranks = [a.active_rank for a in adapters.values()]
    assert max(ranks) > 3 > 1 <= min(ranks)  # unevenly: importance decided, not an even split
    assert all(r <= 6 for r in ranks)


def test_the_most_sensitive_layers_grow_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    attach(model, "increlora", ["0", "1"], rank=4, init_rank=1, target_rank=2, grow_every=1, grow_until=1.0)
    adapters = trainable_adapter_map(model)
    cls = type(adapters["0"])
    assert cls.plan_growth(adapters, budget=2, events_left=2, progress=0.0) == []  # nothing measured yet
    adapters["0"].stats = {"sensitivity": 1.0, "uncertainty": 1.0}
    adapters["1"].stats = {"sensitivity": 1.0, "uncertainty": 0.1}
    assert cls.plan_growth(adapters, budget=2, events_left=2, progress=0.0) == ["0"]
    assert cls.plan_growth(adapters, budget=2, events_left=1, progress=1.0) == ["0", "1"]


def test_growing_does_not_change_the_output():
    model = llama()
    attach(model, "increlora", "all-linear", rank=4, init_rank=2)
    with torch.no_grad():
        for a in trainable_adapter_map(model).values():
            a.lora_B[:, :2].normal_(std=0.1)
    x = tokens(n=2, length=8, vocab=200)
    with torch.no_grad():
        before = model(x).logits
        for a in trainable_adapter_map(model).values():
            assert a.grow(5) == 2  # capped at the capacity
        torch.testing.assert_close(model(x).logits, before)


def test_merge_save_load_round_trip_keeps_the_grown_ranks(tmp_path):
    model, adapters, _ = _train_llama("increlora", 6, rank=4, init_rank=1, target_rank=2, grow_every=1)
    ranks = {p: a.active_rank for p, a in adapters.items()}
    x = tokens(n=2, length=10, vocab=200)
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "a")
    fresh = llama()
    load_adapter(fresh, tmp_path / "a")
    assert {p: a.active_rank for p, a in _all_adapters(fresh).items()} == ranks
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_finetune_increlora_lowers_the_loss_and_grows(tmp_path):
    cfg = FinetuneConfig(
        model="tiny-llama", method="increlora", rank=4, seq_len=32, lr=3e-3, eval_tokens=0,
        batch_size=4, steps=20, out=str(tmp_path / "a"),
        method_options={"init_rank": 1, "target_rank": 2, "grow_every": 2},
    )
    result = finetune(cfg, progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05
    model = llama()
    load_adapter(model, tmp_path / "a")
    adapters = _all_adapters(model)
    assert total_rank(adapters) == 2 * len(adapters)


@pytest.mark.parametrize(
    "options, pattern",
    [
        (dict(rank=4, init_rank=5), "init_rank must be in"),
        (dict(rank=4, target_rank=8), "target_rank must be in"),
        (dict(rank=4, grow_every=0), "grow_every must be >= 1"),
        (dict(rank=4, grow_until=0.0), "grow_until must be in"),
        (dict(rank=4, beta=1.0), "beta must be in"),
        (dict(rank=4, grow_by=5), "grow_by must be in"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        attach(llama(), "increlora", "all-linear", **options)


def test_the_growth_rule_refuses_other_methods():
    model = nn.Sequential(nn.Linear(8, 8))
    attach(model, "lora", "0", rank=2)
    with pytest.raises(ConfigError, match="rank_growth.*'lora'.*works with methods that grow rank"):
        TrainingRules(build_rules(["rank_growth"])).check(trainable_adapter_map(model))
    assert adapted_layers(model)


def test_a_growth_event_can_add_several_components_to_one_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    attach(model, "increlora", ["0", "1"], rank=4, init_rank=1, target_rank=4)
    adapters = trainable_adapter_map(model)
    adapters["0"].stats = {"sensitivity": 1.0, "uncertainty": 1.0}
    cls = type(adapters["0"])
    # grow_by defaults to half the target rank (the released code's 4 per chosen layer at 8)
    assert cls.plan_growth(adapters, budget=5, events_left=1, progress=1.0) == ["0", "0", "1", "1", "0"]
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    attach(model, "increlora", ["0", "1"], rank=4, init_rank=1, target_rank=4, grow_by=1)
    adapters = trainable_adapter_map(model)
    adapters["0"].stats = {"sensitivity": 1.0, "uncertainty": 1.0}
    assert cls.plan_growth(adapters, budget=5, events_left=1, progress=1.0) == ["0", "1", "0", "1", "0"]


def test_a_schedule_without_growth_events_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    attach(model, "increlora", "0", rank=4, init_rank=1, target_rank=2, grow_every=10)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rules = TrainingRules(build_rules([], methods=["increlora"]))
    with pytest.raises(ConfigError, match="no growth event.*grow_every <= 2"):
        rules.setup(model, trainable_adapter_map(model), opt, steps=8)


def test_a_growing_method_must_plan_its_growth():
    from rankwise.adapters.methods.increlora import GrowingLoraAdapter

    assert "plan_growth" in GrowingLoraAdapter.__abstractmethods__


def test_the_scale_follows_the_active_rank_and_growing_rescales_b():
    """alpha / k (alpha defaults to target_rank): a plain LoRA's scale at the budget rank."""
    model = nn.Sequential(nn.Linear(12, 10))
    attach(model, "increlora", "0", rank=8, init_rank=1, target_rank=4)
    ad = trainable_adapter_map(model)["0"]
    assert ad.scaling == 4.0  # rank 1 moves its update as fast as a rank-4 LoRA's four components
    with torch.no_grad():
        ad.lora_B[:, 0].normal_()
    b0, before = ad.lora_B[:, 0].clone(), ad.delta_weight()
    assert ad.parameters_in_use() == 1 * (12 + 10)  # the budget counts the active components
    assert ad.grow(3) == 3 and ad.scaling == 1.0  # = LoRA rank 4, alpha 4
    assert ad.parameters_in_use() == 4 * (12 + 10)
    torch.testing.assert_close(ad.lora_B[:, 0], b0 * 4.0)
    torch.testing.assert_close(ad.delta_weight(), before)
    rs = nn.Sequential(nn.Linear(12, 10))
    attach(rs, "increlora", "0", rank=8, init_rank=4, target_rank=4, alpha=6.0, use_rslora=True)
    assert trainable_adapter_map(rs)["0"].scaling == pytest.approx(6.0 / 2.0)


def test_the_importance_is_the_sensitivity_of_the_update_matrix():
    """Σ |ΔW ⊙ ∇_ΔW L| / √numel, the same number autograd gives on an explicit ΔW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    attach(model, "increlora", "0", rank=4, init_rank=2, target_rank=2)
    ad = trainable_adapter_map(model)["0"]
    with torch.no_grad():
        ad.lora_B.normal_()
    x, target = torch.randn(5, 3, 8), torch.randn(5, 3, 6)
    ad.observing = True
    (model(x) - target).square().sum().backward()
    ad.observe()
    dw = ad.delta_weight().detach().requires_grad_()
    (x @ (model[0].base_layer.weight + dw).T - target).square().sum().backward()
    expected = float((dw.detach() * dw.grad).abs().sum()) / math.sqrt(dw.numel())
    assert ad.stats["sensitivity"] == pytest.approx(expected, rel=1e-5)
    ad.observing = False  # outside the growth window no hook is registered
    (model(x) - target).square().sum().backward()
    assert ad._sensed is None


def test_importance_is_measured_only_while_growth_events_are_to_come():
    torch.manual_seed(0)
    model = llama().train()
    attach(model, "increlora", ["q_proj", "v_proj"], rank=4, init_rank=1, target_rank=2, grow_every=1, grow_until=0.5)
    adapters = trainable_adapter_map(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rules = TrainingRules(build_rules([], methods=["increlora"]))
    rules.setup(model, adapters, opt, steps=8)
    assert all(a.observing for a in adapters.values())
    x = tokens(n=2, length=8, vocab=200)
    for s in range(8):
        rules.train_step(s, _lm_loss(model, x), opt)
        if s == 1:  # ΔW = 0 at the first backward (B = 0); from the second on gᵀx meets a ΔW
            assert all(a.stats["sensitivity"] > 0 for a in adapters.values())
    assert total_rank(adapters) == 2 * len(adapters)
    assert not any(a.observing for a in adapters.values())


def test_inactive_components_get_no_gradient_so_they_join_with_fresh_adam_state():
    """New parameters are in the optimizer from the start with zero moments: a component's
    first steps after it is switched on are Adam's first steps (at most the learning rate)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    attach(model, "increlora", "0", rank=4, init_rank=1, target_rank=2)
    ad = trainable_adapter_map(model)["0"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 6)
    a_rest = ad.lora_A[1:].detach().clone()

    def step():
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()

    for _ in range(5):
        step()
        assert not ad.lora_A.grad[1:].any() and not ad.lora_B.grad[:, 1:].any()
    for p in (ad.lora_A, ad.lora_B):
        state = opt.state[p]
        rest = state["exp_avg_sq"][1:] if p is ad.lora_A else state["exp_avg_sq"][:, 1:]
        assert not rest.any()
    assert torch.equal(ad.lora_A[1:].detach(), a_rest) and not ad.lora_B[:, 1:].any()
    ad.grow(1)
    step()
    moved = ad.lora_B[:, 1].detach().abs()
    assert moved.gt(0).all() and moved.le(1e-2 * (1 + 1e-6)).all()
