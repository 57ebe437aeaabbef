"""LoRA-GGPO: a perturbation sized by row weight and gradient norms, applied for the step and removed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.adapters import adapted_layers, attach
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.errors import ConfigError

TINY = dict(model="tiny-llama", rank=4, seq_len=32, lr=3e-3, eval_tokens=0, seed=0, batch_size=4)


def _setup(method="lora", **rule_options):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    attach(model, method, "0", rank=4)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_(std=0.1)
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 32, generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    rules = TrainingRules(build_rules(["ggpo"], rule_options))
    rules.setup(model, trainable_adapter_map(model), opt, steps=3)
    return model, ad, rules, opt, lambda: (model(x) - y).square().mean()


def test_the_perturbation_is_applied_for_the_step_and_removed_exactly():
    model, ad, rules, opt, loss_fn = _setup()
    rule = rules.rules[0]
    w0 = ad.layer.weight.detach().clone()
    rules.before_backward(0)
    eps = ad.layer.weight.detach() - w0
    assert eps.abs().sum() > 0  # the forward and backward see W + ε
    # first step: no gradient yet, σ_i = ρ_w ||W'_i|| / √n per row
    merged = w0 + ad.delta_weight()
    sigma = 0.05 * merged.norm(dim=1) / math.sqrt(64)
    ratio = eps.std(dim=1) / sigma
    assert ((ratio > 0.7) & (ratio < 1.3)).all()
    loss_fn().backward()
    rules.after_backward(0)
    assert torch.equal(ad.layer.weight, w0)  # removed: bit-identical
    assert "0" in rule._grad_norms  # the gradient norms size the next step's noise


def test_the_gradient_norm_enlarges_the_noise():
    model, ad, rules, opt, loss_fn = _setup(rho_grad=10.0)
    rule = rules.rules[0]
    before = rule.noise_scale("0", ad)
    rules.train_step(0, loss_fn, opt)
    after_weight_only = rule.config.rho_weight * (
        ad.layer.weight_matrix() + ad.delta_weight()
    ).norm(dim=1) / math.sqrt(64)
    assert (rule.noise_scale("0", ad) > after_weight_only * 1.01).all()
    assert before.shape == (32,)


def test_the_step_gradient_is_taken_at_the_perturbed_point():
    model, ad, rules, opt, loss_fn = _setup(rho_weight=0.5, rho_grad=0.0)
    state = {k: v.clone() for k, v in ad.state_dict().items()}
    loss_fn().backward()
    plain = ad.lora_A.grad.clone()
    opt.zero_grad(set_to_none=True)
    ad.load_state_dict(state)
    rules.before_backward(0)
    loss_fn().backward()
    rules.after_backward(0)
    assert not torch.allclose(ad.lora_A.grad, plain)


def test_teardown_restores_the_weights_after_an_interrupted_step():
    model, ad, rules, opt, loss_fn = _setup()
    w0 = ad.layer.weight.detach().clone()
    rules.before_backward(0)
    assert not torch.equal(ad.layer.weight, w0)
    rules.teardown()
    assert torch.equal(ad.layer.weight, w0)


def test_bad_options_and_methods_without_lora_factors():
    with pytest.raises(ConfigError, match="both 0"):
        build_rules(["ggpo"], {"rho_weight": 0.0, "rho_grad": 0.0})
    with pytest.raises(ConfigError, match="rho_grad must be a number >= 0"):
        build_rules(["ggpo"], {"rho_grad": -1.0})
    model = nn.Sequential(nn.Linear(16, 16))
    attach(model, "vera", "0", rank=4)
    with pytest.raises(ConfigError, match="ggpo.*'vera'.*lora_A/lora_B.*works with"):
        TrainingRules(build_rules(["ggpo"])).check(trainable_adapter_map(model))


def test_finetune_with_ggpo_and_allora_on_dora_lowers_the_loss():
    cfg = FinetuneConfig(**TINY, method="dora", steps=20, rules=("ggpo", "allora"))
    result = finetune(cfg, progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05
