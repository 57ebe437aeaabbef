"""Rank metrics against their definitions on matrices with known spectra."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg import effective_rank, energy_rank, nuclear_norm, stable_rank


def with_spectrum(s, m=9, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.mT


def test_known_spectrum():
    A = with_spectrum([4.0, 2.0, 1.0, 1.0])
    torch.testing.assert_close(nuclear_norm(A), torch.tensor(8.0, dtype=torch.float64))
    torch.testing.assert_close(stable_rank(A), torch.tensor(22 / 16, dtype=torch.float64))
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    expected = math.exp(float(-(p * p.log()).sum()))
    torch.testing.assert_close(effective_rank(A), torch.tensor(expected, dtype=torch.float64))


def test_extremes_and_zero_matrix():
    torch.testing.assert_close(effective_rank(torch.eye(6)), torch.tensor(6.0))
    torch.testing.assert_close(effective_rank(with_spectrum([3.0])).float(), torch.tensor(1.0))
    Z = torch.zeros(4, 3)
    for f in (nuclear_norm, effective_rank, stable_rank):
        assert float(f(Z)) == 0.0


def test_batched_and_bf16():
    A = torch.stack([torch.eye(5), torch.diag(torch.tensor([1.0, 0, 0, 0, 0]))])
    torch.testing.assert_close(stable_rank(A), torch.tensor([5.0, 1.0]))
    assert effective_rank(A.bfloat16()).shape == (2,)
    torch.testing.assert_close(nuclear_norm(A.bfloat16()), torch.tensor([5.0, 1.0]))


def test_energy_rank():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert int(energy_rank(S, energy=0.5)) == 1
    assert int(energy_rank(S, energy=0.9)) == 2  # 13/14 = 0.93
    assert int(energy_rank(S, energy=1.0)) == 3  # exact rank, never the zero value
    assert int(energy_rank(S.flip(0), energy=0.9)) == 2  # order does not matter
    assert energy_rank(torch.stack([S, S * 0]), energy=0.9).tolist() == [2, 0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12), st.floats(0.05, 1.0))
@example(s=[5e-324], energy=1.0)  # a subnormal top singular value: stable rank 1, not ~0 (found by CI)
def test_properties(s, energy):
    S = torch.tensor(sorted(s, reverse=True), dtype=torch.float64)
    k = int(energy_rank(S, energy=energy))
    if S.sum() == 0:
        assert k == 0
        return
    e = (S / S[0]).square()  # relative energies: tiny (even subnormal) values count too
    assert e[:k].sum() >= energy * e.sum() * (1 - 1e-9)
    assert k == 1 or e[: k - 1].sum() < energy * e.sum()
    A = torch.diag(S)
    rank = int((S > 0).sum())
    assert 1 - 1e-9 <= float(effective_rank(A)) <= rank + 1e-9
    assert 1 - 1e-9 <= float(stable_rank(A)) <= rank + 1e-9
    assert abs(float(nuclear_norm(A)) - float(S.sum())) < 1e-9


def test_bad_input():
    with pytest.raises(ShapeError, match="effective_rank: argument 'A' contains"):
        effective_rank(torch.tensor([[float("inf")]]))
    with pytest.raises(ShapeError, match="stable_rank: argument 'A' has dtype torch.int64"):
        stable_rank(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ShapeError, match="nuclear_norm: argument 'A' is empty"):
        nuclear_norm(torch.ones(0, 2))
    with pytest.raises(ConfigError, match=r"energy_rank: argument 'energy' must be a number"):
        energy_rank(torch.ones(3), energy=0)
    with pytest.raises(ShapeError, match="energy_rank: argument 'S' must hold finite non-neg"):
        energy_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ShapeError, match="energy_rank: argument 'S' must be a non-empty"):
        energy_rank(torch.ones(0))
