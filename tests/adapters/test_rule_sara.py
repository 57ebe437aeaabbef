"""SaRA: the smallest-|w| weights train as a sparse update with a nuclear-norm penalty, reselected once."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_merge_round_trip, llama, tokens
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.methods.sara import smallest_entries
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.adapters.rules.sara import nuclear_norm, nuclear_subgradient
from rankwise.errors import ConfigError

TINY = dict(model="tiny-llama", rank=4, seq_len=32, lr=3e-3, eval_tokens=0, seed=0, batch_size=4)


def _task(seed: int = 0):
    """A linear layer to adapt towards a rank-2 target (a low-rank update is all it needs)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16, bias=False))
    x = torch.randn(128, 24, generator=g)
    target = torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g) * 0.3
    y = (model(x) + x @ target.T).detach()
    return model, lambda: (model(x) - y).square().mean()


def _train(model, loss_fn, steps, lr=0.05, **rule_options):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rules = TrainingRules(build_rules([], rule_options, methods=["sara"]))
    rules.setup(model, trainable_adapter_map(model), opt, steps=steps)
    return [rules.train_step(s, loss_fn, opt) for s in range(steps)], rules, opt


def test_the_trainable_set_is_the_least_important_weights():
    model, _ = _task()
    w = model[0].weight.detach().clone()
    attach(model, "sara", "0", fraction=0.1)
    ad = adapted_layers(model)["0"].adapters["default"]
    k = math.ceil(0.1 * w.numel())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.adapters.default.values"]
    assert ad.values.numel() == k
    chosen = w.abs().flatten()[ad.index.long()]
    rest = torch.ones(w.numel(), dtype=torch.bool)
    rest[ad.index.long()] = False
    assert chosen.max() <= w.abs().flatten()[rest].min()  # every chosen |w| below every other


def test_the_nuclear_norm_gradient_is_added_to_the_values():
    model, loss_fn = _task()
    attach(model, "sara", "0", fraction=0.2)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.values.normal_()
    opt = torch.optim.SGD([ad.values], lr=0.0)
    rules = TrainingRules(build_rules(["sara"], {"nuclear_weight": 0.5}))
    rules.setup(model, trainable_adapter_map(model), opt, steps=10)
    loss_fn().backward()
    task_grad = ad.values.grad.clone()
    rules.after_backward(0)
    dw = ad.delta_weight().requires_grad_(True)
    torch.linalg.matrix_norm(dw, ord="nuc").backward()
    expected = task_grad + 0.5 * dw.grad.flatten()[ad.index.long()]
    torch.testing.assert_close(ad.values.grad, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nuclear_subgradient(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_the_penalty_keeps_the_update_low_rank():
    norms, losses = {}, {}
    for lam in (0.0, 0.05):
        torch.manual_seed(0)
        model, loss_fn = _task()
        attach(model, "sara", "0", fraction=0.3)
        steps, _, _ = _train(model, loss_fn, 150, nuclear_weight=lam, progressive_at=None)
        ad = adapted_layers(model)["0"].adapters["default"]
        norms[lam], losses[lam] = nuclear_norm(ad.delta_weight()), steps
    assert norms[0.05] < 0.8 * norms[0.0]
    for lam in norms:
        assert losses[lam][-1] < 0.7 * losses[lam][0]  # measured 0.56 and 0.57


def test_progressive_reselection_freezes_what_was_learned():
    torch.manual_seed(0)
    model, loss_fn = _task()
    attach(model, "sara", "0", fraction=0.1)
    ad = adapted_layers(model)["0"].adapters["default"]
    opt = torch.optim.Adam([ad.values], lr=0.05)
    rules = TrainingRules(build_rules(["sara"], {"progressive_at": 0.5}))
    rules.setup(model, trainable_adapter_map(model), opt, steps=10)
    for s in range(4):
        rules.train_step(s, loss_fn, opt)
    learned, first_index = ad.values.detach().clone(), ad.index.clone()
    rules.train_step(4, loss_fn, opt)  # the 5th of 10 steps: reselect after it
    assert torch.equal(ad.frozen_index, first_index)
    assert ad.frozen_values.any() and not torch.equal(ad.frozen_values, learned)  # step 5 trained
    assert (ad.values == 0).all() and ad.values not in opt.state  # new entries, fresh moments
    merged = ad.layer.weight_matrix().detach() + ad.delta_weight()  # = W + frozen update
    assert torch.equal(ad.index.long(), smallest_entries(merged, first_index.numel()))
    assert not torch.equal(ad.index, first_index)  # trained entries grew out of the smallest set
    rules.train_step(5, loss_fn, opt)
    assert rules.rules[0].reselected and (ad.values != 0).any()


def test_merge_save_load_round_trip(tmp_path):
    model = llama()
    x = tokens(n=2, length=10, vocab=200)
    attach(model, "sara", "all-linear", fraction=0.05)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapters["default"].values.normal_(std=0.05)
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "s")
    fresh = llama()
    load_adapter(fresh, tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    ad = adapted_layers(fresh)["model.layers.0.mlp.down_proj"].adapters["default"]
    index = ad.index.clone()
    fresh.to(torch.bfloat16)  # a cast moves the positions but never rounds them
    assert ad.index.dtype == torch.float64 and torch.equal(ad.index, index)
    assert ad.values.dtype == torch.bfloat16


def test_finetune_sara_lowers_the_loss_and_saves(tmp_path):
    cfg = FinetuneConfig(**TINY, method="sara", steps=20, out=str(tmp_path / "a"),
                         method_options={"fraction": 0.05}, rule_options={"nuclear_weight": 1e-3})
    result = finetune(cfg, progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05
    model = llama()
    load_adapter(model, tmp_path / "a")
    assert all(a.frozen_values.any() for a in trainable_adapter_map(model).values())  # reselected


def test_the_rule_only_trains_sara_and_bad_options():
    with pytest.raises(ConfigError, match="rule 'sara'.*'lora'.*works with method 'sara' only"):
        finetune(FinetuneConfig(**TINY, steps=1, rules=("sara",)), progress=False)
    with pytest.raises(ConfigError, match="fraction .* must be in"):
        attach(nn.Sequential(nn.Linear(4, 4)), "sara", "0", fraction=0.9)
    with pytest.raises(ConfigError, match="progressive_at must be in"):
        build_rules(["sara"], {"progressive_at": 1.0})
