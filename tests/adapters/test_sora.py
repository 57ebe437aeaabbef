"""SoRA: the gate's proximal steps reach exact zeros and prune rank during training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_merge_round_trip, llama, logits, tokens
from safetensors.torch import load_file
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.finetune import FinetuneConfig, finetune, trainable_adapter_map
from rankwise.adapters.methods.sora import (
    GATE_TRAVEL,
    MAX_GATE_LR,
    GateAdam,
    SoraConfig,
    soft_threshold,
    sora_ranks,
)
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.errors import ConfigError


def _rank2_task():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16, bias=False)).double()
    u, _ = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 2, generator=g, dtype=torch.float64))
    x = torch.randn(256, 24, generator=g, dtype=torch.float64)
    y = model(x).detach() + x @ (u * torch.tensor([2.0, 1.0], dtype=torch.float64) @ v.T).T
    return model, x, y


def _train(model, loss_fn, steps: int, lr: float) -> list[float]:
    """A loop of one's own: the rules SoRA brings (its gate step) run at their hooks."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rules = TrainingRules(build_rules([], methods=["sora"]))
    rules.setup(model, trainable_adapter_map(model), opt, steps=steps)
    model.train()
    losses = [rules.train_step(s, loss_fn, opt) for s in range(steps)]
    model.eval()
    return losses


def test_the_gate_prunes_to_the_rank_the_task_needs():
    torch.manual_seed(0)
    model, x, y = _rank2_task()
    attach(model, "sora", "0", rank=8, alpha=8.0, sparsity=1.5)
    losses = _train(model, lambda: (model(x) - y).square().mean(), steps=600, lr=0.01)
    gate = adapted_layers(model)["0"].adapters["default"].gate
    assert (gate == 0).sum() >= 5  # exact zeros, not small numbers
    assert sora_ranks(model) == {"0": int(torch.count_nonzero(gate))}
    assert 2 <= sora_ranks(model)["0"] <= 3  # the target update has rank 2 (measured: 2)
    assert losses[-1] < 0.02 * losses[0]


def test_without_sparsity_nothing_is_pruned_and_sora_is_a_gated_lora():
    torch.manual_seed(0)
    model, x, y = _rank2_task()
    attach(model, "sora", "0", rank=4, sparsity=0.0)
    _train(model, lambda: (model(x) - y).square().mean(), steps=50, lr=0.01)
    ad = adapted_layers(model)["0"].adapters["default"]
    assert sora_ranks(model)["0"] == 4
    assert not torch.equal(ad.gate.detach(), torch.ones(4, dtype=ad.gate.dtype))  # the gate trained
    expected = model[0].base_layer(x) + x @ (ad.lora_B @ torch.diag(ad.gate) @ ad.lora_A).T * ad.scaling
    torch.testing.assert_close(model(x), expected)


def test_one_proximal_step_is_an_adam_step_then_soft_thresholding():
    model, x, y = _rank2_task()
    attach(model, "sora", "0", rank=4)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
        ad.gate.copy_(torch.tensor([1.0, 0.06, -0.03, -2.0]))
    (model(x) - y).square().mean().backward()
    g0, grad = ad.gate.detach().clone(), ad.gate.grad.clone()
    GateAdam(ad.gate).step(ad.gate, eta=0.1, threshold=0.05)
    # Adam's first step moves every entry by the full step size, against its gradient's sign
    expected = soft_threshold(g0 - 0.1 * grad / (grad.abs() + 1e-8), 0.05)
    torch.testing.assert_close(ad.gate.detach(), expected)
    assert (ad.gate == 0).any()  # the two small entries cannot survive a 0.15 move
    assert ad.gate.grad is None  # the optimizer will not move the gate again
    torch.testing.assert_close(soft_threshold(torch.tensor([0.3, -0.3, 0.05]), 0.1), torch.tensor([0.2, -0.2, 0.0]))


def test_the_default_gate_step_is_relative_to_the_run_length():
    for steps in (40, 100, 10_000):  # a gate can travel GATE_TRAVEL in any run of 30 steps or more
        travel = sum(SoraConfig().gate_schedule(s, steps)[0] for s in range(steps))
        assert travel == pytest.approx(GATE_TRAVEL)
    assert SoraConfig().gate_schedule(0, 3)[0] == MAX_GATE_LR  # a short run cannot prune everything
    config = SoraConfig(sparsity=0.6, sparsity_warmup=0.5)
    eta = GATE_TRAVEL / 40
    assert config.gate_schedule(0, 40) == pytest.approx((eta, eta * 0.6 / 20))  # the threshold ramps up
    assert config.gate_schedule(19, 40) == config.gate_schedule(39, 40) == pytest.approx((eta, eta * 0.6))
    assert SoraConfig(gate_lr=0.2, sparsity=0.5, sparsity_warmup=0.0).gate_schedule(0, 10) == (0.2, 0.1)


def test_finetune_runs_the_gate_step(tmp_path):
    cfg = FinetuneConfig(
        model="tiny-llama", method="sora", rank=4, seq_len=32, steps=4, batch_size=2, lr=1e-2,
        eval_tokens=0, method_options={"sparsity": 100.0}, out=str(tmp_path / "a"),
    )
    finetune(cfg, progress=False)
    model = llama()
    load_adapter(model, tmp_path / "a")
    assert set(sora_ranks(model).values()) == {0}  # a huge L1 weight zeroes every gate


