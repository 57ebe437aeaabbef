import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.monarch import monarch_dense, monarch_matmul, monarch_project


def _random_factors(k, b_out, b_in, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(*batch, b_out, k, k, generator=g, dtype=torch.float64)
    R = torch.randn(*batch, k, b_out, b_in, generator=g, dtype=torch.float64)
    return L, R


def test_dense_matches_definition():
    L, R = _random_factors(2, 3, 2, 0)
    M = monarch_dense(L, R)
    # M = P^T blockdiag(L) P blockdiag(R) with P the (k, b) -> (b, k) transpose
    k, b_out, b_in = 2, 3, 2
    Rd = torch.block_diag(*R.unbind(0))
    Ld = torch.block_diag(*L.unbind(0))
    P = torch.eye(k * b_out, dtype=torch.float64)[
        torch.arange(k * b_out).reshape(k, b_out).T.reshape(-1)
    ]
    assert torch.allclose(M, P.T @ Ld @ P @ Rd)
    assert M.shape == (k * b_out, k * b_in)


@given(k=st.integers(1, 4), b_out=st.integers(1, 4), b_in=st.integers(1, 4))
@settings(deadline=None, max_examples=25)
def test_monarch_projects_to_itself(k, b_out, b_in):
    L, R = _random_factors(k, b_out, b_in, k * 100 + b_out * 10 + b_in)
    M = monarch_dense(L, R)
    L2, R2 = monarch_project(M, k)
    assert torch.allclose(monarch_dense(L2, R2), M, atol=1e-10)


@given(k=st.integers(1, 4), b_out=st.integers(1, 4), b_in=st.integers(1, 4))
@settings(deadline=None, max_examples=25)
def test_matmul_equals_dense_product(k, b_out, b_in):
    L, R = _random_factors(k, b_out, b_in, k + 7 * b_out + 31 * b_in)
    x = torch.randn(2, 3, k * b_in, dtype=torch.float64)
    assert torch.allclose(monarch_matmul(x, L, R), x @ monarch_dense(L, R).T, atol=1e-10)


def test_projection_is_optimal_against_perturbations():
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    L, R = monarch_project(W, 4)
    best = (W - monarch_dense(L, R)).norm()
    assert best > 0.1 * W.norm()  # a dense matrix is not Monarch
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        Lp = L + 1e-2 * torch.randn(L.shape, generator=g, dtype=torch.float64)
        Rp = R + 1e-2 * torch.randn(R.shape, generator=g, dtype=torch.float64)
        assert (W - monarch_dense(Lp, Rp)).norm() >= best


def test_batched_projection_and_dtypes():
    W = torch.randn(3, 8, 6, dtype=torch.float64)
    L, R = monarch_project(W, 2)
    assert L.shape == (3, 4, 2, 2) and R.shape == (3, 2, 4, 3)
    for i in range(3):
        Li, Ri = monarch_project(W[i], 2)
        assert torch.allclose(monarch_dense(Li, Ri), monarch_dense(L, R)[i])
    Lh, Rh = monarch_project(W[0].bfloat16(), 2)
    assert Lh.dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ShapeError, match="monarch_project.*'nblocks'"):
        monarch_project(torch.randn(6, 8), 4)
    with pytest.raises(ConfigError, match="monarch_project.*'nblocks'"):
        monarch_project(torch.randn(6, 8), 0)
    with pytest.raises(ShapeError, match="monarch_project.*'W'.*NaN"):
        monarch_project(torch.full((4, 4), float("inf")), 2)
    with pytest.raises(ShapeError, match="monarch_project.*'W'"):
        monarch_project(torch.ones(4, 4, dtype=torch.int32), 2)
    L, R = _random_factors(2, 3, 2, 0)
    with pytest.raises(ShapeError, match="monarch_matmul.*'x'"):
        monarch_matmul(torch.randn(5, 5, dtype=torch.float64), L, R)
    with pytest.raises(ShapeError, match="monarch_matmul.*'R'"):
        monarch_matmul(torch.randn(5, 4, dtype=torch.float64), L, R[:, :2])
    with pytest.raises(ShapeError, match="monarch_matmul.*'x'.*NaN"):
        monarch_matmul(torch.full((1, 4), float("nan"), dtype=torch.float64), L, R)
