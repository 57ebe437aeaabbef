"""TriAdaptLoRA: a triangular L·U core, importance by normalised update norm, threshold-driven growth."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_merge_round_trip, llama, tokens
from test_increlora import _all_adapters, _train_llama

from rankwise.adapters import attach, load_adapter, save_adapter
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.methods.triadapt import threshold_at
from rankwise.adapters.rules.growth import total_rank
from rankwise.errors import ConfigError


def test_the_core_is_lower_times_upper_and_growing_keeps_what_was_learned():
    model = llama()
    attach(model, "triadapt", "all-linear", rank=4, init_rank=2)
    ad = next(iter(trainable_adapter_map(model).values()))
    with torch.no_grad():  # train-like values in the active block (inactive parts never train)
        for p in (ad.tri_L, ad.tri_U):
            p[:2, :2].normal_()
        ad.lora_B[:, :2].normal_(std=0.1)
    core = ad.core(2)
    torch.testing.assert_close(core, ad.tri_L[:2, :2].tril() @ ad.tri_U[:2, :2].triu())
    before = ad.delta_weight()
    width = ad.layer.in_features + ad.layer.out_features
    assert ad.parameters_in_use() == 2 * width + 2 * 3  # k(in+out) + the two k×k triangles
    ad.grow(1)
    torch.testing.assert_close(ad.core(3)[:2, :2], core)  # the leading block is unchanged
    torch.testing.assert_close(ad.delta_weight(), before)  # a new component starts at zero (B)


def test_the_threshold_falls_and_the_highest_layers_grow_first():
    assert threshold_at(0.0, "linear") == 1.0 and threshold_at(1.0, "linear") == 0.0
    assert threshold_at(0.5, "exponential") < threshold_at(0.5, "linear")
    model = llama()
    attach(model, "triadapt", "all-linear", rank=4, init_rank=1, target_rank=2)
    adapters = trainable_adapter_map(model)
    with torch.no_grad():
        for i, a in enumerate(adapters.values()):
            a.lora_B[:, 0].fill_(0.01 * (i + 1))
    scores = {p: a.score for p, a in adapters.items()}
    order = sorted(scores, key=scores.get, reverse=True)
    cls = type(adapters[order[0]])
    # τ = 1: only the top layer is over it, and it takes its share (up to its room, 3)
    assert cls.plan_growth(adapters, budget=99, events_left=5, progress=0.0) == [order[0]] * 3
    over = [p for p in order if scores[p] >= 0.5 * scores[order[0]]]
    assert 1 < len(over) < len(order)
    half = cls.plan_growth(adapters, budget=2 * len(over) + 1, events_left=1, progress=0.5)
    assert half == over + over + [order[0]]  # one each in score order, then again from the top
    assert cls.plan_growth(adapters, budget=3, events_left=1, progress=1.0) == order[:3]


def test_rank_grows_within_the_budget_and_the_round_trip_keeps_it(tmp_path):
    model, adapters, history = _train_llama(
        "triadapt", 16, rank=4, init_rank=1, target_rank=2, grow_every=2, grow_until=1.0
    )
    layers = len(adapters)
    assert history[0] == layers and history == sorted(history)
    assert history[-1] == 2 * layers  # the budget is reached within the window
    x = tokens(n=2, length=10, vocab=200)
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "t")
    fresh = llama()
    load_adapter(fresh, tmp_path / "t")
    assert total_rank(_all_adapters(fresh)) == history[-1]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_finetune_triadapt_lowers_the_loss():
    cfg = FinetuneConfig(
        model="tiny-llama", method="triadapt", rank=4, seq_len=32, lr=3e-3, eval_tokens=0,
        batch_size=4, steps=20, method_options={"grow_every": 2},
    )
    result = finetune(cfg, progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05


def test_bad_threshold():
    with pytest.raises(ConfigError, match="threshold must be one of"):
        attach(llama(), "triadapt", "all-linear", rank=4, threshold="cubic")
