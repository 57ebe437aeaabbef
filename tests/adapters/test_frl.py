"""FRL: clients send rankings, the server votes; layer ranks follow the votes."""

from __future__ import annotations

import pytest
import torch

from rankwise.adapters.federated import FRL, RoundConfig, positions, simulate, vote
from rankwise.adapters.inject import adapted_layers
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama


def frl(rank=4, budget=4, **kwargs):
    model, _ = tiny_llama(layers=1, hidden=32)
    strategy = FRL(rank=rank, budget=budget, **kwargs)
    strategy.setup(model)
    return model, strategy


def favouring(strategy, layer: int, seed: int = 0) -> torch.Tensor:
    """A client ranking that puts every component of layer ``layer`` on top."""
    scores = torch.rand(strategy.components, generator=torch.Generator().manual_seed(seed))
    scores[layer * strategy.rank : (layer + 1) * strategy.rank] += 10
    return positions(scores)


def test_positions_and_vote():
    assert positions(torch.tensor([0.3, 0.1, 0.2])).tolist() == [2, 0, 1]
    a, b, c = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0])
    assert vote([a, b, c]).tolist() == [0, 2, 1]  # sums 2, 4, 3
    assert vote([torch.tensor([0, 1]), torch.tensor([1, 0])]).tolist() == [0, 1]  # a tie: lower index first
    with pytest.raises(ConfigError, match="at least one"):
        vote([])


def test_layer_ranks_grow_and_shrink_as_clients_vote():
    _, strategy = frl()
    paths = list(strategy.layer_ranks())
    strategy.aggregate([{"ranking": favouring(strategy, 0, s)} for s in range(3)])
    ranks = strategy.layer_ranks()
    assert ranks[paths[0]] == 4 and sum(ranks.values()) == 4
    # the clients now vote layer 3 up: its rank grows to 4, layer 0's shrinks to 0
    strategy.aggregate([{"ranking": favouring(strategy, 3, s)} for s in range(3)])
    ranks = strategy.layer_ranks()
    assert ranks[paths[3]] == 4 and ranks[paths[0]] == 0
    # split votes: 2 clients for layer 5, 2 for layer 6 -> each gets part of the budget
    strategy.aggregate([{"ranking": favouring(strategy, layer, s)} for s, layer in enumerate([5, 5, 6, 6])])
    ranks = strategy.layer_ranks()
    assert ranks[paths[5]] + ranks[paths[6]] == 4 and ranks[paths[3]] == 0


def test_one_poisoned_vote_cannot_overturn_the_honest_majority():
    _, strategy = frl()
    honest = favouring(strategy, 2)
    attacker = strategy.poison({"ranking": honest})["ranking"]
    strategy.aggregate([{"ranking": honest}] * 3 + [{"ranking": attacker}])
    assert strategy.layer_ranks()[list(strategy.layer_ranks())[2]] == 4


def test_clients_train_scores_and_the_model_uses_the_global_mask():
    model, _ = tiny_llama(layers=1, hidden=32)
    strategy = FRL(rank=4, budget=10, score_lr=0.2)
    g = torch.Generator().manual_seed(0)
    clients = [torch.randint(0, 260, (4, 16), generator=g) for _ in range(2)]
    result = simulate(model, strategy, clients, RoundConfig(rounds=2, local_steps=3, lr=1e-2, batch_size=2))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert sorted(result.state["ranking"].tolist()) == list(range(strategy.components))
    mask = strategy.top(strategy.ranking)
    for i, (path, layer) in enumerate(adapted_layers(model).items()):
        b = layer.adapters["default"].lora_B
        keep = mask[i * 4 : (i + 1) * 4]
        torch.testing.assert_close(b, strategy.frozen_b[path] * keep)
    assert sum(strategy.layer_ranks().values()) == 10


def test_training_moves_the_ranking():
    model, _ = tiny_llama(layers=1, hidden=32)
    strategy = FRL(rank=4, score_lr=0.5, init_scale=0.2)
    g = torch.Generator().manual_seed(0)
    clients = [torch.randint(0, 260, (4, 16), generator=g)]
    strategy.setup(model)
    before = strategy.ranking.clone()
    strategy.load(model)
    from rankwise.adapters.local_training import batches_of

    message = strategy.local_update(model, batches_of(clients[0], 2), steps=3, lr=1e-2)
    assert not torch.equal(message["ranking"], before)


@pytest.mark.parametrize("budget", [0, 1000, 2.5])
def test_bad_budget_names_the_range_and_leaves_the_model_alone(budget):
    model, _ = tiny_llama(layers=1, hidden=32)
    with pytest.raises(ConfigError, match=r"budget .* must be in \[1, 28\]"):
        FRL(rank=4, budget=budget).setup(model)
    assert adapted_layers(model) == {}


def test_bad_options():
    with pytest.raises(ConfigError, match="score_lr"):
        FRL(score_lr=0)
    model, _ = tiny_llama(layers=1, hidden=32)
    with pytest.raises(ConfigError, match="at least 1 client"):
        simulate(model, FRL(rank=2), [])
