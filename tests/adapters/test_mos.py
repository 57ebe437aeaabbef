"""MoS: per-layer LoRA factors assembled from shard pools shared across layers."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_merge_round_trip,
    assert_same_state,
    llama,
    logits,
    make_trained,
    snapshot,
    tokens,
    train,
)

from rankwise.adapters import (
    adapted_layers,
    attach,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from rankwise.adapters.methods.mos import MosAdapter
from rankwise.errors import ConfigError


def _adapters(model, name="default") -> dict[str, MosAdapter]:
    return {p: lay.adapters[name] for p, lay in adapted_layers(model).items()}


def test_parameter_count_is_lora_at_the_pool_rank():
    model = llama()
    plan = attach(model, "mos", "all-linear", rank=8, pool_rank=2, private_rank=1, shard_size=16)
    shapes = [(a.layer.out_features, a.layer.in_features) for a in _adapters(model).values()]
    expected = sum(2 * (o + i) for o, i in shapes)  # Σ e·(in + out)
    assert plan.parameters == expected
    assert trainable_parameters(model).trainable == expected
    lora_rank_8 = sum(8 * (o + i) for o, i in shapes)
    assert lora_rank_8 == 4 * expected  # every layer works at rank 8 for a quarter of the cost


def test_factors_mix_private_vectors_and_shards_routed_from_other_layers():
    model = llama()
    attach(model, "mos", ["q_proj", "o_proj", "up_proj"], rank=6, pool_rank=3, private_rank=1, shard_size=16)
    make_trained(model, std=0.1)
    ads = list(_adapters(model).values())
    first = ads[0]
    a, b = first.factors()
    assert a.shape == (6, 64) and b.shape == (64, 6)
    torch.testing.assert_close(a[:1], first.mos_A[:1])  # shard privatization: own first vector
    torch.testing.assert_close(b[:, :1], first.mos_B[:1].T)
    route_a, route_b = first.routes()
    assert len(set(route_a.tolist())) == len(route_a)  # subset selection: no repeats
    assert not torch.equal(route_a[: len(route_b)], route_b[: len(route_a)])  # pair dissociation
    own = first.public_shards()[0]  # the pool is ordered by mos_id; layer 0 owns the first shards
    assert (route_a >= own).any(), "no shard came from another layer's contribution"
    # the routed shards are the other layers' parameters, not copies: gradients reach them
    first_out = first.layer.project_in(torch.randn(3, 64), a)
    (first_out.square().sum() + (b.square().sum())).backward()
    assert any(ad.mos_A.grad is not None and ad.mos_A.grad.abs().sum() > 0 for ad in ads[1:])


def test_output_is_lora_with_the_assembled_factors():
    model = llama()
    x = tokens(vocab=200)
    attach(model, "mos", ["v_proj"], rank=4, pool_rank=2, private_rank=1, alpha=8.0)
    make_trained(model, std=0.2)
    layer = model.model.layers[0].self_attn.v_proj
    ad = layer.adapters["default"]
    h = torch.randn(5, 64)
    a, b = ad.factors()
    want = layer.base_layer(h) + 2.0 * (h @ a.T @ b.T)
    torch.testing.assert_close(layer(h), want)
    assert logits(model, x).isfinite().all()


def test_lm_loss_drops_and_merged_equals_unmerged():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    before = logits(model, x)
    attach(model, "mos", "all-linear", rank=8, pool_rank=2, alpha=16)
    assert torch.equal(logits(model, x), before)
    losses = train(model, lambda: model(x, labels=x).loss, steps=15, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0] - 0.1
    assert_merge_round_trip(model, x)


def test_fused_optimizer_steps_reach_the_pool():
    """Fused AdamW updates parameters without bumping version counters; the pool built for
    one forward pass must not be reused by the next."""

    def run(fresh_pool_every_step: bool) -> list[float]:
        torch.manual_seed(0)
        model = llama()
        x = tokens(n=2, length=12, vocab=200)
        attach(model, "mos", "all-linear", rank=4, pool_rank=2)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        losses = []
        for _ in range(4):
            if fresh_pool_every_step:
                for ad in _adapters(model).values():
                    ad.pool._pools = None
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    cached = run(False)
    assert cached == run(True)
    assert cached[-1] < cached[0]


def test_save_load_round_trip_keeps_the_pool_layout(tmp_path):
    model = llama()
    x = tokens(vocab=200)
    # attach order (v before q) differs from the sorted order loading uses
    attach(model, "mos", ["v_proj", "q_proj", "down_proj"], rank=6, pool_rank=2, private_rank=1, seed=5)
    make_trained(model, std=0.2)
    want = logits(model, x)
    save_adapter(model, tmp_path)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)


def test_a_deep_copy_gets_its_own_pool(tmp_path):
    import copy
    import pickle

    model = llama()
    x = tokens(vocab=200)
    attach(model, "mos", "all-linear", rank=4, pool_rank=2)
    make_trained(model, std=0.2)
    want = logits(model, x)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, x), want)
    with torch.no_grad():  # changing the original must not reach the copy's pool
        for ad in _adapters(model).values():
            ad.mos_A.mul_(3)
    assert not torch.allclose(logits(model, x), want)
    torch.testing.assert_close(logits(twin, x), want)
    twin_pools = {id(ad.pool) for ad in _adapters(twin).values()}
    assert len(twin_pools) == 1 and twin_pools.isdisjoint({id(ad.pool) for ad in _adapters(model).values()})
    restored = pickle.loads(pickle.dumps(twin))  # torch.save(model) pickles the same way
    torch.testing.assert_close(logits(restored, x), want)


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"rank": 4, "shard_size": 24}, ["k_proj", "shard_size=24", "[1, 2, 4, 8, 16, 32]"]),
        ({"rank": 4, "pool_rank": 2, "private_rank": 2}, ["private_rank=2", "no public shards"]),
        ({"rank": 4, "pool_rank": 5}, ["pool_rank must be in 1..rank=4"]),
    ],
)
def test_bad_options_raise_before_anything_is_attached(options, needles):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        attach(model, "mos", ["q_proj", "k_proj"], **options)
    for needle in needles:
        assert needle in str(err.value)
    assert not adapted_layers(model)
    assert_same_state(model, before)
