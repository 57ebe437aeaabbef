"""Heterogeneous batches: rows of one forward use different adapters, methods and ranks.

Every row of a mixed batch must equal that adapter run alone (the ordinary active-adapter
forward), and the engine's continuous batching (requests joining and leaving between decode
steps) must give each request exactly the tokens it gets alone.
"""

from __future__ import annotations

import pytest
import torch
from doc_commands import save_tiny_adapter

from rankwise.adapters import attach, load_adapter, set_active
from rankwise.adapters.inject import RowRouting, adapted_layers, route
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama
from rankwise.serve import Engine, GenerationRequest

ADAPTERS = {"a4": ("lora", 4, 1), "b8": ("lora", 8, 2), "c4": ("lora", 4, 3), "d4": ("dora", 4, 4)}
PROMPTS = ["The quick brown fox", "Hello", "A longer prompt with more tokens in it", "x"]


def _randomise(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def adapted():
    """tiny-llama with LoRA (ranks 4 and 8), DoRA and a method without a fast path (nlora),
    on different targets (some layers carry only some adapters)."""
    model, _ = tiny_llama()
    specs = {
        "lora4": ("lora", "all-linear", 4),
        "lora8": ("lora", ["q_proj", "v_proj"], 8),
        "lora4b": ("lora", "all-linear", 4),
        "dora": ("dora", ["q_proj", "o_proj", "down_proj"], 4),
        "nlora": ("nlora", ["k_proj", "up_proj"], 4),
    }
    for seed, (name, (method, targets, rank)) in enumerate(specs.items()):
        attach(model, method, targets, name, rank=rank, activate=False)
        _randomise(model, name, seed)
    return model.eval()


def _alone(model, name, ids):
    set_active(model, [] if name is None else [name])
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        set_active(model, [])


def test_mixed_batch_rows_equal_each_adapter_alone(adapted):
    rows = ["lora4", "lora8", None, "dora", "lora4", "nlora", "lora4b", "lora8", "dora"]
    ids = torch.randint(4, 200, (len(rows), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), route(adapted, rows):
        mixed = adapted(ids).logits
    base = _alone(adapted, None, ids)
    for i, name in enumerate(rows):
        alone = _alone(adapted, name, ids[i : i + 1])[0]
        assert torch.allclose(mixed[i], alone, atol=1e-4), (name, (mixed[i] - alone).abs().max())
        if name is not None:  # the adapter really changed this row
            assert (mixed[i] - base[i]).abs().max() > 1e-2


def test_routing_is_reused_across_steps_and_cleared_after(adapted):
    routing = RowRouting(["lora4", "lora8", "lora4"])
    ids = torch.randint(4, 200, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with route(adapted, routing):
            first = adapted(ids).logits
        with route(adapted, routing):
            second = adapted(ids).logits
        plain = adapted(ids).logits  # no routing, no active adapter: the base model
    assert torch.equal(first, second)
    assert torch.allclose(plain, _alone(adapted, None, ids))
    assert all(layer.routing is None for layer in adapted_layers(adapted).values())


def test_routing_rejects_unknown_names_and_wrong_batch(adapted):
    with pytest.raises(ConfigError, match="unknown adapter name"):
        with route(adapted, ["lora4", "nope"]):
            pass
    with pytest.raises(ConfigError, match="one entry per batch row"):
        with torch.no_grad(), route(adapted, ["lora4", "lora8"]):
            adapted(torch.ones(3, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, (method, rank, seed) in ADAPTERS.items():
        save_tiny_adapter(root / name, seed=seed, rank=rank, method=method)
    return root


def greedy_alone(adapters_dir, adapter: str | None, prompt: str, max_tokens: int) -> list[int]:
    """Reference: greedy decoding without cache or batching, the adapter alone."""
    model, tok = tiny_llama()
    if adapter is not None:
        load_adapter(model, adapters_dir / adapter, "x")
    ids = tok.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return out


def tokens(handle) -> list[int]:
    return [t for e in handle.events(timeout=120) for t in e.token_ids]


def test_engine_mixed_batch_equals_each_adapter_alone(adapters_dir):
    names = [None, *ADAPTERS]
    with Engine("tiny-llama", adapters_dir, max_batch_size=16) as engine:
        handles = [
            engine.submit(GenerationRequest(model=n or "tiny-llama", prompt=p, max_tokens=8))
            for p in PROMPTS
            for n in names
        ]
        got = [tokens(h) for h in handles]
    expected = [greedy_alone(adapters_dir, n, p, 8) for p in PROMPTS for n in names]
    assert got == expected


def test_continuous_batching_requests_join_and_leave(adapters_dir):
    """Batch of 2 rows, 6 requests of different lengths: rows leave when done and waiting
    requests join the running batch between decode steps; each gets its solo tokens."""
    plan = [("a4", 3), ("b8", 9), ("d4", 5), (None, 7), ("c4", 2), ("a4", 6)]
    with Engine("tiny-llama", adapters_dir, max_batch_size=2) as engine:
        handles = [
            engine.submit(GenerationRequest(model=n or "tiny-llama", prompt=PROMPTS[i % 4], max_tokens=m))
            for i, (n, m) in enumerate(plan)
        ]
        first = tokens(handles[0])
        late = engine.submit(GenerationRequest(model="b8", prompt="late", max_tokens=4))
        got = [first] + [tokens(h) for h in handles[1:]] + [tokens(late)]
        assert engine.metrics()["running"] == 0
    expected = [greedy_alone(adapters_dir, n, PROMPTS[i % 4], m) for i, (n, m) in enumerate(plan)]
    expected.append(greedy_alone(adapters_dir, "b8", "late", 4))
    assert got == expected
    assert [len(t) for t in got] == [m for _, m in plan] + [4]


def _cost(groups, lengths, forward_cost):
    return sum(len(g) * max(lengths[i] for i in g) + forward_cost for g in groups)


def test_length_buckets_split_prompts_to_least_padding_plus_forwards():
    import itertools
    import random

    from rankwise.serve.engine import length_buckets

    assert length_buckets([7] * 5) == [[0, 1, 2, 3, 4]]  # equal lengths: one forward
    assert sorted(map(sorted, length_buckets([3, 200, 4], forward_cost=8))) == [[0, 2], [1]]
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        groups = length_buckets(lengths, forward_cost=10)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(  # every split of the sorted prompts into consecutive groups
            _cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lengths, 10)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert _cost(groups, lengths, 10) == best
