"""The slot pools behind per-row routing: LoRA factors copied once into per-layer slots, read
as views of the pool by every batch, freed and reused when adapters go, re-copied when an
adapter's weights change; methods without ``delta_factors`` stay exact on their own path."""

from __future__ import annotations

import pytest
import torch

from rankwise.adapters import attach, delete, set_active
from rankwise.adapters.inject import RowRouting, adapted_layers, route
from rankwise.adapters.methods.dylora import set_rank
from rankwise.models import tiny_llama
from rankwise.serve.engine import contiguous_input_hook

TARGETS = ["q_proj", "o_proj"]  # 64 x 64 in tiny-llama: every rank up to 64 fits


def _randomise(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _add(model, name: str, rank: int, seed: int, method: str = "lora", **options) -> None:
    attach(model, method, TARGETS, name, rank=rank, activate=False, **options)
    _randomise(model, name, seed)


def _alone(model, name, ids):
    set_active(model, [] if name is None else [name])
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        set_active(model, [])


def _check_rows(model, rows, seed=0):
    ids = torch.randint(4, 200, (len(rows), 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), route(model, RowRouting(rows)):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        alone = _alone(model, name, ids[i : i + 1])[0]
        assert torch.allclose(mixed[i], alone, atol=1e-4), (i, name, (mixed[i] - alone).abs().max())
    return mixed


def _slots(model):
    return next(iter(adapted_layers(model).values())).slots


def test_ranks_8_to_64_mixed_in_one_batch():
    model, _ = tiny_llama()
    ranks = {"r8": 8, "r16": 16, "r32": 32, "r64": 64, "r8b": 8}
    for seed, (name, rank) in enumerate(ranks.items()):
        _add(model, name, rank, seed)
    rows = ["r64", "r8", None, "r16", "r8b", "r32", "r8", "r64"]
    _check_rows(model, rows)
    slots = _slots(model)
    shapes = sorted(pool.a.shape[2] for pool in slots.pools.values())
    assert shapes == [8, 16, 32, 64]  # one pool per rank: no rank is padded to another


def test_a_new_batch_reads_the_pool_without_copying_factors():
    model, _ = tiny_llama()
    for i in range(4):
        _add(model, f"a{i}", 8, i)
    _check_rows(model, ["a0", "a1", "a2", "a3"])
    layer = next(iter(adapted_layers(model).values()))
    routing = RowRouting(["a2", "a1", "a2", "a0"])
    with torch.no_grad(), route(model, routing):
        model(torch.ones(4, 3, dtype=torch.long))
    (pool,) = layer.slots.pools.values()
    group = routing.plans[layer].groups[0]
    assert group.a.data_ptr() == pool.a[0].data_ptr()  # slots 0..2: a view, nothing copied


def test_a_freed_slot_is_reused_and_gives_the_new_adapters_outputs():
    model, _ = tiny_llama()
    for i, rank in enumerate([8, 16, 8, 16]):
        _add(model, f"a{i}", rank, i)
    _check_rows(model, ["a0", "a1", "a2", "a3"])
    pool, slot = _slots(model).where["a2"][:2]
    delete(model, "a2")  # evicted: its slot is freed
    assert "a2" not in _slots(model).where
    _add(model, "new", 8, 99)  # same rank: takes the freed slot
    rows = ["new", "a0", "new", "a3", None]
    _check_rows(model, rows, seed=1)
    assert _slots(model).where["new"][:2] == (pool, slot)
    # and the same adapter reloaded after eviction gives the same outputs as before
    ids = torch.randint(4, 200, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), route(model, ["a0", "new"]):
        before = model(ids).logits
    delete(model, "new")
    _add(model, "new", 8, 99)
    with torch.no_grad(), route(model, ["a0", "new"]):
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_far_apart_slots_are_copied_and_stay_exact():
    model, _ = tiny_llama()
    for i in range(12):
        _add(model, f"a{i:02d}", 8, i)
    _check_rows(model, [f"a{i:02d}" for i in range(12)])  # slots 0..11 in one pool
    rows = ["a11", "a00", "a11"]  # 2 adapters 11 slots apart: a copy of 2, not a view of 12
    routing = RowRouting(rows)
    ids = torch.randint(4, 200, (3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), route(model, routing):
        mixed = model(ids).logits
    layer = next(iter(adapted_layers(model).values()))
    assert routing.plans[layer].groups[0].a.shape[0] == 2
    for i, name in enumerate(rows):
        assert torch.allclose(mixed[i], _alone(model, name, ids[i : i + 1])[0], atol=1e-4)


def test_changed_weights_are_copied_again_by_the_next_routing():
    model, _ = tiny_llama()
    _add(model, "a", 8, 0)
    _add(model, "b", 8, 1)
    _check_rows(model, ["a", "b"])
    _randomise(model, "a", 123)  # in place: the parameters' versions change
    _check_rows(model, ["a", "b"], seed=2)
    layer = next(iter(adapted_layers(model).values()))
    layer.adapters["b"].lora_B.data = torch.randn_like(layer.adapters["b"].lora_B)  # replaced
    _check_rows(model, ["b", "a"], seed=3)


def test_lora_subclasses_with_another_forward_take_slots_with_their_own_factors():
    """DyLoRA at a lower rank and SoRA with closed gates inherit LoRA's factors but not its
    forward: their own delta_factors (the active rank; the gate folded into A) put them in
    the slot pools, and their rows equal each adapter run alone."""
    model, _ = tiny_llama()
    _add(model, "lora", 8, 0)
    _add(model, "dy", 8, 1, method="dylora")
    _add(model, "so", 8, 2, method="sora")
    set_rank(model, 3, "dy")
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapters["so"].gate[::2] = 0.0
    layer = next(iter(adapted_layers(model).values()))
    assert layer.adapters["lora"].delta_factors() is not None
    with torch.no_grad():  # as routing calls it (DyLoRA samples a rank in a training forward)
        a, b, s = layer.adapters["dy"].delta_factors()
        assert a.shape[0] == b.shape[1] == 3 and s == layer.adapters["dy"].scaling_at(3)
        a, _, _ = layer.adapters["so"].delta_factors()
    assert not a[::2].any() and a[1::2].any()
    _check_rows(model, ["dy", "lora", "so", "dy", None])
    assert set(layer.slots.where) == {"lora", "dy", "so"}


@pytest.mark.parametrize("contiguous", [True, False])
def test_contiguous_input_hook(contiguous):
    x = torch.randn(3, 4, 5)
    x = x if contiguous else x[:, -1:, :]
    out = contiguous_input_hook(None, (x, "other"))
    if contiguous:
        assert out is None
    else:
        assert out[0].is_contiguous() and torch.equal(out[0], x) and out[1] == "other"


def test_frozen_routing_reuses_slots_but_rereads_a_reloaded_adapter():
    model, _ = tiny_llama()
    _add(model, "a", 8, 0)
    _add(model, "b", 8, 1)
    ids = torch.randint(4, 200, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), route(model, RowRouting(["a", "b"], frozen=True)):
        first = model(ids).logits
    _randomise(model, "a", 321)  # a frozen routing trusts the slot: not re-read
    with torch.no_grad(), route(model, RowRouting(["a", "b"], frozen=True)):
        assert torch.equal(model(ids).logits, first)
    delete(model, "a")
    _add(model, "a", 8, 321)  # a reload is another adapter object: re-read
    with torch.no_grad(), route(model, RowRouting(["a", "b"], frozen=True)):
        again = model(ids).logits
    assert torch.allclose(again[0], _alone(model, "a", ids[:1])[0], atol=1e-4)
    assert (again[0] - first[0]).abs().max() > 1e-2
