"""ALLoRA: each row's step is scaled by 1/sqrt(||row||² + 1/η²); dropout- and scaling-free."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.adapters import adapted_layers, attach
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.adapters.rules.allora import row_rates
from rankwise.errors import ConfigError

TINY = dict(model="tiny-llama", rank=4, seq_len=32, lr=3e-3, eval_tokens=0, seed=0, batch_size=4)


def _linear_task(method: str = "lora", **options):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8, bias=False))
    attach(model, method, "0", rank=3, **options)
    x = torch.randn(64, 12, generator=g)
    y = torch.randn(64, 8, generator=g)
    return model, lambda: (model(x) - y).square().mean()


def _one_step(rules_names, method="lora", *, rows=(0.1, 1.0, 4.0)):
    """One SGD step; A's rows start with the given norms, B non-zero. Returns (A before, A after)."""
    torch.manual_seed(0)
    model, loss_fn = _linear_task(method)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_A.copy_(torch.nn.functional.normalize(ad.lora_A, dim=1) * torch.tensor(rows)[:, None])
        ad.lora_B.normal_(std=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rules = TrainingRules(build_rules(rules_names))
    rules.setup(model, trainable_adapter_map(model), opt, steps=1)
    before = ad.lora_A.detach().clone()
    rules.train_step(0, loss_fn, opt)
    return before, ad.lora_A.detach().clone()


def test_small_norm_rows_take_larger_steps():
    before, plain = _one_step([])
    _, allora = _one_step(["allora"])
    rates = row_rates(before, eta=1.0)
    # the rule scales each row's step by its rate, computed from the row norm before the step
    torch.testing.assert_close(allora - before, rates[:, None] * (plain - before))
    assert rates[0] > rates[1] > rates[2]
    torch.testing.assert_close(rates, 1 / torch.sqrt(torch.tensor([0.01, 1.0, 16.0]) + 1.0))
    steps = (allora - before).norm(dim=1) / (plain - before).norm(dim=1)
    assert steps[0] > 2 * steps[2]


def test_eta_is_the_rate_of_a_zero_row():
    assert row_rates(torch.zeros(2, 5), eta=3.0).tolist() == pytest.approx([3.0, 3.0])
    with pytest.raises(ConfigError, match="eta must be a positive number"):
        build_rules(["allora"], {"eta": 0.0})


def test_vectors_keep_the_optimizer_rate_with_dora():
    """DoRA's magnitude vector is not rescaled; its matrices are."""
    torch.manual_seed(0)
    model, loss_fn = _linear_task("dora")
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_(std=0.5)
    state = {k: v.clone() for k, v in ad.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rules = TrainingRules(build_rules(["allora"], {"eta": 0.5}))
    rules.setup(model, trainable_adapter_map(model), opt, steps=1)
    rules.train_step(0, loss_fn, opt)
    grads_free = {k: state[k] - v for k, v in ad.state_dict().items()}
    mag = [k for k in state if "magnitude" in k][0]
    assert grads_free[mag].abs().sum() > 0  # it moved, at the optimizer's own rate (checked below)
    ad.load_state_dict(state)
    opt2 = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_fn().backward()
    opt2.step()
    torch.testing.assert_close(ad.state_dict()[mag], state[mag] - grads_free[mag])


def test_dropout_and_scaling_are_refused_with_the_fix():
    rules = TrainingRules(build_rules(["allora"]))
    model, _ = _linear_task(dropout=0.1)
    with pytest.raises(ConfigError, match=r"dropout-free.*-o dropout=0.*works with"):
        rules.check(trainable_adapter_map(model))
    model, _ = _linear_task(alpha=6.0)
    with pytest.raises(ConfigError, match="scaling-free.*alpha"):
        rules.check(trainable_adapter_map(model))
    model, _ = _linear_task(use_rslora=True)
    with pytest.raises(ConfigError, match="scaling-free"):
        rules.check(trainable_adapter_map(model))
    model, _ = _linear_task("vera")
    with pytest.raises(ConfigError, match="no trainable matrix"):
        rules.check(trainable_adapter_map(model))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_finetune_with_allora_lowers_the_loss(method):
    result = finetune(FinetuneConfig(**TINY, method=method, steps=20, rules=("allora",)), progress=False)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05


def test_finetune_refuses_allora_with_dropout_before_training():
    with pytest.raises(ConfigError, match="dropout-free"):
        finetune(
            FinetuneConfig(**TINY, steps=1, rules=("allora",), method_options={"dropout": 0.1}),
            progress=False,
        )
