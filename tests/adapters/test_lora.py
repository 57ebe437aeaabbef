"""LoRA: scaling, training, and agreement with PEFT's LoRA on the same weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import gpt2, llama, logits, make_trained, tokens

from rankwise.adapters import adapted_layers, attach


def train_steps(model, x, steps: int = 30, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_lowers_the_loss_and_touches_only_the_adapter(method):
    model = llama()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    attach(model, method, targets="all-linear", rank=4, alpha=8)
    losses = train_steps(model, tokens(n=4, length=16, vocab=200))
    assert losses[-1] < losses[0] - 0.5
    for path, layer in adapted_layers(model).items():
        assert torch.equal(layer.base_layer.weight, frozen[f"{path}.weight"])


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling_and_rslora(tiny, rslora, expected):
    attach(tiny, "lora", targets="q_proj", rank=4, alpha=16, use_rslora=rslora)
    layer = tiny.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    assert adapter.scaling == pytest.approx(expected)
    make_trained(tiny)
    h = torch.randn(3, 64)
    want = layer.base_layer(h) + expected * h @ adapter.lora_A.t() @ adapter.lora_B.t()
    torch.testing.assert_close(layer(h), want, atol=1e-6, rtol=1e-5)


def test_fresh_lora_is_the_identity_change(tiny):
    x = tokens()
    before = logits(tiny, x)
    attach(tiny, "lora", targets="all-linear", rank=4)
    assert torch.equal(logits(tiny, x), before)


def _peft_pair(build, targets, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    base = build()
    ours = copy.deepcopy(base)
    attach(ours, "lora", targets=targets, rank=4, alpha=8, **{k: v for k, v in lora_kwargs.items()})
    make_trained(ours, std=0.2)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            use_rslora=lora_kwargs.get("use_rslora", False),
            fan_in_fan_out=build is gpt2,
        ),
    )
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                ad = adapted_layers(ours)[name.removeprefix("base_model.model.")].adapters[
                    "default"
                ]
                module.lora_A["default"].weight.copy_(ad.lora_A)
                module.lora_B["default"].weight.copy_(ad.lora_B)
    return ours, peft_model


@pytest.mark.parametrize(
    ("build", "targets", "rslora"),
    [
        (llama, ["q_proj", "down_proj"], False),
        (llama, ["v_proj"], True),
        (gpt2, ["c_attn", "c_fc"], False),
    ],
    ids=["llama", "llama-rslora", "gpt2-conv1d"],
)
def test_outputs_and_gradients_match_peft(build, targets, rslora):
    ours, theirs = _peft_pair(build, targets, use_rslora=rslora)
    x = tokens()
    y_ours, y_theirs = logits(ours, x), logits(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            ad = adapted_layers(ours)[name.removeprefix("base_model.model.")].adapters["default"]
            assert ad.lora_B.grad.abs().max() > 0
            torch.testing.assert_close(ad.lora_A.grad, module.lora_A["default"].weight.grad)
            torch.testing.assert_close(ad.lora_B.grad, module.lora_B["default"].weight.grad)
