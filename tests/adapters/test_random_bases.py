"""Shared random bases: deterministic from a seed, prefixes of larger ones, one tensor per name."""

from __future__ import annotations

import gc

import pytest
import torch

from rankwise.adapters.random_bases import (
    TILE,
    SharedBasis,
    cached_count,
    generate,
    random_basis,
    shared_copy,
)
from rankwise.errors import ConfigError


def test_values_are_pinned_so_every_machine_draws_the_same_basis():
    # torch.Generator on the CPU, seeded by a stable hash: these numbers must never change
    t = generate((3, 2, 5), seed=0, kind="x")
    torch.testing.assert_close(
        t[0, 0], torch.tensor([0.69664949, 0.39700174, -0.93390113, 1.83586049, 2.17263389])
    )
    assert t[2, 1, 4].item() == pytest.approx(-1.03894711)
    u = generate((4,), seed=1, kind="y_uniform")
    torch.testing.assert_close(u, torch.tensor([-0.68530101, -0.82805330, 1.43623614, 0.74631584]))


def test_a_basis_is_a_prefix_of_any_larger_one_with_the_same_last_dimension():
    big = generate((2 * TILE + 7, 5, 3), seed=4, kind="b")
    small = generate((TILE + 3, 2, 3), seed=4, kind="b")
    torch.testing.assert_close(small, big[: TILE + 3, :2], atol=0, rtol=0)
    assert not torch.equal(generate((4, 3), seed=4, kind="b")[:4, :2], generate((4, 2), seed=4, kind="b"))


def test_seed_and_kind_change_the_values_and_statistics_are_unit_variance():
    a = generate((512, 64), seed=0, kind="a")
    assert not torch.equal(a, generate((512, 64), seed=1, kind="a"))
    assert not torch.equal(a, generate((512, 64), seed=0, kind="b"))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.var()) - 1) < 0.02
    u = generate((512, 64), seed=0, kind="a_uniform")
    assert float(u.abs().max()) <= 3**0.5 and abs(float(u.var()) - 1) < 0.02


def test_one_shared_tensor_per_name_device_and_dtype_freed_when_unused():
    gc.collect()
    start = cached_count()
    first = SharedBasis((40, 8), seed=2, kind="share")
    second = SharedBasis((40, 8), seed=2, kind="share")
    t = first.get("cpu", torch.float32)
    assert second.get("cpu", torch.float32) is t  # one tensor, not one per layer
    d = first.get("cpu", torch.float64)
    assert d is second.get("cpu", torch.float64) and d.dtype == torch.float64
    torch.testing.assert_close(d.float(), t)
    assert not t.requires_grad
    del first, second, t, d
    gc.collect()
    assert cached_count() == start


def test_meta_device_gives_shapes_without_drawing():
    t = random_basis((10**6, 10**3), seed=0, kind="huge", device="meta")
    assert t.is_meta and t.shape == (10**6, 10**3)


def test_shared_copy_maps_equal_contents_to_one_tensor():
    a = torch.randn(6, 3)
    one, two = shared_copy(a, kind="k"), shared_copy(a.clone(), kind="k")
    assert one is two and torch.equal(one, a)
    assert shared_copy(a + 1, kind="k") is not one


@pytest.mark.parametrize(
    ("shape", "seed", "kind", "match"),
    [
        ((0, 3), 0, "k", "positive sizes"),
        ((), 0, "k", "non-empty shape"),
        ((2, 3), 1.5, "k", "seed must be an integer"),
        ((2, 3), True, "k", "seed must be an integer"),
        ((2, 3), 0, "", "kind must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_config_error(shape, seed, kind, match):
    with pytest.raises(ConfigError, match=match):
        random_basis(shape, seed=seed, kind=kind)