def test_merge_save_load_round_trip_and_bad_options(tmp_path):
    model = llama()
    x = tokens(n=2, length=10, vocab=200)
    attach(model, "sora", "all-linear", rank=4)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            ad = layer.adapters["default"]
            ad.lora_B.normal_(std=0.1)
            ad.gate.copy_(torch.tensor([1.0, 0.0, 0.5, -1.0]))
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "s")
    fresh = llama()
    load_adapter(fresh, tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    assert set(sora_ranks(fresh).values()) == {3}
    with pytest.raises(ConfigError, match="sparsity .* must be >= 0"):
        attach(llama(), "sora", "all-linear", sparsity=-1.0)
    with pytest.raises(ConfigError, match="gate_lr must be"):
        attach(llama(), "sora", "all-linear", gate_lr=0.0)
    with pytest.raises(ConfigError, match="sparsity_warmup must be a fraction"):
        attach(llama(), "sora", "all-linear", sparsity_warmup=2.0)


TINY = dict(model="tiny-llama", method="sora", rank=4, seq_len=32, lr=3e-3, eval_tokens=0, seed=0, batch_size=2)


class _Stop(Exception):
    pass


def test_the_gate_rule_resumes_exactly(tmp_path):
    """The gates' Adam moments are in the checkpoint: a resumed run ends where a whole one does."""
    from dataclasses import replace

    from safetensors.torch import load_file

    common = {**TINY, "steps": 6, "method_options": {"sparsity": 1.0}}
    finetune(FinetuneConfig(**common, out=str(tmp_path / "whole")), progress=False)
    config = FinetuneConfig(**common, out=str(tmp_path / "parts"), checkpoint_every=2)

    def stop(step, loss):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(config, progress=False, on_step=stop)
    assert finetune(replace(config, resume=True), progress=False).resumed_from == 4
    (name,) = [f.name for f in (tmp_path / "whole").glob("*.safetensors")]
    a, b = load_file(tmp_path / "parts" / name), load_file(tmp_path / "whole" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("gate" in k for k in a)


def test_the_gate_rule_refuses_other_methods():
    with pytest.raises(ConfigError, match="rule 'sora_gate' cannot train the 'lora' adapter.*works with sora"):
        finetune(FinetuneConfig(**{**TINY, "method": "lora"}, steps=1, rules=("sora_gate",)), progress=False)


def _pruned_sora(use_rslora: bool = False):
    """A tiny llama with SoRA (rank 4) on q/v whose gates were zeroed by hand, unevenly."""
    model = llama()
    attach(model, "sora", ["q_proj", "v_proj"], rank=4, alpha=8.0, use_rslora=use_rslora)
    gates = {0: [1.0, 0.0, -0.5, 2.0], 1: [0.0, 0.7, 0.0, 0.0], 2: [0.0, 0.0, 0.0, 0.0], 3: [1.0, 1.0, 0.5, 0.3]}
    with torch.no_grad():
        for i, layer in enumerate(adapted_layers(model).values()):
            ad = layer.adapters["default"]
            ad.lora_B.normal_(std=0.2)
            ad.gate.copy_(torch.tensor(gates[i % 4]))
    return model


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_export_removes_pruned_ranks_and_loads_in_peft_with_equal_outputs(tmp_path, use_rslora):
    from peft import PeftModel

    model = _pruned_sora(use_rslora)
    x = tokens(n=2, length=10, vocab=200)
    save_adapter(model, tmp_path / "sora")
    save_adapter(model, tmp_path / "peft", format="peft")
    assert json.loads((tmp_path / "sora" / "adapter_config.json").read_text())["format"] == "rankwise-adapter"
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ranks = sora_ranks(model)
    kept = {p: r for p, r in ranks.items() if r}
    assert cfg["peft_type"] == "LORA" and cfg["r"] in kept.values()
    for path, r in ranks.items():  # each layer at its own rank; a layer with none left is left out
        a = tensors.get(f"base_model.model.{path}.lora_A.weight")
        assert (a is None) if r == 0 else (a.shape[0] == r and cfg["rank_pattern"].get(path, cfg["r"]) == r)
    assert len(tensors) == 2 * len(kept)
    size = sum(t.numel() for t in tensors.values())
    native = sum(t.numel() for t in load_file(str(tmp_path / "sora" / "adapter.safetensors")).values())
    assert size < 0.6 * native
    with torch.no_grad():
        ours = logits(model, x)
        theirs = PeftModel.from_pretrained(llama(), tmp_path / "peft")
        torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=1e-5)
        back = llama()
        plan = load_adapter(back, tmp_path / "peft")
        assert plan.method == "lora" and plan.config.rank == max(kept.values())
        torch.testing.assert_close(logits(back, x), ours, atol=1e-5, rtol=1e-5)


def test_peft_export_of_an_adapter_with_no_rank_left_is_refused(tmp_path):
    model = _pruned_sora()
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapters["default"].gate.zero_()
    with pytest.raises(ConfigError, match="every layer of the adapter has rank 0 .* nothing to export"):
        save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
    save_adapter(model, tmp_path / "sora")  # the rankwise format keeps it (training can go on)
