"""M-FAC inverse-Fisher-vector products (and the Fisher quadratic form) against dense matrices."""

from __future__ import annotations

import pytest
import torch

import rankwise.analysis
from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg import MFAC


def _grads(m: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("m", "d", "damp"), [(8, 30, 1e-2), (30, 12, 1e-3), (1, 5, 1.0)])
def test_ifvp_matches_the_dense_inverse(m, d, damp):
    G = _grads(m, d)
    fisher = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / m
    x = _grads(3, d, seed=1)
    mfac = MFAC(G, damp=damp)
    torch.testing.assert_close(mfac.ifvp(x), torch.linalg.solve(fisher, x.T).T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(mfac.inverse_diagonal(), torch.linalg.inv(fisher).diagonal(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(mfac.dense(), fisher)


def test_sliding_window_equals_a_fresh_start_on_the_last_gradients():
    G = _grads(12, 20)
    window = MFAC(window=5, dim=20, damp=1e-2)
    for g in G:
        window.update(g)
    assert window.count == 5
    fresh = MFAC(G[-5:], damp=1e-2)
    x = _grads(1, 20, seed=2)[0]
    torch.testing.assert_close(window.ifvp(x), fresh.ifvp(x), rtol=1e-9, atol=1e-9)
    fisher = 1e-2 * torch.eye(20, dtype=torch.float64) + G[-5:].T @ G[-5:] / 5
    torch.testing.assert_close(window.ifvp(x), torch.linalg.solve(fisher, x), rtol=1e-8, atol=1e-8)


def test_empty_window_is_the_damped_identity_and_float32_round_trips():
    mfac = MFAC(window=4, dim=6, damp=0.5)
    x = torch.ones(6)
    torch.testing.assert_close(mfac.ifvp(x), 2 * x)
    mfac.update(torch.randn(6))
    assert mfac.ifvp(x).dtype == torch.float32


def test_bad_input():
    with pytest.raises(ConfigError, match="damp"):
        MFAC(_grads(2, 3), damp=0)
    with pytest.raises(ShapeError, match=r"\(m, d\)"):
        MFAC(torch.zeros(3))
    with pytest.raises(ConfigError, match="window= and dim="):
        MFAC()
    mfac = MFAC(_grads(2, 3))
    with pytest.raises(ShapeError, match="last dimension 3"):
        mfac.ifvp(torch.zeros(4))
    with pytest.raises(ShapeError, match="NaN"):
        mfac.update(torch.tensor([0.0, float("nan"), 1.0]))


def test_quadratic_form_matches_the_dense_fisher():
    G = _grads(6, 15)
    mfac = MFAC(G, damp=1e-2)
    x = _grads(4, 15, seed=3)
    dense = mfac.dense()
    torch.testing.assert_close(mfac.quadratic_form(x), torch.einsum("bi,ij,bj->b", x, dense, x), rtol=1e-10, atol=1e-10)
    empty = MFAC(window=3, dim=15, damp=0.25)
    torch.testing.assert_close(empty.quadratic_form(x[0]), 0.25 * x[0].square().sum())
    with pytest.raises(ShapeError, match="last dimension 15"):
        mfac.quadratic_form(torch.zeros(2, 4))


def test_analysis_re_exports_the_linalg_kernel():
    assert rankwise.analysis.MFAC is MFAC
