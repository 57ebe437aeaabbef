"""DP-SGD clients of a federated run: exact per-sample clipping, noise of the right size."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.adapters import attach
from rankwise.adapters.federated import (
    FRL,
    FedAvgLoRA,
    FedSVD,
    RoundConfig,
    per_sample_grads,
    private_gradient,
    simulate,
)
from rankwise.adapters.local_training import lm_loss
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama


def lora_model(layers=1, hidden=32, rank=4):
    """A tiny Llama whose LoRA B factors are non-zero (so every factor gets a gradient)."""
    model, _ = tiny_llama(layers=layers, hidden=hidden)
    attach(model, "lora", "all-linear", rank=rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batch(n=4, length=16, seed=0):
    return torch.randint(0, 260, (n, length), generator=torch.Generator().manual_seed(seed))


def hand_grads(model, x):
    """Each block's gradient by its own backward pass: ``[{name: grad}]``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        lm_loss(model, x[i : i + 1]).backward()
        out.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    return out


def test_per_sample_grads_equal_one_backward_per_block():
    model, x = lora_model(), batch()
    grads, losses = per_sample_grads(model, x)
    for i, expected in enumerate(hand_grads(model, x)):
        for name, g in expected.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(losses[i], lm_loss(model, x[i : i + 1]).detach())


def test_clipping_bounds_each_blocks_contribution():
    model, x = lora_model(), batch()
    per = hand_grads(model, x)
    norms = torch.tensor([math.sqrt(sum(g.pow(2).sum().item() for g in d.values())) for d in per])
    clip = float(norms.median())  # some blocks are cut, some are not
    assert (norms > clip).any() and (norms < clip).any()
    got, _ = private_gradient(model, x, clip=clip)
    for name in got:
        expected = sum(d[name] * min(1.0, clip / float(n)) for d, n in zip(per, norms, strict=True)) / len(x)
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-7)
    # a single block moves the gradient by at most clip / n, however large its own gradient
    single, _ = private_gradient(model, x[:1], clip=1e-3)
    assert math.sqrt(sum(g.pow(2).sum().item() for g in single.values())) <= 1e-3 * (1 + 1e-5)


def test_noise_has_std_noise_multiplier_times_clip_over_n():
    model, x = lora_model(layers=2, hidden=64), batch(n=4)
    clip, sigma = 0.5, 2.0
    clean, _ = private_gradient(model, x, clip=clip)
    noisy, _ = private_gradient(model, x, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(7))
    again, _ = private_gradient(model, x, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(7))
    residual = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    assert residual.numel() > 5000
    expected = sigma * clip / len(x)
    assert abs(residual.std().item() / expected - 1) < 0.1
    assert abs(residual.mean().item()) < 0.1 * expected
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)  # seeded


def test_dp_with_no_noise_and_a_huge_clip_is_the_plain_run():
    model, tok = tiny_llama(layers=1, hidden=32)
    clients = [batch(n=6, length=16, seed=s) for s in range(2)]
    plain = simulate(model, FedSVD(rank=2), clients, RoundConfig(rounds=2, local_steps=2, lr=1e-2, batch_size=3))
    model, _ = tiny_llama(layers=1, hidden=32)
    config = RoundConfig(rounds=2, local_steps=2, lr=1e-2, batch_size=3, dp_clip=1e9, dp_noise_multiplier=0.0)
    private = simulate(model, FedSVD(rank=2), clients, config)
    torch.testing.assert_close(torch.tensor(private.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    assert private.state.keys() == plain.state.keys()
    for key, value in plain.state.items():
        torch.testing.assert_close(private.state[key], value, rtol=1e-4, atol=1e-6)


def test_noise_changes_the_run_and_fedavg_trains_privately_too():
    clients = [batch(n=6, length=16, seed=s) for s in range(2)]
    base = RoundConfig(rounds=1, local_steps=2, lr=1e-2, batch_size=3, dp_clip=1.0)
    runs = {}
    for sigma in (0.0, 1.0):
        model, _ = tiny_llama(layers=1, hidden=32)
        config = RoundConfig(**{**base.__dict__, "dp_noise_multiplier": sigma})
        runs[sigma] = simulate(model, FedAvgLoRA(rank=2), clients, config).state
    key = next(k for k in runs[0.0] if k.endswith("lora_B"))
    assert not torch.allclose(runs[0.0][key], runs[1.0][key])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dp_clip": 0.0}, "dp_clip .* must be a positive number"),
    ({"dp_clip": -1.0}, "dp_clip .* must be a positive number"),
    ({"dp_clip": float("nan")}, "dp_clip .* must be a positive number"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": -0.5}, "dp_noise_multiplier must be a number >= 0"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": float("inf")}, "dp_noise_multiplier must be a number >= 0"),
    ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier=1.0 needs dp_clip"),
])
def test_bad_dp_options_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RoundConfig(**kwargs)


def test_frl_refuses_dp_before_touching_the_model():
    model, _ = tiny_llama(layers=1, hidden=32)
    with pytest.raises(ConfigError, match="dp_clip: strategy 'frl'"):
        simulate(model, FRL(rank=2), [batch()], RoundConfig(dp_clip=1.0))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_under_dp_noise_fedsvd_beats_frozen_a_and_fedavg():
    """The paper's claim at small scale: at the same clip and noise, FedSVD's re-orthogonalised
    A keeps more signal than FFA-LoRA's fixed random A and than FedAvg of both factors."""
    _, tok = tiny_llama()
    text = "def add(a, b):\n    return a + b\n" * 40 + "def mul(x, y):\n    return x * y\n" * 40
    ids = torch.tensor(tok(text)["input_ids"])[: 32 * 48].view(48, 32)
    clients, held = [ids[i::3] for i in range(3)], ids[::5]
    config = RoundConfig(rounds=4, local_steps=4, lr=5e-3, dp_clip=1.0, dp_noise_multiplier=1.0)
    losses = {}
    for name, strategy in [("fedsvd", FedSVD(rank=4)), ("ffa", FedSVD(rank=4, reorthogonalise=False)), ("fedavg", FedAvgLoRA(rank=4))]:
        model, _ = tiny_llama()
        simulate(model, strategy, clients, config)
        with torch.no_grad():
            losses[name] = lm_loss(model.eval(), held).item()
    assert losses["fedsvd"] < losses["ffa"] - 0.03 and losses["fedsvd"] < losses["fedavg"] - 0.02
