"""Bayesian-LoRA: hard-concrete gates reach exact 0/1 and choose rank and bit-width under the prior."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_merge_round_trip, llama, tokens
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.methods.bayes_lora import (
    bayes_lora_choices,
    fake_quantize,
    gated_quantize,
    hard_concrete,
)
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.errors import ConfigError


def _train(steps: int, lr: float = 0.05, **options):
    """A rank-2 regression at ``lr`` (gate logits at ``gate_lr_scale × lr``: pass 1.0 at 0.05)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16, bias=False))
    x = torch.randn(128, 24, generator=g)
    target = torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g) * 0.3
    y = (model(x) + x @ target.T).detach()
    attach(model, "bayes_lora", "0", rank=6, **options)
    model.train()
    from rankwise.adapters.finetune import param_groups

    opt = torch.optim.Adam(param_groups(model, lr), lr=lr)  # gate logits at gate_lr_scale × lr
    rules = TrainingRules(build_rules([], methods=["bayes_lora"]))
    rules.setup(model, trainable_adapter_map(model), opt, steps=steps)
    losses = [rules.train_step(s, lambda: (model(x) - y).square().mean(), opt) for s in range(steps)]
    return model.eval(), adapted_layers(model)["0"].adapters["default"], losses


def test_gates_are_exactly_zero_or_one_away_from_the_middle():
    logits = torch.tensor([-6.0, -2.5, 0.0, 2.5, 6.0])
    z = hard_concrete(logits, sample=False)
    assert z[0] == 0 and z[1] == 0 and 0 < z[2] < 1 and z[3] == 1 and z[4] == 1
    sampled = hard_concrete(torch.full((10000,), 0.0), sample=True)
    assert (sampled == 0).any() and (sampled == 1).any()  # the stretch makes both reachable


def test_bit_gates_pick_the_precision():
    x = torch.randn(5, 7)
    torch.testing.assert_close(gated_quantize(x, torch.ones(4)), x)  # all open: full precision
    assert torch.equal(gated_quantize(x, torch.zeros(4)), fake_quantize(x, 2))
    assert torch.equal(gated_quantize(x, torch.tensor([1.0, 1.0, 0.0, 0.0])), fake_quantize(x, 8))
    assert len(torch.unique(fake_quantize(x, 2))) <= 3


def test_a_strong_prior_closes_gates_to_exact_zeros():
    model, ad, losses = _train(400, rank_prior=0.5, bit_prior=0.0, gate_init=1.0, gate_lr_scale=1.0)
    z, _, _ = ad.gates(sample=False)
    assert ((z == 0) | (z == 1)).all()  # every gate settled at exactly 0 or 1
    assert bayes_lora_choices(model)["0"][0] == int((z == 1).sum()) == 2  # the target's rank
    assert losses[-1] < 0.05 * losses[0]


def test_at_a_fine_tuning_learning_rate_the_default_gates_close_in_a_short_run():
    """The gates must be able to travel from open to closed within a short run at an LLM
    learning rate (the bench's 40 steps at 1e-3): at the old gate_lr_scale of 50 they moved
    by 2 and never closed; a strong prior now closes rank and precision both."""
    _, ad, _ = _train(40, lr=1e-3, rank_prior=0.5, bit_prior=0.5)
    rank, bits_a, bits_b = ad.choices()
    assert rank < 6 and bits_a < 32 and bits_b < 32


def test_without_a_prior_gates_stay_open_and_with_a_bit_prior_bits_drop():
    _, ad, _ = _train(60, rank_prior=0.0, bit_prior=0.0, gate_lr_scale=1.0)
    assert ad.choices() == (6, 32, 32)
    _, ad, _ = _train(150, rank_prior=0.0, bit_prior=5.0, gate_init=1.0, gate_lr_scale=1.0)
    _, bits_a, bits_b = ad.choices()
    assert bits_a < 32 and bits_b < 32


def test_merge_save_load_round_trip(tmp_path):
    model = llama()
    x = tokens(n=2, length=10, vocab=200)
    attach(model, "bayes_lora", "all-linear", rank=4)
    with torch.no_grad():
        for a in trainable_adapter_map(model).values():
            a.lora_B.normal_(std=0.1)
            a.rank_logit.copy_(torch.tensor([5.0, -5.0, 0.3, 5.0]))
            a.bits_logit_A.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    model.eval()  # gates are sampled in training mode, deterministic in eval mode
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "b")
    fresh = llama()
    load_adapter(fresh, tmp_path / "b")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    assert set(bayes_lora_choices(fresh).values()) == {(3, 8, 32)}


def test_finetune_bayes_lora_lowers_the_loss():
    cfg = FinetuneConfig(model="tiny-llama", method="bayes_lora", rank=4, seq_len=32, lr=3e-3,
                         eval_tokens=0, batch_size=4, steps=20)
    result = finetune(cfg, progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05


def test_bad_options():
    with pytest.raises(ConfigError, match="rank_prior must be a number >= 0"):
        attach(llama(), "bayes_lora", "all-linear", rank_prior=-1.0)


def test_gate_logits_train_at_a_multiple_of_the_learning_rate():
    from rankwise.adapters.finetune import param_groups

    model = llama()
    attach(model, "bayes_lora", "all-linear", rank=4, gate_lr_scale=20.0)
    groups = param_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(2e-2)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("logit" in names[id(p)] for p in groups[1]["params"])
    assert not any("logit" in names[id(p)] for p in groups[0]["params"])
    with pytest.raises(ConfigError, match="gate_lr_scale must be a positive number"):
        attach(llama(), "bayes_lora", "all-linear", gate_lr_scale=0.0)
