"""DyLoRA: one training run gives an adapter usable at every rank in its range."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_merge_round_trip, llama, tokens, train
from torch import nn

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.methods.dylora import set_rank
from rankwise.errors import ConfigError

RANK = 6


def _task(seed: int = 0):
    """A frozen 16x24 layer and a target update with decaying singular values 3, 2, 1.3, ..."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16, bias=False)).double()
    u, _ = torch.linalg.qr(torch.randn(16, RANK, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, RANK, generator=g, dtype=torch.float64))
    s = 3.0 * (0.66 ** torch.arange(RANK, dtype=torch.float64))
    x = torch.randn(512, 24, generator=g, dtype=torch.float64)
    y = model(x).detach() + x @ (u * s @ v.T).T
    return model, x, y, s


@functools.cache
def _fit(method: str, rank: int, steps: int = 1500):
    """Train once per method (cached: the tests only change the active rank or restore what they change)."""
    torch.manual_seed(0)
    model, x, y, s = _task()
    attach(model, method, "0", rank=rank, alpha=float(rank))
    train(model, lambda: (model(x) - y).square().mean(), steps=steps, lr=0.02, train_mode=True)
    return model, x, y, s


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return (model(x) - y).square().mean().item()


def _excess(model, x, y, s, k: int) -> float:
    """Loss above the best rank-k fit (Eckart–Young), as a fraction of the whole update's energy."""
    scale = x.square().mean().item() / 16
    best, total = (s[k:] ** 2).sum().item() * scale, (s**2).sum().item() * scale
    return (_loss(model, x, y) - best) / total


def test_every_rank_in_the_range_is_close_to_the_best_rank_k_fit():
    model, x, y, s = _fit("dylora", RANK)
    model.eval()
    for k in range(1, RANK + 1):
        set_rank(model, k)
        assert _excess(model, x, y, s, k) < 0.16, k  # measured 0.07-0.14 (alpha/b scaling)


def test_a_plain_lora_truncated_to_k_is_much_worse_than_dylora_at_k():
    """The paper's contrast: LoRA's components are not ordered, so its first k are no rank-k model."""
    lora, x, y, s = _fit("lora", RANK)
    dylora, _, _, _ = _fit("dylora", RANK)
    dylora.eval()
    ad = adapted_layers(lora)["0"].adapters["default"]
    full_a = ad.lora_A.detach().clone()
    for k in (1, 2):
        set_rank(dylora, k)
        with torch.no_grad():
            ad.lora_A.copy_(full_a)
            ad.lora_A[k:].zero_()
        assert _excess(dylora, x, y, s, k) < 0.5 * _excess(lora, x, y, s, k), k  # 0.08 vs 0.24, 0.07 vs 0.27


def test_training_samples_ranks_and_eval_uses_the_active_rank():
    model, x, _, _ = _task()
    attach(model, "dylora", "0", rank=RANK, min_rank=3)
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
    seen = set()
    model.train()
    for _ in range(60):
        out = model(x[:1])
        seen.add(round((out - nn.functional.linear(x[:1], model[0].base_layer.weight)).abs().sum().item(), 8))
    assert len(seen) == RANK - 3 + 1  # each rank in [3, 6] gives its own output
    model.eval()
    set_rank(model, 4)
    expected = ad.lora_B[:, :4] @ ad.lora_A[:4] * (RANK / 4)
    torch.testing.assert_close(ad.delta_weight(), expected.float())
    p, q = ad.lowrank_factors()  # ΔW = s·P Q at the active rank, s = alpha / rank
    assert q.shape[0] == 4
    torch.testing.assert_close((p @ q * ad.scaling).float(), expected.float())
    a, b, scale = ad.delta_factors()
    torch.testing.assert_close((b @ a * scale).float(), expected.float())


def test_update_last_trains_only_the_sampled_component():
    model, x, y, _ = _task()
    attach(model, "dylora", "0", rank=RANK, update="last")
    ad = adapted_layers(model)["0"].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
    model.train()
    torch.manual_seed(3)
    (model(x) - y).square().mean().backward()
    rows = (ad.lora_A.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert len(rows) == 1


def test_merge_save_load_and_bad_ranks(tmp_path):
    model = llama()
    x = tokens(n=2, length=10, vocab=200)
    attach(model, "dylora", "all-linear", rank=8, min_rank=2)
    train(model, lambda: model(x, labels=x).loss, steps=5, lr=1e-2, train_mode=True)
    set_rank(model, 4)
    assert_merge_round_trip(model, x)
    save_adapter(model, tmp_path / "a")
    fresh = llama()
    load_adapter(fresh, tmp_path / "a")
    set_rank(fresh, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    for bad in (1, 9, 2.0):
        with pytest.raises(ConfigError, match=r"outside the range .*\[2, 8\]"):
            set_rank(model, bad)
    with pytest.raises(ConfigError, match="min_rank must be in"):
        attach(llama(), "dylora", "all-linear", rank=4, min_rank=5)
    with pytest.raises(ConfigError, match="no dylora adapter"):
        set_rank(llama(), 2)
