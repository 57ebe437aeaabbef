import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.dct import dct_basis, dct_select


@given(n=st.integers(1, 40))
@settings(deadline=None, max_examples=20)
def test_basis_orthonormal_and_matches_scipy(n):
    D = dct_basis(n, dtype=torch.float64)
    assert torch.allclose(D.T @ D, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = np.random.default_rng(n).standard_normal((n, 3))
    ref = scipy.fft.dct(x, norm="ortho", axis=0)
    np.testing.assert_allclose((D.T @ torch.from_numpy(x)).numpy(), ref, atol=1e-12)


def test_basis_dtype():
    assert dct_basis(5).dtype == torch.float32
    with pytest.raises(ShapeError, match="dct_basis.*dtype"):
        dct_basis(5, dtype=torch.int64)
    with pytest.raises(ConfigError, match="dct_basis.*'n'"):
        dct_basis(0)


def test_select_picks_planted_frequencies():
    D = dct_basis(32, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(3, 20, generator=g, dtype=torch.float64)
    G = D[:, [4, 17, 9]] @ (coef * torch.tensor([[3.0], [2.0], [1.0]], dtype=torch.float64))
    G = G + 1e-3 * torch.randn(32, 20, generator=g, dtype=torch.float64)
    sel = dct_select(G, 3, side="left")
    assert set(sel.indices.tolist()) == {4, 17, 9}
    assert torch.allclose(sel.P, D[:, sel.indices])
    # kept energy is the best any 3 DCT columns can do, and at most the SVD's
    kept = (sel.P.T @ G).square().sum()
    scores = (D.T @ G).square().sum(-1)
    assert torch.isclose(kept, scores.topk(3).values.sum())
    assert kept <= torch.linalg.svdvals(G)[:3].square().sum() + 1e-9


@given(m=st.integers(2, 12), n=st.integers(2, 12), b=st.integers(1, 3), data=st.data())
@settings(deadline=None, max_examples=20)
def test_select_batched_matches_loop(m, n, b, data):
    rank = data.draw(st.integers(1, min(m, n)))
    G = torch.randn(b, m, n, generator=torch.Generator().manual_seed(m * n + b))
    sel = dct_select(G, rank)
    assert sel.side == ("left" if m <= n else "right")
    d = m if sel.side == "left" else n
    assert sel.P.shape == (b, d, rank)
    for i in range(b):
        one = dct_select(G[i], rank, side=sel.side, basis=dct_basis(d))
        assert torch.equal(one.indices, sel.indices[i])
        assert torch.allclose(one.P, sel.P[i])


def test_select_right_side_projection():
    G = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    sel = dct_select(G, 2, side="right")
    assert sel.P.shape == (6, 2)
    assert torch.allclose(sel.P.T @ sel.P, torch.eye(2), atol=1e-6)


def test_select_bad_input():
    G = torch.randn(4, 5)
    with pytest.raises(ConfigError, match="dct_select.*'rank'"):
        dct_select(G, 0)
    with pytest.raises(ConfigError, match="dct_select.*'rank'"):
        dct_select(G, 5)
    with pytest.raises(ShapeError, match="dct_select.*'G'.*NaN"):
        dct_select(torch.full((4, 5), float("nan")), 2)
    with pytest.raises(ShapeError, match="dct_select.*'G'"):
        dct_select(torch.ones(4, 5, dtype=torch.int64), 2)
    with pytest.raises(ShapeError, match="dct_select.*'basis'"):
        dct_select(G, 2, side="left", basis=dct_basis(5))
    with pytest.raises(ConfigError, match="dct_select.*'side'"):
        dct_select(G, 2, side="top")
