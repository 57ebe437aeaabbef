"""FedSVD: exact aggregation of client updates, SVD re-orthogonalisation, 2-process == 1-process."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from distributed_run import torchrun
from safetensors.torch import load_file

from rankwise.adapters.federated import FedAvgLoRA, FedSVD, RoundConfig, refactor, simulate
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama

WORKER = textwrap.dedent(
    '''
    """One federated run, built the same way in-process (build()) and under torchrun (main)."""
    import sys

    import torch

    from rankwise.adapters.federated import FRL, FedSVD, RoundConfig, run_distributed
    from rankwise.models import tiny_llama

    CONFIG = RoundConfig(rounds=2, local_steps=2, lr=1e-2, batch_size=2)


    def build(name):
        torch.set_num_threads(1)
        model, _ = tiny_llama(layers=1, hidden=32)
        strategy = FedSVD(rank=2) if name == "fedsvd" else FRL(rank=2, score_lr=0.2)
        g = torch.Generator().manual_seed(0)
        clients = [torch.randint(0, 260, (4, 16), generator=g) for _ in range(3)]
        return model, strategy, clients


    if __name__ == "__main__":
        from safetensors.torch import save_file

        model, strategy, clients = build(sys.argv[1])
        result = run_distributed(model, strategy, clients, CONFIG)
        if torch.distributed.get_rank() == 0:
            save_file({**result.state, "losses": torch.tensor(result.losses)}, sys.argv[2])
        torch.distributed.destroy_process_group()
    '''
)


def load_worker(path):
    spec = importlib.util.spec_from_file_location("federated_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["fedsvd", "frl"])
def test_two_process_run_equals_in_process_simulation(tmp_path, name):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "state.safetensors"
    torchrun([str(script), name, str(out)])
    distributed = load_file(str(out))
    worker = load_worker(script)
    threads = torch.get_num_threads()
    try:
        model, strategy, clients = worker.build(name)
        local = simulate(model, strategy, clients, worker.CONFIG)
    finally:
        torch.set_num_threads(threads)
    assert set(distributed) == set(local.state) | {"losses"}
    for key, value in local.state.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distributed["losses"], torch.tensor(local.losses), rtol=1e-5, atol=1e-6)


def client_messages(strategy, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {f"{p}.lora_B": torch.randn(b.shape, generator=g) for p, (a, b) in strategy.global_factors.items()}
        | {f"{p}.lora_A": torch.randn(a.shape, generator=g) for p, (a, b) in strategy.global_factors.items()}
        for _ in range(n)
    ]


def test_fedsvd_aggregate_is_exactly_the_mean_client_update():
    model, _ = tiny_llama(layers=1, hidden=32)
    strategy = FedSVD(rank=4)
    strategy.setup(model)
    old_a = {p: a.clone() for p, (a, _) in strategy.global_factors.items()}
    messages = client_messages(strategy)
    strategy.aggregate(messages)
    for path, (a, b) in strategy.global_factors.items():
        mean_update = torch.stack([m[f"{path}.lora_B"] @ old_a[path] for m in messages]).mean(0)
        torch.testing.assert_close(b @ a, mean_update, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal rows


def test_fedavg_of_factors_is_not_the_mean_update():
    model, _ = tiny_llama(layers=1, hidden=32)
    strategy = FedAvgLoRA(rank=4)
    strategy.setup(model)
    messages = client_messages(strategy)
    strategy.aggregate(messages)
    path = next(iter(strategy.global_factors))
    a, b = strategy.global_factors[path]
    mean_update = torch.stack([m[f"{path}.lora_B"] @ m[f"{path}.lora_A"] for m in messages]).mean(0)
    assert (b @ a - mean_update).norm() > 0.1 * mean_update.norm()


def test_refactor_keeps_the_product_and_its_singular_values():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    nb, na = refactor(b, a)
    torch.testing.assert_close(nb @ na, b @ a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nb.norm(dim=0), torch.linalg.svdvals(b @ a)[:3], rtol=1e-5, atol=1e-5)


def test_fedsvd_beats_frozen_a_on_tiny_clients():
    model, tok = tiny_llama()
    text = "def add(a, b):\n    return a + b\n" * 40 + "def mul(x, y):\n    return x * y\n" * 40
    ids = torch.tensor(tok(text)["input_ids"])[: 32 * 48].view(48, 32)
    clients = [ids[i::3] for i in range(3)]
    config = RoundConfig(rounds=4, local_steps=4, lr=5e-3)
    fedsvd = simulate(model, FedSVD(rank=4), clients, config)
    ffa = simulate(tiny_llama()[0], FedSVD(rank=4, reorthogonalise=False), clients, config)
    assert fedsvd.losses[-1] < fedsvd.losses[0]
    assert fedsvd.losses[-1] < ffa.losses[-1]


def test_bad_federated_input():
    model, _ = tiny_llama(layers=1, hidden=32)
    with pytest.raises(ConfigError, match="at least 1 client"):
        simulate(model, FedSVD(rank=2), [])
    with pytest.raises(ConfigError, match="attackers"):
        simulate(model, FedSVD(rank=2), [torch.zeros(4, 8, dtype=torch.long)], RoundConfig(attackers=(3,)))
    with pytest.raises(ConfigError, match="rounds must be a positive integer"):
        RoundConfig(rounds=0)
    from rankwise.adapters.federated import run_distributed

    with pytest.raises(ConfigError, match="torchrun"):
        run_distributed(model, FedSVD(rank=2), [torch.zeros(4, 8, dtype=torch.long)])
